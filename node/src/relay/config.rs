//! The relay's settings, shaped to become the `[relay]` section of the agent's config as is.
//! Plain data with defaults and `deny_unknown_fields`; [`RelayConfig::validate`] refuses what
//! would make the relay's persisted state ambiguous (duplicate or unsafe watch names).
//!
//! ```toml
//! [relay]
//! poll_interval_ms = 1000          # pause between scan passes
//! batch_size = 500                 # objects per listing page and per atomic state batch
//! reconcile_every = 60             # a reconciliation pass every this many scan passes
//! reconcile_after_activity = 3     # and this many scans after a scan found new objects
//! outbox_bound = 10000             # unsent events at which scanning pauses (back-pressure)
//! json_check_cap_bytes = 16777216  # larger objects are refused when a rule must parse them
//!
//! [[relay.watches]]
//! name = "fhir-in"
//! prefix = "incoming/fhir/"
//! [relay.watches.rules]
//! max_size_bytes = 104857600
//! allowed_suffixes = [".json"]
//! allowed_content_types = ["application/json"]
//! json_well_formed = true
//! fhir_resource_types = ["Patient", "Observation"]
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest accepted `batch_size`: one listing page of the object store.
pub const MAX_BATCH_SIZE: usize = crate::objstore::MAX_LIST_PAGE;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Milliseconds between scan passes when the relay runs as a loop.
    pub poll_interval_ms: u64,
    /// Objects listed per page and evaluated per atomic state batch (1..=1000).
    pub batch_size: usize,
    /// Run a reconciliation pass (a full listing of each watch) every this many scan passes;
    /// 0 turns periodic reconciliation off.
    pub reconcile_every: u32,
    /// After scans found new objects, reconcile once this many scans have passed: writers
    /// that put several objects at once land keys out of order, and a key that sorts before
    /// the cursor is only found by reconciliation. 0 leaves it to `reconcile_every`.
    pub reconcile_after_activity: u32,
    /// Unsent events at which the relay stops scanning until the uplink catches up. The
    /// outbox never holds more than this many events.
    pub outbox_bound: u64,
    /// Objects larger than this are refused by watches that must parse them (JSON, FHIR):
    /// the parser holds the whole document in memory.
    pub json_check_cap_bytes: u64,
    pub watches: Vec<Watch>,
    /// Local rules: an event matching one runs a job on this node at once, with no round trip
    /// to the control plane (air-gapped or latency-sensitive sites). Fires once per event.
    pub triggers: Vec<LocalTrigger>,
    /// The node's egress policy for event fields (`[egress] allow_event_fields`), set by the
    /// agent, never read from `[relay]`: a watch's `event_fields` outside it never leave.
    #[serde(skip)]
    pub allowed_event_fields: Vec<String>,
}

/// `[[relay.triggers]]`: "an event of this watch, under this prefix, with this suffix → run
/// `job` here with the object mounted at `/in/<key>`". The job is the site's own configuration
/// (root-owned like the rest of it), so it needs no signature; it is audited when it runs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTrigger {
    /// 1 to 64 of `A-Z a-z 0-9 _ . -`, unique among the triggers.
    pub name: String,
    /// Only events of this watch; any watch when absent.
    #[serde(default)]
    pub watch: Option<String>,
    #[serde(default)]
    pub key_prefix: String,
    #[serde(default)]
    pub key_suffix: Option<String>,
    /// Fire on rejected objects too (default: accepted ones only).
    #[serde(default)]
    pub include_rejected: bool,
    /// Each run's result is written to the local store as `<results_prefix><job id>.json`.
    #[serde(default = "default_results_prefix")]
    pub results_prefix: String,
    /// The job to run, in the same form as a job's `spec` (image by id, command, limits, …).
    pub job: outpost_protocol::ContainerSpec,
}

pub fn default_results_prefix() -> String {
    "outpost-results/".into()
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: 1000,
            batch_size: 500,
            reconcile_every: 60,
            reconcile_after_activity: 3,
            outbox_bound: 10_000,
            json_check_cap_bytes: 16 * 1024 * 1024,
            watches: Vec::new(),
            triggers: Vec::new(),
            allowed_event_fields: Vec::new(),
        }
    }
}

/// One watched prefix of the local object store and the rules its objects must pass.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    /// Names the watch's persisted cursor and index: 1 to 64 of `A-Z a-z 0-9 _ . -`.
    /// Renaming a watch starts it over from the beginning of its prefix.
    pub name: String,
    /// Key prefix to watch; empty watches the whole store.
    pub prefix: String,
    #[serde(default)]
    pub rules: Rules,
    /// Top-level JSON fields of accepted objects to carry in their events (scalars only).
    /// Only those also in the node's `[egress] allow_event_fields` are carried; the rest are
    /// withheld, named in the event's `fields_denied`, logged and audited.
    #[serde(default)]
    pub event_fields: Vec<String>,
}

