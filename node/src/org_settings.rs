//! The organisation's settings as this node last heard them from its control plane (in a poll
//! answer): kept in `data_dir/org-settings.json` so that they hold across restarts and while
//! the control plane is out of reach. Features the organisation turned off are refused by the
//! node's one gate for work (the site policy); the organisation's default profile applies at the
//! next start, and only where the node's own configuration names no profile.

use std::path::Path;

use outpost_protocol::{OrgSettings, feature};

use crate::policy::Kind;

/// In the data directory.
pub const ORG_SETTINGS_FILE: &str = "org-settings.json";

/// Largest settings file read (they are a few hundred bytes).
const MAX_BYTES: u64 = 64 * 1024;

/// The settings last heard, if any.
pub fn load(data_dir: &Path) -> Result<Option<OrgSettings>, String> {
    let path = data_dir.join(ORG_SETTINGS_FILE);
    let damaged = |why: String| {
        format!(
            "{} is damaged ({why}): remove it; the agent fetches the organisation's settings again at its next poll",
            path.display()
        )
    };
    let bytes = match std::fs::metadata(&path) {
        Ok(m) if m.len() > MAX_BYTES => return Err(damaged(format!("{} bytes", m.len()))),
        Ok(_) => std::fs::read(&path).map_err(|e| damaged(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(damaged(e.to_string())),
    };
    let settings: OrgSettings = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
    Ok(Some(settings.known().0))
}

/// Keeps `settings` (synced, renamed into place).
pub fn save(data_dir: &Path, settings: &OrgSettings) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(settings).map_err(std::io::Error::other)?;
    crate::bundle::apply::write_durably(&data_dir.join(ORG_SETTINGS_FILE), &bytes)
}

/// The kinds of work the features turned off cover.
pub fn kinds_off(settings: &OrgSettings) -> Vec<Kind> {
    let mut kinds = Vec::new();
    for f in &settings.features_off {
        match f.as_str() {
            feature::CONTAINERS => kinds.push(Kind::Container),
            feature::INFERENCE => kinds.extend([Kind::Generate, Kind::Embed]),
            feature::SERVICES => kinds.push(Kind::Service),
            _ => {}
        }
    }
    kinds
}

/// What a poll answer's settings change here: kept, put in force at the gate, audited. `Ok(false)`
/// when they are the ones in force already.
pub fn heard(
    data_dir: &Path,
    policy: &crate::policy::Current,
    ledger: &crate::ledger::Ledger,
    settings: OrgSettings,
) -> anyhow::Result<bool> {
    let (settings, unknown) = settings.known();
    let held = policy.get();
    if held.org.as_ref() == Some(&settings) {
        return Ok(false);
    }
    let profile_changed =
        held.org.as_ref().and_then(|o| o.default_profile.clone()) != settings.default_profile;
    if !unknown.is_empty() {
        tracing::warn!(
            left_out = %unknown.join(", "),
            "the organisation's settings name what this agent does not know (a newer control plane); the rest applies"
        );
    }
    save(data_dir, &settings)?;
    ledger.audit("org.settings", &settings.summary())?;
    if profile_changed {
        tracing::info!(
            profile = settings.default_profile.as_deref().unwrap_or("(none)"),
            "the organisation's default profile changed; it applies at the next start where the configuration names no profile"
        );
    }
    tracing::info!(revision = settings.revision, features_off = ?settings.features_off, "organisation settings in force");
    policy.set_org(Some(settings));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_a_restart_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let s = OrgSettings {
            revision: 4,
            default_profile: Some("cloud".into()),
            features_off: vec!["inference".into()],
            updated_unix_ms: 9,
        };
        save(dir.path(), &s).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(s.clone()));
        assert_eq!(kinds_off(&s), [Kind::Generate, Kind::Embed]);
        std::fs::write(dir.path().join(ORG_SETTINGS_FILE), b"{\"revision\": ").unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(err.contains("damaged") && err.contains("remove it"), "{err}");
        // A feature of a newer control plane is left out, not a reason to refuse the rest.
        std::fs::write(dir.path().join(ORG_SETTINGS_FILE), b"{\"features_off\": [\"gpu\", \"services\"]}")
            .unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap().features_off, ["services"]);
    }
}
