//! Checking one object against a watch's rules. Metadata rules (size, suffix, content type)
//! are decided before any byte is read; the body is then streamed once, hashed as it passes,
//! and kept in memory only when a JSON rule needs it and it is under the parse cap.
//! A rejection is an answer, not an error: errors here are only failures to read the body.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::config::Rules;
use super::fields::{self, Extracted};
use super::schema::Schema;

/// Bytes read from a body per call.
const CHUNK: usize = 64 * 1024;

/// The verdict on one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Lowercase hex SHA-256 of the body; `None` when the object was refused on its metadata
    /// and its body never read.
    pub sha256: Option<String>,
    /// Bytes actually read (the listed size when the body was not read).
    pub size: u64,
    pub content_type: Option<String>,
    /// `None` when accepted; otherwise why not, in words for an operator.
    pub rejection: Option<String>,
    /// Allowed event fields of an accepted JSON object (see `fields.rs`).
    pub fields: BTreeMap<String, serde_json::Value>,
    /// Allowed event fields present in the object but withheld: (name, reason).
    pub fields_denied: Vec<(String, String)>,
}

/// What the body of one watch's objects is checked against: its rules, its compiled JSON
/// Schema, and the event fields the node's egress policy lets it carry.
#[derive(Debug, Clone, Copy)]
pub struct Checks<'a> {
    pub rules: &'a Rules,
    pub schema: Option<&'a Schema>,
    pub fields: &'a [String],
}

impl<'a> From<&'a Rules> for Checks<'a> {
    fn from(rules: &'a Rules) -> Self {
        Self { rules, schema: None, fields: &[] }
    }
}

impl Checks<'_> {
    /// Whether the body must be kept and parsed: for a JSON rule, or for event fields.
    fn parses(&self) -> bool {
        self.rules.parses_json() || !self.fields.is_empty()
    }
}

/// The content type implied by a key's suffix. The port stores no content type, so this is
/// what the relay reports and what `allowed_content_types` checks.
pub fn content_type_of(key: &str) -> Option<&'static str> {
    let name = key.rsplit('/').next().unwrap_or(key);
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "json" => "application/json",
        "ndjson" | "jsonl" => "application/x-ndjson",
        "xml" => "application/xml",
        "csv" => "text/csv",
        "txt" | "log" => "text/plain",
        "hl7" => "x-application/hl7-v2+er7",
        "dcm" => "application/dicom",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "tif" | "tiff" => "image/tiff",
        "parquet" => "application/vnd.apache.parquet",
        "gz" => "application/gzip",
        "zip" => "application/zip",
        "bin" => "application/octet-stream",
        _ => return None,
    })
}

/// Decide what can be decided from the key and listed size alone.
pub fn check_metadata(rules: &Rules, key: &str, size: u64, json_cap: u64) -> Option<String> {
    if let Some(max) = rules.max_size_bytes
        && size > max
    {
        return Some(format!("object is {size} bytes, over this watch's max_size_bytes of {max}"));
    }
    if !rules.allowed_suffixes.is_empty() {
        let lower = key.to_ascii_lowercase();
        if !rules.allowed_suffixes.iter().any(|s| lower.ends_with(&s.to_ascii_lowercase())) {
            return Some(format!(
                "key does not end with an allowed suffix ({})",
                rules.allowed_suffixes.join(", ")
            ));
        }
    }
    if let Some(allowed) = &rules.allowed_content_types {
        match content_type_of(key) {
            Some(ct) if allowed.iter().any(|a| a.eq_ignore_ascii_case(ct)) => {}
            Some(ct) => {
                return Some(format!(
                    "content type {ct} (inferred from the key's suffix) is not allowed ({})",
                    allowed.join(", ")
                ));
            }
            None => {
                return Some(format!(
                    "content type cannot be inferred from the key's suffix; allowed: {}",
                    allowed.join(", ")
                ));
            }
        }
    }
    if rules.parses_json() && size > json_cap {
        return Some(too_big_to_parse(size, json_cap));
    }
    None
}

fn too_big_to_parse(size: u64, cap: u64) -> String {
    format!(
        "object is {size} bytes, over the {cap}-byte cap for JSON checks (relay.json_check_cap_bytes); \
         raise the cap or drop the JSON rules for this watch"
    )
}

