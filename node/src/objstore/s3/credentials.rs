//! S3 access keys, from a file (preferred) or the environment. The secret is never formatted:
//! `Debug` prints the key id only, and errors name the file, never its contents.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::Deserialize;

use super::super::{ObjectStoreError, Result};

/// Variables read by [`S3Credentials::from_env`] when no credentials file is configured.
pub const ENV_ACCESS_KEY_ID: &str = "OUTPOST_S3_ACCESS_KEY_ID";
pub const ENV_SECRET_ACCESS_KEY: &str = "OUTPOST_S3_SECRET_ACCESS_KEY";

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Credentials {
    access_key_id: String,
    secret_access_key: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"[redacted]")
            .finish()
    }
}

impl S3Credentials {
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Result<Self> {
        let c = S3Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
        };
        if c.access_key_id.trim().is_empty() || c.secret_access_key.trim().is_empty() {
            return Err(ObjectStoreError::Config("s3 access key id and secret must not be empty".into()));
        }
        Ok(c)
    }

    /// Read a TOML file with `access_key_id` and `secret_access_key`. The file must not be
    /// readable by others (mode `o-rwx`), as an ssh key would be.
    pub fn from_file(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ObjectStoreError::Config(format!("s3 credentials file {}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o007 != 0 {
            return Err(ObjectStoreError::Config(format!(
                "s3 credentials file {} is accessible to other users; run `chmod o-rwx` on it",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ObjectStoreError::Config(format!("s3 credentials file {}: {e}", path.display())))?;
        let parsed: S3Credentials = toml::from_str(&text).map_err(|e| {
            ObjectStoreError::Config(format!(
                "s3 credentials file {} must hold `access_key_id` and `secret_access_key` (TOML): {}",
                path.display(),
                e.message()
            ))
        })?;
        Self::new(parsed.access_key_id, parsed.secret_access_key)
    }

    /// Read [`ENV_ACCESS_KEY_ID`] and [`ENV_SECRET_ACCESS_KEY`] from `env`.
    pub fn from_env(env: &BTreeMap<String, String>) -> Result<Self> {
        match (env.get(ENV_ACCESS_KEY_ID), env.get(ENV_SECRET_ACCESS_KEY)) {
            (Some(id), Some(secret)) => Self::new(id.as_str(), secret.as_str()),
            _ => Err(ObjectStoreError::Config(format!(
                "no s3 credentials: set storage.s3.credentials_file, or {ENV_ACCESS_KEY_ID} and {ENV_SECRET_ACCESS_KEY}"
            ))),
        }
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub(super) fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_secret() {
        let c = S3Credentials::new("GKid", "very-secret").expect("valid");
        let shown = format!("{c:?}");
        assert!(shown.contains("GKid") && !shown.contains("very-secret"), "{shown}");
    }

    #[test]
    fn a_credentials_file_readable_by_others_is_refused_and_errors_hide_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s3.toml");
        std::fs::write(&path, "access_key_id = \"GKid\"\nsecret_access_key = \"very-secret\"\n")
            .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = S3Credentials::from_file(&path).expect_err("world-readable").to_string();
        assert!(err.contains("chmod"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(S3Credentials::from_file(&path).expect("loads").access_key_id(), "GKid");

        std::fs::write(&path, "access_key_id = \"GKid\"\nsecret = \"very-secret\"\n").expect("write");
        let err = S3Credentials::from_file(&path).expect_err("unknown field").to_string();
        assert!(!err.contains("very-secret"), "{err}");
    }

    #[test]
    fn env_credentials_need_both_variables() {
        let mut env = BTreeMap::new();
        env.insert(ENV_ACCESS_KEY_ID.to_string(), "GKid".to_string());
        assert!(S3Credentials::from_env(&env).is_err());
        env.insert(ENV_SECRET_ACCESS_KEY.to_string(), "s".to_string());
        assert!(S3Credentials::from_env(&env).is_ok());
    }
}
