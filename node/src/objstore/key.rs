//! Object keys: the rules every adapter applies before touching storage. A key is opaque bytes
//! of UTF-8 to the port: `/`, `..`, spaces and unicode mean nothing special here, and adapters
//! must store them as given rather than interpret them as paths.

use super::{ObjectStoreError, Result};

/// S3's limit, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// Accept `key` if it is non-empty, at most [`MAX_KEY_BYTES`] bytes, and free of control
/// characters (NUL, C0, DEL, C1: they break XML listings, logs and terminals).
pub fn validate(key: &str) -> Result<()> {
    let refuse = |reason: String| Err(ObjectStoreError::InvalidKey { key: key.to_string(), reason });
    if key.is_empty() {
        return refuse("a key must not be empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return refuse(format!(
            "a key may be at most {MAX_KEY_BYTES} bytes of UTF-8; this one is {}",
            key.len()
        ));
    }
    if let Some((at, c)) = key.char_indices().find(|(_, c)| c.is_control()) {
        return refuse(format!("control character U+{:04X} at byte {at} is not allowed in a key", c as u32));
    }
    Ok(())
}

/// Prefixes follow the key rules except that the empty prefix (everything) is allowed.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() { Ok(()) } else { validate(prefix) }
}

/// True when a `/`-separated segment of `key` is `.` or `..`. URL parsers resolve such
/// segments, so an HTTP client that builds URLs from keys would address a different object.
pub fn has_dot_segment(key: &str) -> bool {
    key.split('/').any(|s| s == "." || s == "..")
}

/// A key as it may appear in a log line or error message: escaped, and cut at 80 characters
/// so a 1 KiB hostile key does not flood the log.
pub fn display(key: &str) -> String {
    const SHOWN: usize = 80;
    let mut chars = key.chars();
    let head: String = chars.by_ref().take(SHOWN).collect();
    if chars.next().is_some() { format!("{head:?}… ({} bytes)", key.len()) } else { format!("{head:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_spaces_unicode_dots_and_slashes_are_valid() {
        for k in
            ["a b/ü/../x", "/leading", "trailing/", "a//b", "..", ".", "日本語", "x".repeat(1024).as_str()]
        {
            assert!(validate(k).is_ok(), "{k:?}");
        }
    }

    #[test]
    fn empty_overlong_and_control_keys_are_refused_with_a_reason() {
        let long = "x".repeat(1025);
        for (k, why) in [
            ("", "empty"),
            (long.as_str(), "1024"),
            ("a\0b", "U+0000"),
            ("a\nb", "U+000A"),
            ("\u{85}", "U+0085"),
        ] {
            let err = validate(k).expect_err("must be refused").to_string();
            assert!(err.contains(why), "{k:?}: {err}");
        }
        // 1,024 bytes of two-byte characters is fine, one more byte is not.
        assert!(validate(&"ü".repeat(512)).is_ok());
        assert!(validate(&format!("{}x", "ü".repeat(512))).is_err());
    }

    #[test]
    fn dot_segments_are_found_only_as_whole_segments() {
        assert!(has_dot_segment("a/../b"));
        assert!(has_dot_segment("./a"));
        assert!(has_dot_segment("a/.."));
        assert!(!has_dot_segment("a..b/.c/..d"));
    }

    #[test]
    fn long_keys_are_cut_in_messages() {
        let shown = display(&"k".repeat(1024));
        assert!(shown.len() < 120, "{shown}");
        assert!(shown.contains("1024 bytes"));
        assert_eq!(display("a\"b"), "\"a\\\"b\"");
    }
}
