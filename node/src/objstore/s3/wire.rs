//! Translating between rust-s3's answers and the port's types: errors into retryable or not,
//! ETags without quotes, dates into Unix milliseconds, and listings checked before they are
//! trusted (a relay cursor built on a misordered listing would skip objects).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use s3::error::S3Error;
use s3::serde_types::ListBucketResult;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime, macros::format_description};

use super::super::{ListPage, ObjectMeta, ObjectStoreError, Result, key};

/// Statuses worth retrying: timeouts, throttling, server errors.
fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429) || status >= 500
}

/// Map a rust-s3 error for `op` on `key` (when there is one) to the port's error.
pub(super) fn error(key: Option<&str>, op: &str, e: S3Error) -> ObjectStoreError {
    match e {
        S3Error::HttpFailWithBody(404, body) if key.is_some() && !body.contains("NoSuchBucket") => {
            ObjectStoreError::NotFound { key: key.unwrap_or_default().to_string() }
        }
        S3Error::HttpFailWithBody(status, body) => {
            let code = xml_field(body.as_bytes(), "Code").unwrap_or_default();
            let message = xml_field(body.as_bytes(), "Message").unwrap_or_default();
            let hint = match status {
                401 | 403 => "; check the access key, its permissions on the bucket, and the region name",
                404 => "; does the bucket exist?",
                _ => "",
            };
            ObjectStoreError::Unavailable {
                message: format!("{op}: HTTP {status} {code} {message}{hint}").replace("  ", " "),
                retryable: retryable_status(status),
            }
        }
        S3Error::Reqwest(e) => {
            let retryable = !e.is_builder() && !e.is_redirect();
            // Without the URL: it is the endpoint and key, already known to the caller.
            ObjectStoreError::Unavailable { message: format!("{op}: {}", e.without_url()), retryable }
        }
        S3Error::Io(e) => ObjectStoreError::Unavailable { message: format!("{op}: {e}"), retryable: true },
        S3Error::Credentials(e) => ObjectStoreError::Config(format!("s3 credentials: {e}")),
        other => ObjectStoreError::Unavailable { message: format!("{op}: {other}"), retryable: false },
    }
}

pub(super) fn unquote(etag: &str) -> String {
    etag.trim().trim_matches('"').to_string()
}

/// The text of the first `<name>…</name>` in an S3 XML document, entities for quotes undone.
pub(super) fn xml_field(xml: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(xml).ok()?;
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&format!("</{name}>"))? + start;
    Some(text[start..end].replace("&quot;", "\"").replace("&#34;", "\"").replace("&amp;", "&"))
}

pub(super) fn etag_in_xml(xml: &[u8]) -> Option<String> {
    xml_field(xml, "ETag").map(|e| unquote(&e))
}

/// `Last-Modified` of a HEAD answer (RFC 7231 IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`).
pub(super) fn http_date_unix_ms(value: &str) -> Option<u64> {
    let format = format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let t = PrimitiveDateTime::parse(value.trim(), format).ok()?.assume_utc();
    unix_ms(t)
}

/// `LastModified` of a listing entry (ISO 8601, e.g. `2024-05-01T10:00:00.000Z`).
pub(super) fn rfc3339_unix_ms(value: &str) -> Option<u64> {
    unix_ms(OffsetDateTime::parse(value.trim(), &Rfc3339).ok()?)
}

fn unix_ms(t: OffsetDateTime) -> Option<u64> {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Characters left as they are in an `x-amz-copy-source` header; the rest is percent-encoded.
const COPY_SOURCE_KEEP: &AsciiSet =
    &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'/');

pub(super) fn encode_copy_source(key: &str) -> String {
    utf8_percent_encode(key, COPY_SOURCE_KEEP).to_string()
}