/// Stream `body` once: hash it, and check the JSON rules on it (and take its event fields)
/// when it fits under `json_cap`. Metadata rules must already have passed. Event fields alone
/// reject nothing: a body too big or not JSON just carries none.
pub async fn check_body<R: AsyncRead + Unpin>(
    checks: &Checks<'_>,
    key: &str,
    mut body: R,
    json_cap: u64,
) -> std::io::Result<Verdict> {
    let parse = checks.parses();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut kept: Vec<u8> = Vec::new();
    let mut over_cap = false;
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = body.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        let bytes = &chunk[..n];
        hasher.update(bytes);
        size += n as u64;
        if parse && !over_cap {
            if size > json_cap {
                // The object grew past the cap since it was listed: stop keeping it, keep hashing.
                over_cap = true;
                kept = Vec::new();
            } else {
                kept.extend_from_slice(bytes);
            }
        }
    }
    let sha256 = Some(hex::encode(hasher.finalize()));
    let content_type = content_type_of(key).map(str::to_owned);
    let (rejection, extracted) = if !parse {
        (None, Extracted::default())
    } else if over_cap {
        let rejection = checks.rules.parses_json().then(|| too_big_to_parse(size, json_cap));
        (rejection, Extracted::default())
    } else {
        check_json(checks, &kept)
    };
    Ok(Verdict {
        sha256,
        size,
        content_type,
        rejection,
        fields: extracted.fields,
        fields_denied: extracted.denied,
    })
}

#[derive(serde::Deserialize)]
struct FhirHead {
    #[serde(rename = "resourceType")]
    resource_type: Option<serde_json::Value>,
}

/// The JSON rules on a kept body, and the event fields of an accepted one.
fn check_json(checks: &Checks<'_>, body: &[u8]) -> (Option<String>, Extracted) {
    let rules = checks.rules;
    if checks.schema.is_none() && checks.fields.is_empty() {
        return (check_json_rules(rules, body), Extracted::default());
    }
    // A schema or event fields need the whole document as a value.
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) if rules.parses_json() => {
            return (Some(format!("not well-formed JSON: {e}")), Extracted::default());
        }
        Err(_) => return (None, Extracted::default()),
    };
    if let Some(allowed) = &rules.fhir_resource_types {
        let rejection = if value.is_object() {
            fhir_verdict(allowed, value.get("resourceType"))
        } else {
            Some("not a FHIR resource: the body is not a JSON object".into())
        };
        if rejection.is_some() {
            return (rejection, Extracted::default());
        }
    }
    if let Some(rejection) = checks.schema.and_then(|s| s.check(&value)) {
        return (Some(rejection), Extracted::default());
    }
    (None, fields::extract(&value, checks.fields))
}

/// The JSON rules without building a value (well-formedness, FHIR resource type).
fn check_json_rules(rules: &Rules, body: &[u8]) -> Option<String> {
    let Some(allowed) = &rules.fhir_resource_types else {
        return serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .err()
            .map(|e| format!("not well-formed JSON: {e}"));
    };
    // serde would read a struct from a JSON array, too: insist on an object first.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Some(match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Err(e) => format!("not well-formed JSON: {e}"),
            Ok(_) => "not a FHIR resource: the body is not a JSON object".into(),
        });
    }
    // Parsing into the struct checks the whole document is well-formed, too.
    let head: FhirHead = match serde_json::from_slice(body) {
        Ok(h) => h,
        Err(e) => return Some(format!("not well-formed JSON: {e}")),
    };
    fhir_verdict(allowed, head.resource_type.as_ref())
}