/// Most `event_fields` one watch may ask for.
pub const MAX_EVENT_FIELDS: usize = 32;

/// What an object must satisfy to be accepted. Every rule that is unset lets everything pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    /// Larger objects are rejected without reading their body.
    pub max_size_bytes: Option<u64>,
    /// The key must end with one of these (compared ignoring ASCII case); empty allows any.
    pub allowed_suffixes: Vec<String>,
    /// The content type, inferred from the key's suffix (the port keeps no content type),
    /// must be one of these. An object whose type cannot be inferred is then rejected.
    pub allowed_content_types: Option<Vec<String>>,
    /// The body must be well-formed JSON.
    pub json_well_formed: bool,
    /// The body must be a JSON object whose `resourceType` is one of these.
    pub fhir_resource_types: Option<Vec<String>>,
    /// Absolute path of a JSON Schema (draft 2020-12 or 7, as its `$schema` says; 2020-12
    /// when absent) the body must satisfy. Loaded and compiled once when the relay is built;
    /// a `$ref` to anything outside the file is refused, never fetched.
    pub json_schema: Option<PathBuf>,
}

impl Rules {
    /// Whether checking these rules needs the whole body in memory.
    pub fn parses_json(&self) -> bool {
        self.json_well_formed || self.fhir_resource_types.is_some() || self.json_schema.is_some()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("relay configuration: {0}")]
pub struct ConfigError(pub String);

/// Watch and trigger names name persisted state and job ids: 1 to 64 of `A-Z a-z 0-9 _ . -`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl RelayConfig {
    fn validate_triggers(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.triggers {
            if !valid_name(&t.name) {
                return Err(ConfigError(format!(
                    "relay trigger name {:?} must be 1 to 64 of A-Z a-z 0-9 _ . -",
                    t.name
                )));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(ConfigError(format!("relay trigger name {:?} is used twice", t.name)));
            }
            if let Some(w) = &t.watch
                && !self.watches.iter().any(|x| &x.name == w)
            {
                return Err(ConfigError(format!(
                    "relay trigger {:?} names watch {w:?}, which is not configured",
                    t.name
                )));
            }
            if t.results_prefix.is_empty()
                || !t.results_prefix.ends_with('/')
                || t.results_prefix.starts_with('/')
            {
                return Err(ConfigError(format!(
                    "relay trigger {:?}: results_prefix {:?} must be a key prefix ending in '/' (e.g. \"outpost-results/\")",
                    t.name, t.results_prefix
                )));
            }
            crate::verify::check_container_spec(&t.job)
                .map_err(|e| ConfigError(format!("relay trigger {:?}: job: {e}", t.name)))?;
        }
        Ok(())
    }
    /// Refuse settings the relay cannot run with, saying which key to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(ConfigError(format!(
                "relay.batch_size = {} is outside 1..={MAX_BATCH_SIZE}",
                self.batch_size
            )));
        }
        if self.outbox_bound == 0 {
            return Err(ConfigError("relay.outbox_bound must be at least 1".into()));
        }
        self.validate_triggers()?;
        let mut seen = std::collections::BTreeSet::new();
        for w in &self.watches {
            if !valid_name(&w.name) {
                return Err(ConfigError(format!(
                    "watch name {:?} must be 1 to 64 of A-Z a-z 0-9 _ . -",
                    w.name
                )));
            }
            if !seen.insert(w.name.as_str()) {
                return Err(ConfigError(format!(
                    "watch name {:?} is used twice; names must be unique",
                    w.name
                )));
            }
            if let Some(types) = &w.rules.fhir_resource_types
                && types.is_empty()
            {
                return Err(ConfigError(format!(
                    "watch {:?}: fhir_resource_types is empty, which would reject every object; \
                     remove it or name the allowed types",
                    w.name
                )));
            }
            if let Some(path) = &w.rules.json_schema
                && !path.is_absolute()
            {
                return Err(ConfigError(format!(
                    "watch {:?}: json_schema {path:?} must be an absolute path",
                    w.name
                )));
            }
            check_event_fields(w)?;
        }
        Ok(())
    }
}

