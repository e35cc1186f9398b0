//! Fields in events: which top-level JSON fields of an accepted object may ride in its event.
//! A field leaves the node only when its watch asks for it AND the node's egress policy
//! (`[egress] allow_event_fields`) allows it, and only as a short scalar. Nothing else of a
//! body ever goes into an event.

use std::collections::BTreeMap;

use serde_json::Value;

/// Longest string value carried, in characters.
pub const MAX_FIELD_STRING_CHARS: usize = 256;

/// A field withheld from an event, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub watch: String,
    pub field: String,
    pub reason: String,
}

impl Denial {
    /// The detail of its `egress.denied` audit entry.
    pub fn audit_detail(&self) -> String {
        format!("relay watch {:?}: event field {:?} withheld: {}", self.watch, self.field, self.reason)
    }
}

/// Split a watch's `event_fields` into those the policy allows and denials for the rest.
pub fn split_by_policy(watch: &str, requested: &[String], allowed: &[String]) -> (Vec<String>, Vec<Denial>) {
    let mut carry = Vec::new();
    let mut denied = Vec::new();
    for f in requested {
        if allowed.iter().any(|a| a == f) {
            carry.push(f.clone());
        } else {
            denied.push(Denial {
                watch: watch.to_owned(),
                field: f.clone(),
                reason: "not in the node's egress.allow_event_fields".into(),
            });
        }
    }
    (carry, denied)
}

/// What an object's body yields for its event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    pub fields: BTreeMap<String, Value>,
    /// Fields present but not carried: (name, reason).
    pub denied: Vec<(String, String)>,
}

/// Take the allowed `fields` from a parsed body. A field that is absent (or a body that is not
/// a JSON object) gives nothing; one whose value is not a short scalar is denied.
pub fn extract(body: &Value, fields: &[String]) -> Extracted {
    let mut out = Extracted::default();
    let Some(object) = body.as_object() else { return out };
    for name in fields {
        let Some(value) = object.get(name) else { continue };
        match refusal(value) {
            None => {
                out.fields.insert(name.clone(), value.clone());
            }
            Some(why) => out.denied.push((name.clone(), why)),
        }
    }
    out
}

fn refusal(value: &Value) -> Option<String> {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
        Value::String(s) if s.chars().count() <= MAX_FIELD_STRING_CHARS => None,
        Value::String(s) => Some(format!(
            "a string of {} characters, over the {MAX_FIELD_STRING_CHARS}-character limit",
            s.chars().count()
        )),
        Value::Array(_) => Some("an array; only scalars are carried".into()),
        Value::Object(_) => Some("an object; only scalars are carried".into()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn scalars_are_carried_and_missing_fields_are_absent() {
        let body = json!({"s": "Patient", "n": 1.5, "b": true, "z": null, "other": "secret"});
        let got = extract(&body, &names(&["s", "n", "b", "z", "missing"]));
        assert_eq!(got.denied, []);
        assert_eq!(got.fields.len(), 4);
        assert_eq!(got.fields["s"], json!("Patient"));
        assert_eq!(got.fields["z"], Value::Null);
        assert!(!got.fields.contains_key("other"), "only the named fields");
        assert!(!got.fields.contains_key("missing"));
        assert_eq!(extract(&json!([1, 2]), &names(&["0"])), Extracted::default(), "not an object");
    }

    #[test]
    fn objects_arrays_and_long_strings_are_denied_with_a_reason() {
        let long = "x".repeat(MAX_FIELD_STRING_CHARS + 1);
        let edge = "é".repeat(MAX_FIELD_STRING_CHARS);
        let body = json!({"o": {"a": 1}, "a": [1], "long": long, "edge": edge});
        let got = extract(&body, &names(&["o", "a", "long", "edge"]));
        assert_eq!(got.fields.keys().collect::<Vec<_>>(), ["edge"], "256 characters is still short");
        let why: BTreeMap<_, _> = got.denied.iter().cloned().collect();
        assert!(why["o"].contains("an object"));
        assert!(why["a"].contains("an array"));
        assert!(why["long"].contains("257 characters"));
    }

    #[test]
    fn the_policy_decides_which_requested_fields_may_leave() {
        let (carry, denied) =
            split_by_policy("w", &names(&["resourceType", "name"]), &names(&["resourceType"]));
        assert_eq!(carry, ["resourceType"]);
        assert_eq!(denied.len(), 1);
        assert_eq!(denied[0].field, "name");
        assert!(denied[0].audit_detail().contains("allow_event_fields"));
        let (carry, denied) = split_by_policy("w", &names(&["id"]), &[]);
        assert!(carry.is_empty(), "no policy: nothing leaves");
        assert_eq!(denied.len(), 1);
    }
}