fn fhir_verdict(allowed: &[String], resource_type: Option<&serde_json::Value>) -> Option<String> {
    match resource_type {
        Some(serde_json::Value::String(t)) if allowed.contains(t) => None,
        Some(serde_json::Value::String(t)) => {
            Some(format!("FHIR resourceType {t:?} is not allowed (allowed: {})", allowed.join(", ")))
        }
        Some(other) => Some(format!("FHIR resourceType must be a string, found {other}")),
        None => Some("not a FHIR resource: the JSON object has no resourceType".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fhir(types: &[&str]) -> Rules {
        Rules { fhir_resource_types: Some(types.iter().map(|s| s.to_string()).collect()), ..Rules::default() }
    }

    async fn body(rules: &Rules, key: &str, bytes: &[u8], cap: u64) -> Verdict {
        check_body(&rules.into(), key, bytes, cap).await.expect("in-memory read")
    }

    fn compiled(doc: serde_json::Value) -> Schema {
        Schema::compile(&doc).expect("valid schema")
    }

    async fn checked(checks: Checks<'_>, bytes: &[u8], cap: u64) -> Verdict {
        check_body(&checks, "o.json", bytes, cap).await.expect("in-memory read")
    }

    #[tokio::test]
    async fn a_json_schema_accepts_valid_objects_and_rejects_others_with_their_paths() {
        let rules = Rules { json_schema: Some("/schemas/patient.json".into()), ..Rules::default() };
        let schema = compiled(serde_json::json!({
            "type": "object",
            "required": ["resourceType", "id"],
            "properties": {"id": {"type": "string", "maxLength": 8}, "active": {"type": "boolean"}}
        }));
        let checks = Checks { rules: &rules, schema: Some(&schema), fields: &[] };
        let ok = checked(checks, br#"{"resourceType":"Patient","id":"p1","active":true}"#, 1000).await;
        assert_eq!(ok.rejection, None);
        assert!(ok.sha256.is_some());
        let bad = checked(checks, br#"{"resourceType":"Patient","id":"far-too-long","active":"yes"}"#, 1000)
            .await
            .rejection
            .expect("invalid");
        assert!(bad.starts_with("does not match the watch's JSON Schema"), "{bad}");
        assert!(bad.contains("/id") && bad.contains("/active"), "{bad}");
        assert!(!bad.contains("far-too-long"), "the object's values stay on the node: {bad}");
        let broken = checked(checks, b"{", 1000).await.rejection.expect("broken");
        assert!(broken.starts_with("not well-formed JSON"), "{broken}");
        let over = checked(checks, br#"{"resourceType":"Patient","id":"p1"}"#, 8).await;
        assert!(over.rejection.expect("over cap").contains("json_check_cap_bytes"));
        let fhir = Rules { fhir_resource_types: Some(vec!["Patient".into()]), ..rules.clone() };
        let both = Checks { rules: &fhir, schema: Some(&schema), fields: &[] };
        let wrong = checked(both, br#"{"resourceType":"Observation","id":"o"}"#, 1000).await;
        assert!(wrong.rejection.expect("type").contains("Observation"), "FHIR is checked first");
    }

    #[tokio::test]
    async fn the_relay_refuses_to_start_on_a_missing_or_invalid_schema_file() {
        use crate::relay::{Relay, RelayConfig, Watch};
        let dir = tempfile::tempdir().expect("tempdir");
        let objects = crate::objstore::fs::FsStore::open(dir.path().join("objects")).await.expect("fs store");
        let build = |schema: std::path::PathBuf| {
            let rules = Rules { json_schema: Some(schema), ..Rules::default() };
            let watch = Watch { name: "fhir-in".into(), prefix: "in/".into(), rules, event_fields: vec![] };
            let config = RelayConfig { watches: vec![watch], ..RelayConfig::default() };
            let state: std::sync::Arc<dyn crate::store::StateStore> =
                std::sync::Arc::new(crate::store::memory::MemoryStore::new());
            Relay::new(objects.clone(), state, config).map(|_| ()).map_err(|e| e.to_string())
        };
        let err = build(dir.path().join("absent.json")).expect_err("missing");
        assert!(
            err.contains("\"fhir-in\"") && err.contains("absent.json") && err.contains("cannot be read"),
            "{err}"
        );
        let not_json = dir.path().join("not-json.json");
        std::fs::write(&not_json, "type: object").expect("write");
        let err = build(not_json).expect_err("not JSON");
        assert!(err.contains("not-json.json") && err.contains("is not JSON"), "{err}");
        let invalid = dir.path().join("invalid.json");
        std::fs::write(&invalid, r#"{"type": "object", "minProperties": "three"}"#).expect("write");
        let err = build(invalid).expect_err("not a schema");
        assert!(err.contains("invalid.json") && err.contains("not a usable JSON Schema"), "{err}");
        let remote = dir.path().join("remote.json");
        std::fs::write(&remote, r#"{"$ref": "https://schemas.example.invalid/patient.json"}"#)
            .expect("write");
        assert!(build(remote).is_err(), "a remote $ref is refused, never fetched");
        let good = dir.path().join("good.json");
        std::fs::write(&good, r#"{"type": "object"}"#).expect("write");
        build(good).expect("a valid schema loads");
    }

    #[tokio::test]
    async fn allowed_event_fields_are_taken_from_accepted_json_objects_only() {
        let plain = Rules::default();
        let wanted = ["resourceType".to_owned(), "meta".to_owned()];
        let checks = Checks { rules: &plain, schema: None, fields: &wanted };
        let v = checked(checks, br#"{"resourceType":"Patient","meta":{"v":1},"name":"x"}"#, 1000).await;
        assert_eq!((v.rejection, v.fields.len()), (None, 1));
        assert_eq!(v.fields["resourceType"], serde_json::json!("Patient"));
        assert_eq!(v.fields_denied.len(), 1);
        assert_eq!(v.fields_denied[0].0, "meta");
        let not_json = checked(checks, b"plain text", 1000).await;
        assert_eq!((not_json.rejection, not_json.fields.len()), (None, 0), "fields alone reject nothing");
        let big = checked(checks, br#"{"resourceType":"Patient"}"#, 4).await;
        assert_eq!((big.rejection, big.fields.len()), (None, 0));
        let fhir = Rules { fhir_resource_types: Some(vec!["Patient".into()]), ..Rules::default() };
        let rejected = Checks { rules: &fhir, schema: None, fields: &wanted };
        let v = checked(rejected, br#"{"resourceType":"Observation"}"#, 1000).await;
        assert!(v.rejection.is_some() && v.fields.is_empty(), "a rejected object carries no fields");
    }

    #[tokio::test]
    async fn accepted_bodies_are_hashed_and_typed() {
        let v = body(&Rules::default(), "a/b.json", b"", 16).await;
        assert_eq!(v.rejection, None);
        assert_eq!(v.size, 0);
        assert_eq!(
            v.sha256.as_deref(),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            "zero-byte object"
        );
        assert_eq!(v.content_type.as_deref(), Some("application/json"));
        let big = vec![b'x'; 3 * CHUNK + 5];
        let v = body(&Rules::default(), "raw", &big, 16).await;
        assert_eq!((v.size, v.rejection, v.content_type), (big.len() as u64, None, None));
    }

    #[tokio::test]
    async fn json_rules_reject_malformed_and_oversized_bodies() {
        let rules = Rules { json_well_formed: true, ..Rules::default() };
        assert_eq!(body(&rules, "k", br#"{"a": [1, 2]}"#, 100).await.rejection, None);
        let bad = body(&rules, "k", br#"{"a": [1, 2"#, 100).await.rejection.expect("malformed");
        assert!(bad.starts_with("not well-formed JSON"), "{bad}");
        let empty = body(&rules, "k", b"", 100).await.rejection.expect("empty is not JSON");
        assert!(empty.starts_with("not well-formed JSON"), "{empty}");
        let over = body(&rules, "k", br#"{"a": "0123456789"}"#, 8).await;
        assert!(over.rejection.expect("over cap").contains("json_check_cap_bytes"));
        assert!(over.sha256.is_some(), "still hashed");
    }

    #[tokio::test]
    async fn fhir_rules_check_the_resource_type() {
        let rules = fhir(&["Patient"]);
        assert_eq!(
            body(&rules, "p.json", br#"{"resourceType":"Patient","id":"1"}"#, 1000).await.rejection,
            None
        );
        let wrong = body(&rules, "o.json", br#"{"resourceType":"Observation"}"#, 1000).await;
        assert_eq!(
            wrong.rejection.as_deref(),
            Some(r#"FHIR resourceType "Observation" is not allowed (allowed: Patient)"#)
        );
        let none = body(&rules, "x.json", br#"{"id":"1"}"#, 1000).await.rejection.expect("no type");
        assert!(none.contains("no resourceType"), "{none}");
        let array = body(&rules, "x.json", b"[1]", 1000).await.rejection.expect("array");
        assert!(array.contains("not a JSON object"), "{array}");
        let broken =
            body(&rules, "x.json", br#"{"resourceType":"Patient""#, 1000).await.rejection.expect("broken");
        assert!(broken.starts_with("not well-formed JSON"), "{broken}");
        let number = body(&rules, "x.json", br#"{"resourceType":7}"#, 1000).await.rejection.expect("number");
        assert!(number.contains("must be a string"), "{number}");
    }

    #[test]
    fn metadata_rules_decide_without_the_body() {
        let rules = Rules {
            max_size_bytes: Some(10),
            allowed_suffixes: vec![".JSON".into()],
            allowed_content_types: Some(vec!["application/json".into()]),
            ..Rules::default()
        };
        assert_eq!(check_metadata(&rules, "dir/a.json", 10, 0), None);
        assert!(check_metadata(&rules, "a.json", 11, 0).expect("big").contains("max_size_bytes of 10"));
        assert!(check_metadata(&rules, "a.csv", 1, 0).expect("suffix").contains("allowed suffix"));
        let types = Rules { allowed_content_types: Some(vec!["text/csv".into()]), ..Rules::default() };
        assert!(check_metadata(&types, "a.json", 1, 0).expect("type").contains("application/json"));
        assert!(check_metadata(&types, "noext", 1, 0).expect("unknown").contains("cannot be inferred"));
        let json = Rules { json_well_formed: true, ..Rules::default() };
        assert!(check_metadata(&json, "a.json", 17, 16).expect("cap").contains("cap for JSON checks"));
        assert_eq!(content_type_of("a.b/c"), None, "a dot in a directory is not a suffix");
    }
}
