//! The `json_schema` rule: a watch's JSON Schema, read and compiled once when the relay is
//! built, then checked against each parsed body. It never fetches anything: a `$ref` outside
//! the schema file is a load error. Rejection reasons name paths, never the object's values.

use std::path::Path;

use super::config::ConfigError;

/// Validation errors named in one rejection reason.
const MAX_ERRORS: usize = 3;
/// Longest rejection reason, in characters.
const MAX_REASON_CHARS: usize = 300;
/// Largest schema file read.
const MAX_SCHEMA_BYTES: u64 = 4 * 1024 * 1024;

/// A compiled JSON Schema.
pub struct Schema {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Schema")
    }
}

impl Schema {
    /// Read and compile the schema at `path` for the watch `watch`.
    pub fn load(watch: &str, path: &Path) -> Result<Self, ConfigError> {
        let fail =
            |what: String| ConfigError(format!("watch {watch:?}: json_schema {}: {what}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot be read: {e}")))?;
        if meta.len() > MAX_SCHEMA_BYTES {
            return Err(fail(format!("is {} bytes, over the {MAX_SCHEMA_BYTES}-byte limit", meta.len())));
        }
        let text = std::fs::read(path).map_err(|e| fail(format!("cannot be read: {e}")))?;
        let doc: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| fail(format!("is not JSON: {e}")))?;
        Self::compile(&doc).map_err(fail)
    }

    /// Compile a schema document; a reference to anything outside it is an error.
    pub fn compile(doc: &serde_json::Value) -> Result<Self, String> {
        let validator = jsonschema::options()
            .offline()
            .build(doc)
            .map_err(|e| format!("is not a usable JSON Schema: {}", bounded(&e.to_string())))?;
        Ok(Self { validator })
    }

    /// `None` when `value` satisfies the schema; otherwise a reason naming the first few
    /// failures by their JSON pointer, with the object's values masked.
    pub fn check(&self, value: &serde_json::Value) -> Option<String> {
        let mut errors = self.validator.iter_errors(value);
        let first = errors.next()?;
        let mut parts = vec![describe(&first)];
        let mut more = 0usize;
        for e in errors {
            if parts.len() < MAX_ERRORS {
                parts.push(describe(&e));
            } else {
                more += 1;
            }
        }
        let mut reason = format!("does not match the watch's JSON Schema: {}", parts.join("; "));
        if more > 0 {
            reason.push_str(&format!(" (and {more} more)"));
        }
        Some(bounded(&reason))
    }
}

fn describe(e: &jsonschema::ValidationError<'_>) -> String {
    let path = e.instance_path().to_string();
    let at = if path.is_empty() { "/".to_owned() } else { path };
    format!("at {at}: {}", e.masked())
}

/// At most `MAX_REASON_CHARS` characters, marked when cut.
fn bounded(s: &str) -> String {
    if s.chars().count() <= MAX_REASON_CHARS {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(MAX_REASON_CHARS - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema(doc: serde_json::Value) -> Schema {
        Schema::compile(&doc).expect("valid schema")
    }

    #[test]
    fn reasons_name_paths_mask_values_and_stay_short() {
        let s = schema(json!({
            "type": "object",
            "required": ["id"],
            "properties": {"id": {"type": "string"}, "n": {"type": "integer", "maximum": 3}}
        }));
        assert_eq!(s.check(&json!({"id": "a", "n": 2})), None);
        let r = s.check(&json!({"id": 7, "n": 9})).expect("invalid");
        assert!(r.contains("/id") && r.contains("/n"), "{r}");
        assert!(!r.contains('9') && !r.contains('7'), "values are masked: {r}");
        let r = s.check(&json!({})).expect("missing id");
        assert!(r.contains("at /:") && r.contains("id"), "{r}");
        let wide = schema(json!({"type": "object", "additionalProperties": {"type": "string"}}));
        let bad: serde_json::Map<String, serde_json::Value> =
            (0..50).map(|i| (format!("field-with-a-longish-name-{i:02}"), json!(i))).collect();
        let r = wide.check(&serde_json::Value::Object(bad)).expect("invalid");
        assert!(r.chars().count() <= MAX_REASON_CHARS, "{}", r.len());
        assert_eq!(r.matches("at /").count(), MAX_ERRORS, "{r}");
    }

    #[test]
    fn invalid_and_remote_schemas_are_refused() {
        let err = Schema::compile(&json!({"type": "no-such-type"})).expect_err("bad type");
        assert!(err.contains("not a usable JSON Schema"), "{err}");
        let remote = json!({"$ref": "https://schemas.example.invalid/s.json"});
        assert!(Schema::compile(&remote).is_err(), "a remote $ref is an error, not a fetch");
        let file = json!({"$ref": "file:///etc/outpost/other.json"});
        assert!(Schema::compile(&file).is_err(), "nor is a file $ref read");
        let draft7 = json!({"$schema": "http://json-schema.org/draft-07/schema#", "type": "array"});
        assert!(Schema::compile(&draft7).expect("draft 7").check(&json!([])).is_none());
    }

    #[test]
    fn loading_names_the_watch_and_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.json");
        let err = Schema::load("w", &missing).expect_err("missing").0;
        assert!(
            err.contains("watch \"w\"") && err.contains("missing.json") && err.contains("cannot be read")
        );
        let not_json = dir.path().join("s.json");
        std::fs::write(&not_json, "{ nope").expect("write");
        assert!(Schema::load("w", &not_json).expect_err("not json").0.contains("is not JSON"));
    }
}
