//! An organisation's settings, held by the control plane and delivered to its nodes in poll
//! answers (to agents that announce [`crate::capability::ORG_SETTINGS`]): features turned off for
//! the whole organisation, and the deployment profile of nodes whose own configuration names
//! none.

use serde::{Deserialize, Serialize};

/// Features an organisation can turn off, each a kind of work. Off: the control plane refuses
/// to submit or deploy that work to the organisation's nodes, and each node refuses it too
/// (whatever brought it: a poll, a bundle, a local trigger).
pub mod feature {
    /// Container jobs (`kind: container`).
    pub const CONTAINERS: &str = "containers";
    /// Inference jobs (`kind: generate`, `kind: embed`).
    pub const INFERENCE: &str = "inference";
    /// Long-running services (deployments).
    pub const SERVICES: &str = "services";
    /// Every feature, in the order listings show them.
    pub const ALL: &[&str] = &[CONTAINERS, INFERENCE, SERVICES];
}

/// Profiles an organisation may name as its nodes' default. `air-gapped` is not one: a node
/// given it would stop dialling the control plane, and so could never be told otherwise.
pub const ORG_DEFAULT_PROFILES: &[&str] = &["cloud", "hybrid", "on-prem"];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OrgSettings {
    /// One more at every change (0: never set).
    #[serde(default)]
    pub revision: u64,
    /// The profile of nodes whose configuration names none (one of [`ORG_DEFAULT_PROFILES`]);
    /// absent: the agent's own default (`on-prem`). A node takes a new one at its next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_profile: Option<String>,
    /// [`feature`] names turned off, sorted, each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features_off: Vec<String>,
    #[serde(default)]
    pub updated_unix_ms: u64,
}

impl OrgSettings {
    /// Whether `feature` is on.
    pub fn enabled(&self, feature: &str) -> bool {
        !self.features_off.iter().any(|f| f == feature)
    }

    /// One line for audit trails and logs.
    pub fn summary(&self) -> String {
        format!(
            "revision {}: default profile {}, features off: {}",
            self.revision,
            self.default_profile.as_deref().unwrap_or("(the agent's own)"),
            if self.features_off.is_empty() { "none".to_owned() } else { self.features_off.join(", ") }
        )
    }

    /// What an agent can apply of settings from a control plane that may be newer than it:
    /// features and a profile it does not know are left out (and named, for its log); the rest
    /// holds.
    pub fn known(mut self) -> (Self, Vec<String>) {
        let mut unknown = Vec::new();
        self.features_off.retain(|f| {
            let known = feature::ALL.contains(&f.as_str());
            if !known {
                unknown.push(format!("feature {f:?}"));
            }
            known
        });
        if let Some(p) = self.default_profile.take() {
            if ORG_DEFAULT_PROFILES.contains(&p.as_str()) {
                self.default_profile = Some(p);
            } else {
                unknown.push(format!("default profile {p:?}"));
            }
        }
        self.features_off.sort();
        self.features_off.dedup();
        (self, unknown)
    }

    /// Refuses unknown features and profiles; sorts and dedups the features.
    pub fn normalise(mut self) -> Result<Self, String> {
        if let Some(unknown) = self.features_off.iter().find(|f| !feature::ALL.contains(&f.as_str())) {
            return Err(format!(
                "features_off: unknown feature {unknown:?} (known: {})",
                feature::ALL.join(", ")
            ));
        }
        self.features_off.sort();
        self.features_off.dedup();
        if let Some(p) = &self.default_profile
            && !ORG_DEFAULT_PROFILES.contains(&p.as_str())
        {
            let why = if p == "air-gapped" {
                "an air-gapped node never dials the control plane, so it could not be told otherwise; \
                 name it in that node's own configuration"
                    .to_owned()
            } else {
                format!("use one of {}", ORG_DEFAULT_PROFILES.join(", "))
            };
            return Err(format!("default_profile {p:?}: {why}"));
        }
        Ok(self)
    }
}

/// `PUT /v1/orgs/{org_id}/settings`: the whole new settings. `revision`, when given, must be
/// the one in force (a change made meanwhile by someone else is then a 409, not lost).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PutOrgSettings {
    #[serde(default)]
    pub default_profile: Option<String>,
    #[serde(default)]
    pub features_off: Vec<String>,
    #[serde(default)]
    pub revision: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_features_and_profiles_are_refused_by_name() {
        let s = OrgSettings { features_off: vec!["gpu".into()], ..Default::default() };
        assert!(s.normalise().unwrap_err().contains("\"gpu\""));
        let s = OrgSettings { default_profile: Some("air-gapped".into()), ..Default::default() };
        assert!(s.normalise().unwrap_err().contains("never dials"));
        let s = OrgSettings { default_profile: Some("edge".into()), ..Default::default() };
        assert!(s.normalise().unwrap_err().contains("cloud, hybrid, on-prem"));
    }

    #[test]
    fn features_are_sorted_once_and_checked() {
        let s = OrgSettings {
            features_off: vec!["services".into(), "inference".into(), "services".into()],
            default_profile: Some("hybrid".into()),
            ..Default::default()
        }
        .normalise()
        .unwrap();
        assert_eq!(s.features_off, ["inference", "services"]);
        assert!(!s.enabled("inference") && s.enabled("containers"));
        // What a newer control plane may name is left out by an agent that does not know it.
        let newer = OrgSettings {
            features_off: vec!["gpu".into(), "inference".into()],
            default_profile: Some("edge".into()),
            ..Default::default()
        };
        let (kept, unknown) = newer.known();
        assert_eq!(
            (kept.features_off.as_slice(), kept.default_profile),
            (["inference".to_owned()].as_slice(), None)
        );
        assert_eq!(unknown, ["feature \"gpu\"", "default profile \"edge\""]);
        // An old peer's settings (no fields at all) read as all on.
        let old: OrgSettings = serde_json::from_str("{}").unwrap();
        assert!(feature::ALL.iter().all(|f| old.enabled(f)));
    }
}
