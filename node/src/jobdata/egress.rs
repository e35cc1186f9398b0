//! Which output bodies may leave the site. A body is sent only when the signed manifest asks for
//! it (`egress_bodies`) AND the node's own policy (`[egress] allow_body_prefixes`) allows its
//! key, and only as UTF-8 text of at most `MAX_EGRESS_BODY_BYTES`. Everything else is refused.

use std::path::Path;

use outpost_protocol::MAX_EGRESS_BODY_BYTES;
use tokio::io::AsyncReadExt;

/// What the job asked for and what the node allows.
#[derive(Debug, Clone, Copy)]
pub struct Egress<'a> {
    /// `spec.egress_bodies`: exact keys, or prefixes ending in `/`.
    pub requested: &'a [String],
    /// `egress.allow_body_prefixes` of the node's configuration.
    pub allowed_prefixes: &'a [String],
}

/// The answer for one output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The manifest did not ask for this body: only metadata is reported.
    NotRequested,
    /// Send the body.
    Send(String),
    /// Asked for and refused, with the reason.
    Deny(String),
}

impl Egress<'_> {
    /// Whether the manifest asked for `key`'s body.
    pub fn requested(&self, key: &str) -> bool {
        self.requested
            .iter()
            .any(|entry| if entry.ends_with('/') { key.starts_with(entry.as_str()) } else { key == entry })
    }

    /// Whether the node's policy lets `key`'s body leave.
    pub fn allowed(&self, key: &str) -> bool {
        self.allowed_prefixes.iter().any(|p| !p.is_empty() && key.starts_with(p.as_str()))
    }

    /// Decide for the output `key` of `size` bytes whose content is the local file `file`.
    pub async fn decide(&self, key: &str, size: u64, file: &Path) -> Decision {
        if !self.requested(key) {
            return Decision::NotRequested;
        }
        if !self.allowed(key) {
            let why = if self.allowed_prefixes.is_empty() {
                "the node's egress policy allows no bodies (egress.allow_body_prefixes is empty)".to_owned()
            } else {
                format!(
                    "the key is under none of the node's egress.allow_body_prefixes {:?}",
                    self.allowed_prefixes
                )
            };
            return Decision::Deny(why);
        }
        if size > MAX_EGRESS_BODY_BYTES as u64 {
            return Decision::Deny(format!(
                "the body is {size} bytes, above the {MAX_EGRESS_BODY_BYTES}-byte limit for a body in a result"
            ));
        }
        match read_text(file).await {
            Ok(body) => Decision::Send(body),
            Err(why) => Decision::Deny(why),
        }
    }
}

/// The file as UTF-8 text, reading at most one byte past the limit.
async fn read_text(file: &Path) -> Result<String, String> {
    let opened = tokio::fs::File::open(file).await.map_err(|e| format!("the body could not be read: {e}"))?;
    let mut bytes = Vec::new();
    opened
        .take(MAX_EGRESS_BODY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("the body could not be read: {e}"))?;
    if bytes.len() > MAX_EGRESS_BODY_BYTES {
        return Err(format!(
            "the body is above the {MAX_EGRESS_BODY_BYTES}-byte limit for a body in a result"
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "the body is not UTF-8 text (invalid byte at offset {}); only text may be sent",
            e.utf8_error().valid_up_to()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn requests_match_exact_keys_or_prefixes_ending_in_a_slash() {
        let requested = strings(&["res/summary.txt", "res/logs/"]);
        let e = Egress { requested: &requested, allowed_prefixes: &[] };
        assert!(e.requested("res/summary.txt"));
        assert!(!e.requested("res/summary.txt.bak"), "an exact key is not a prefix");
        assert!(!e.requested("res/summary"));
        assert!(e.requested("res/logs/a.log"));
        assert!(e.requested("res/logs/deep/b.log"));
        assert!(!e.requested("res/logs"), "the prefix itself is not an object under it");
        assert!(!e.requested("res/other.txt"));
    }

    #[test]
    fn the_node_policy_allows_only_keys_under_its_prefixes_and_nothing_by_default() {
        let none = Egress { requested: &[], allowed_prefixes: &[] };
        assert!(!none.allowed("res/summary.txt"));
        let prefixes = strings(&["public/", ""]);
        let e = Egress { requested: &[], allowed_prefixes: &prefixes };
        assert!(e.allowed("public/x"));
        assert!(!e.allowed("publicity/x"));
        assert!(!e.allowed("private/x"), "an empty prefix never allows everything");
    }

    #[tokio::test]
    async fn a_body_is_sent_only_when_asked_allowed_small_and_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = dir.path().join("t");
        std::fs::write(&text, "hello\n").expect("write");
        let binary = dir.path().join("b");
        std::fs::write(&binary, [0x66, 0xff, 0x00]).expect("write");
        let requested = strings(&["r/"]);
        let allowed = strings(&["r/"]);
        let both = Egress { requested: &requested, allowed_prefixes: &allowed };

        assert_eq!(both.decide("r/t", 6, &text).await, Decision::Send("hello\n".into()));
        assert_eq!(both.decide("x/t", 6, &text).await, Decision::NotRequested);
        let not_allowed = Egress { requested: &requested, allowed_prefixes: &[] };
        assert!(
            matches!(not_allowed.decide("r/t", 6, &text).await, Decision::Deny(w) if w.contains("allows no bodies"))
        );
        assert!(matches!(both.decide("r/b", 3, &binary).await, Decision::Deny(w) if w.contains("not UTF-8")));
        let big = (MAX_EGRESS_BODY_BYTES + 1) as u64;
        assert!(matches!(both.decide("r/t", big, &text).await, Decision::Deny(w) if w.contains("limit")));
    }
}