/// Turn one ListObjectsV2 answer into a page, refusing answers that break S3's ordering
/// promises: keys must match the prefix, sort strictly after `start_after` and ascend.
pub(super) fn list_page(
    result: ListBucketResult,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<ListPage> {
    let broken = |why: String| ObjectStoreError::Unavailable {
        message: format!("the S3 server's listing is inconsistent: {why}"),
        retryable: false,
    };
    if result.contents.len() > limit {
        return Err(broken(format!("asked for {limit} keys, got {}", result.contents.len())));
    }
    let mut objects = Vec::with_capacity(result.contents.len());
    let mut last: Option<&str> = start_after;
    for o in &result.contents {
        if !o.key.starts_with(prefix) {
            return Err(broken(format!(
                "key {} lacks the prefix {}",
                key::display(&o.key),
                key::display(prefix)
            )));
        }
        if last.is_some_and(|l| o.key.as_str() <= l) {
            return Err(broken(format!("key {} is out of order", key::display(&o.key))));
        }
        last = Some(o.key.as_str());
        objects.push(ObjectMeta {
            key: o.key.clone(),
            size: o.size,
            etag: o.e_tag.as_deref().map(unquote).unwrap_or_default(),
            last_modified_unix_ms: rfc3339_unix_ms(&o.last_modified),
        });
    }
    let next_start_after = if result.is_truncated {
        match objects.last() {
            Some(o) => Some(o.key.clone()),
            None => return Err(broken("a truncated page with no keys".into())),
        }
    } else {
        None
    };
    Ok(ListPage { objects, next_start_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_is_told_apart_from_a_missing_bucket() {
        assert!(matches!(
            error(Some("k"), "get", S3Error::HttpFailWithBody(404, "<Code>NoSuchKey</Code>".into())),
            ObjectStoreError::NotFound { .. }
        ));
        let e = error(Some("k"), "get", S3Error::HttpFailWithBody(404, "<Code>NoSuchBucket</Code>".into()));
        assert!(matches!(e, ObjectStoreError::Unavailable { retryable: false, .. }), "{e}");
    }

    #[test]
    fn server_errors_and_throttling_are_retryable_and_denials_are_not() {
        assert!(error(None, "list", S3Error::HttpFailWithBody(503, String::new())).is_retryable());
        assert!(error(None, "list", S3Error::HttpFailWithBody(429, String::new())).is_retryable());
        let denied = error(None, "list", S3Error::HttpFailWithBody(403, "<Code>AccessDenied</Code>".into()));
        assert!(!denied.is_retryable());
        assert!(denied.to_string().contains("AccessDenied"), "{denied}");
    }

    #[test]
    fn dates_and_etags_are_normalised() {
        assert_eq!(http_date_unix_ms("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777_000));
        assert_eq!(rfc3339_unix_ms("1994-11-06T08:49:37.250Z"), Some(784_111_777_250));
        assert_eq!(unquote("\"abc-2\""), "abc-2");
        assert_eq!(
            etag_in_xml(b"<CompleteMultipartUploadResult><ETag>&quot;e-3&quot;</ETag></CompleteMultipartUploadResult>"),
            Some("e-3".into())
        );
    }

    fn listing(keys: &[&str], truncated: bool) -> ListBucketResult {
        ListBucketResult {
            name: "b".into(),
            delimiter: None,
            max_keys: None,
            prefix: None,
            continuation_token: None,
            encoding_type: None,
            is_truncated: truncated,
            next_continuation_token: None,
            contents: keys
                .iter()
                .map(|k| s3::serde_types::Object {
                    last_modified: "2024-05-01T10:00:00.000Z".into(),
                    e_tag: Some("\"e\"".into()),
                    storage_class: None,
                    key: (*k).into(),
                    owner: None,
                    size: 1,
                })
                .collect(),
            common_prefixes: None,
        }
    }

    #[test]
    fn listings_that_would_corrupt_a_cursor_are_refused() {
        let page = list_page(listing(&["p/a", "p/b"], true), "p/", Some("p/0"), 2).expect("good page");
        assert_eq!(page.next_start_after.as_deref(), Some("p/b"));
        assert_eq!(page.objects[0].etag, "e");
        assert!(
            list_page(listing(&["p/a", "p/b"], false), "p/", None, 2)
                .expect("last page")
                .next_start_after
                .is_none()
        );
        for (keys, after, why) in [
            (&["p/b", "p/a"][..], None, "out of order"),
            (&["p/a"][..], Some("p/a"), "out of order"),
            (&["q/a"][..], None, "prefix"),
            (&["p/a", "p/b", "p/c"][..], None, "asked for 2"),
        ] {
            let err = list_page(listing(keys, false), "p/", after, 2).expect_err(why).to_string();
            assert!(err.contains(why), "{err}");
        }
        assert!(list_page(listing(&[], true), "p/", None, 2).is_err(), "truncated but empty");
    }

    #[test]
    fn copy_sources_are_percent_encoded_except_slashes() {
        assert_eq!(encode_copy_source("a b/ü/../x+%"), "a%20b/%C3%BC/../x%2B%25");
    }

    use proptest::prelude::*;

    /// `default` cases, or `PROPTEST_CASES` for a longer run.
    fn cases(default: u32) -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
    }

    /// A key as a server may list it: under the prefix or not, hostile (`..`, control
    /// characters, markup), any unicode.
    fn listed_key(prefix: String) -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "[a-z0-9/_.-]{0,12}".prop_map(move |s| format!("{prefix}{s}")),
            1 => "(\\.\\./|/|<|&|\"|\x00|\r\n|\u{7f}){1,4}[a-z]{0,4}",
            1 => any::<String>(),
        ]
    }

    /// One ListObjectsV2 answer as text: entries escaped as a server would (or, now and then,
    /// not at all), keys mostly sorted, any sizes, ETags quoted or not, dates valid or junk.
    fn listing_xml() -> impl Strategy<Value = (String, Option<String>, usize, String)> {
        ("[a-z]{0,2}/?", 1usize..8).prop_flat_map(|(prefix, limit)| {
            let entry = (
                listed_key(prefix.clone()),
                any::<u64>(),
                prop_oneof![Just("\"0123abcd\"".to_owned()), "[a-f0-9\"&;]{0,10}"],
                prop_oneof![Just("2024-05-01T10:00:00.000Z".to_owned()), "[0-9TZ:.-]{0,24}"],
            );
            (
                Just(prefix.clone()),
                prop::option::of(listed_key(prefix)),
                Just(limit),
                prop::collection::vec(entry, 0..10),
                (any::<bool>(), any::<bool>(), any::<bool>()),
                // A listed key repeated, and a cursor that is one of the listed keys.
                (prop::option::of(any::<prop::sample::Index>()), prop::option::of(any::<prop::sample::Index>())),
            )
        })
        .prop_map(|(prefix, mut start_after, limit, mut entries, (sorted, truncated, escaped), (dup, cursor))| {
            if sorted {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                entries.dedup_by(|a, b| a.0 == b.0);
            }
            if !entries.is_empty() {
                if let Some(i) = dup {
                    let i = i.index(entries.len());
                    entries.insert(i, entries[i].clone());
                }
                if let Some(i) = cursor {
                    start_after = Some(entries[i.index(entries.len())].0.clone());
                }
            }
            let text = |s: &str| if escaped { quick_xml::escape::escape(s).into_owned() } else { s.to_owned() };
            let mut xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                 <Name>outpost</Name><Prefix>{}</Prefix><MaxKeys>{limit}</MaxKeys><IsTruncated>{truncated}</IsTruncated>",
                text(&prefix)
            );
            for (key, size, etag, modified) in &entries {
                xml.push_str(&format!(
                    "<Contents><Key>{}</Key><LastModified>{}</LastModified><ETag>{}</ETag><Size>{size}</Size>\
                     <StorageClass>STANDARD</StorageClass></Contents>",
                    text(key),
                    text(modified),
                    text(etag)
                ));
            }
            xml.push_str("</ListBucketResult>");
            (prefix, start_after, limit, xml)
        })
    }

    proptest! {
        #![proptest_config(cases(2_000))]

        /// A listing as an S3 server sends it: the client's XML reader refuses it, or the page
        /// made of it keeps every promise a persisted relay cursor relies on (at most `limit`
        /// keys, all under the prefix, strictly ascending after `start_after`, a next cursor
        /// exactly when truncated, sizes and keys as listed, ETags unquoted), or the page is
        /// refused as inconsistent, and then the listing did break one of those promises.
        #[test]
        fn listings_become_faithful_pages_or_are_refused((prefix, start_after, limit, xml) in listing_xml()) {
            let Ok(result) = quick_xml::de::from_str::<ListBucketResult>(&xml) else {
                return Ok(());
            };
            let keys: Vec<&str> = result.contents.iter().map(|o| o.key.as_str()).collect();
            let mut last = start_after.as_deref();
            let mut ascending = true;
            for k in &keys {
                ascending &= last.is_none_or(|l| *k > l);
                last = Some(k);
            }
            let consistent = keys.len() <= limit
                && keys.iter().all(|k| k.starts_with(&prefix))
                && ascending
                && !(result.is_truncated && keys.is_empty());
            match list_page(result.clone(), &prefix, start_after.as_deref(), limit) {
                Ok(page) => {
                    prop_assert!(consistent, "accepted an inconsistent listing: {:?}", keys);
                    let got: Vec<&str> = page.objects.iter().map(|o| o.key.as_str()).collect();
                    prop_assert_eq!(&got, &keys);
                    for (o, listed) in page.objects.iter().zip(&result.contents) {
                        prop_assert_eq!(o.size, listed.size);
                        prop_assert!(!o.etag.starts_with('"') && !o.etag.ends_with('"'), "etag {}", o.etag);
                    }
                    let expected = result.is_truncated.then(|| keys.last().map(|k| k.to_string())).flatten();
                    prop_assert_eq!(page.next_start_after, expected);
                }
                Err(e) => {
                    prop_assert!(!consistent, "refused a consistent listing: {}", e);
                    let refused_as_inconsistent = matches!(
                        &e,
                        ObjectStoreError::Unavailable { message, retryable: false } if message.contains("inconsistent")
                    );
                    prop_assert!(refused_as_inconsistent, "{}", e);
                }
            }
        }

        /// The small XML readers of upload and copy answers: any bytes, no panic; an ETag a
        /// server writes (quoted, entities for the quotes) reads back bare.
        #[test]
        fn etags_in_answers_are_read_without_panic(junk in prop::collection::vec(any::<u8>(), 0..256), tag in "[0-9a-f]{1,32}(-[0-9]{1,3})?") {
            let _ = etag_in_xml(&junk);
            let _ = xml_field(&junk, "Key");
            let xml = format!("<CopyObjectResult><LastModified>x</LastModified><ETag>&quot;{tag}&quot;</ETag></CopyObjectResult>");
            prop_assert_eq!(etag_in_xml(xml.as_bytes()), Some(tag.clone()));
            let _ = rfc3339_unix_ms(&String::from_utf8_lossy(&junk));
            let _ = http_date_unix_ms(&String::from_utf8_lossy(&junk));
        }
    }
}