fn check_event_fields(w: &Watch) -> Result<(), ConfigError> {
    if w.event_fields.len() > MAX_EVENT_FIELDS {
        return Err(ConfigError(format!(
            "watch {:?}: event_fields names {} fields, more than {MAX_EVENT_FIELDS}",
            w.name,
            w.event_fields.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for f in &w.event_fields {
        if f.is_empty() || f.len() > 128 || f.chars().any(char::is_control) {
            return Err(ConfigError(format!(
                "watch {:?}: event field {f:?} must be 1 to 128 characters with no control character",
                w.name
            )));
        }
        if !seen.insert(f.as_str()) {
            return Err(ConfigError(format!("watch {:?}: event field {f:?} is named twice", w.name)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_section_takes_the_defaults_and_validates() {
        let c: RelayConfig = toml::from_str("").expect("parse");
        assert_eq!(c, RelayConfig::default());
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! [relay]"))
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let parsed: toml::Value = toml::from_str(&example).expect("example is TOML");
        let relay = parsed.get("relay").expect("[relay]").clone();
        let c: RelayConfig = relay.try_into().expect("example matches the struct");
        c.validate().expect("example is valid");
        assert_eq!(
            c.watches[0].rules.fhir_resource_types.as_deref(),
            Some(&["Patient".into(), "Observation".into()][..])
        );
    }

    #[test]
    fn unknown_keys_and_bad_names_are_refused() {
        assert!(toml::from_str::<RelayConfig>("poll_interval = 5").is_err(), "typo of poll_interval_ms");
        let dup = RelayConfig {
            watches: vec![
                Watch {
                    name: "a".into(),
                    prefix: "x/".into(),
                    rules: Rules::default(),
                    event_fields: vec![],
                },
                Watch {
                    name: "a".into(),
                    prefix: "y/".into(),
                    rules: Rules::default(),
                    event_fields: vec![],
                },
            ],
            ..RelayConfig::default()
        };
        assert!(dup.validate().expect_err("duplicate").0.contains("used twice"));
        let slash = RelayConfig {
            watches: vec![Watch {
                name: "a/b".into(),
                prefix: String::new(),
                rules: Rules::default(),
                event_fields: vec![],
            }],
            ..RelayConfig::default()
        };
        assert!(slash.validate().is_err());
        let batch = RelayConfig { batch_size: 0, ..RelayConfig::default() };
        assert!(batch.validate().expect_err("batch").0.contains("batch_size"));
    }

    #[test]
    fn schema_paths_must_be_absolute_and_event_fields_well_formed() {
        let cfg = |watch: &str| {
            toml::from_str::<RelayConfig>(&format!("[[watches]]\nname = \"w\"\nprefix = \"in/\"\n{watch}"))
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.0))
        };
        cfg("event_fields = [\"id\", \"resourceType\"]\n[watches.rules]\njson_schema = \"/etc/s.json\"\n")
            .expect("valid");
        let err = cfg("[watches.rules]\njson_schema = \"s.json\"\n").expect_err("relative");
        assert!(err.contains("json_schema") && err.contains("absolute"), "{err}");
        let err = cfg("event_fields = [\"id\", \"id\"]\n").expect_err("twice");
        assert!(err.contains("named twice"), "{err}");
        assert!(cfg("event_fields = [\"\"]\n").is_err(), "empty field name");
        let many: Vec<String> = (0..=MAX_EVENT_FIELDS).map(|i| format!("\"f{i}\"")).collect();
        assert!(cfg(&format!("event_fields = [{}]\n", many.join(","))).is_err(), "too many");
        assert!(
            toml::from_str::<RelayConfig>("allowed_event_fields = [\"x\"]").is_err(),
            "the egress policy is not a [relay] key"
        );
    }

    #[test]
    fn local_triggers_are_checked_like_any_job() {
        let cfg = |trigger: &str| {
            let text = format!(
                "[[watches]]\nname = \"in\"\nprefix = \"in/\"\n[[triggers]]\nname = \"t\"\n{trigger}"
            );
            toml::from_str::<RelayConfig>(&text)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.0))
        };
        let image = format!("sha256:{}", "a".repeat(64));
        cfg(&format!("watch = \"in\"\n[triggers.job]\nimage = \"{image}\"\n")).expect("valid");
        let err = cfg("[triggers.job]\nimage = \"busybox:latest\"\n").expect_err("tag");
        assert!(err.contains("relay trigger \"t\"") && err.contains("sha256"), "{err}");
        let err =
            cfg(&format!("watch = \"nope\"\n[triggers.job]\nimage = \"{image}\"\n")).expect_err("watch");
        assert!(err.contains("not configured"), "{err}");
        let err = cfg(&format!("results_prefix = \"/abs\"\n[triggers.job]\nimage = \"{image}\"\n"))
            .expect_err("prefix");
        assert!(err.contains("results_prefix"), "{err}");
        let err =
            cfg(&format!("[triggers.job]\nimage = \"{image}\"\ninputs = [\"../etc\"]\n")).expect_err("input");
        assert!(err.contains("inputs") || err.contains(".."), "{err}");
        assert!(cfg("[triggers.job]\nimage = \"x\"\nbogus = 1\n").is_err(), "unknown keys refused");
    }
}
