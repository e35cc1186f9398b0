//! The server's data directory: CA, server certificate, admin token and the sled database.
//! It creates what is missing on first start (secrets 0600, written atomically) and renews the
//! server certificate when its names change or it nears expiry; it never replaces the CA.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;

use crate::pki::{self, CertAuthority, PkiError};

/// Renew the server certificate when it has less than this left.
const RENEW_BEFORE_SECS: i64 = 30 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Pki { path: PathBuf, source: PkiError },
    #[error("{path} is empty or malformed; restore it or remove it to create a new one")]
    Malformed { path: PathBuf },
}

/// The paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// Everything the server needs from its data directory.
pub struct Materials {
    pub ca: CertAuthority,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub admin_token: String,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.crt")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("db")
    }

    /// Loads the directory's materials, creating whatever is missing. The server certificate
    /// covers localhost, 127.0.0.1, ::1, the hostname and `extra_sans`.
    pub fn load_or_init(&self, extra_sans: &[String]) -> Result<Materials, DataDirError> {
        if !self.root.exists() {
            fs::create_dir_all(&self.root).map_err(|source| io("create", &self.root, source))?;
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .map_err(|source| io("restrict permissions of", &self.root, source))?;
        }
        let ca = self.load_or_create_ca()?;
        let admin_token = match read_optional(&self.admin_token())? {
            Some(token) => nonempty(token, &self.admin_token())?,
            None => {
                let token = random_hex(32);
                write_secret(&self.admin_token(), &token)?;
                token
            }
        };
        let sans = wanted_sans(extra_sans);
        let (server_cert_pem, server_key_pem) = self.load_or_issue_server_cert(&ca, &sans)?;
        Ok(Materials { ca, server_cert_pem, server_key_pem, admin_token })
    }

    /// Reads the CA certificate without touching anything else (for `ca fingerprint`).
    pub fn read_ca(&self) -> Result<CertAuthority, DataDirError> {
        let cert = read(&self.ca_cert())?;
        let key = read(&self.ca_key())?;
        CertAuthority::from_pem(&cert, &key)
            .map_err(|source| DataDirError::Pki { path: self.ca_cert(), source })
    }

    fn load_or_create_ca(&self) -> Result<CertAuthority, DataDirError> {
        match (self.ca_cert().exists(), self.ca_key().exists()) {
            (true, true) => self.read_ca(),
            (false, false) => {
                let ca = CertAuthority::generate()
                    .map_err(|source| DataDirError::Pki { path: self.ca_cert(), source })?;
                write_secret(&self.ca_key(), &ca.key_pem())?;
                write_file(&self.ca_cert(), ca.cert_pem(), 0o644)?;
                Ok(ca)
            }
            // Never silently mint a new CA next to half of the old one: every node would break.
            (true, false) => Err(DataDirError::Malformed { path: self.ca_key() }),
            (false, true) => Err(DataDirError::Malformed { path: self.ca_cert() }),
        }
    }

    fn load_or_issue_server_cert(
        &self,
        ca: &CertAuthority,
        sans: &BTreeSet<String>,
    ) -> Result<(String, String), DataDirError> {
        if let (Some(cert), Some(key)) =
            (read_optional(&self.server_cert())?, read_optional(&self.server_key())?)
            && server_cert_is_current(ca, &cert, sans)
        {
            return Ok((cert, key));
        }
        let names: Vec<String> = sans.iter().cloned().collect();
        let (cert, key) = ca
            .issue_server_cert(&names)
            .map_err(|source| DataDirError::Pki { path: self.server_cert(), source })?;
        write_secret(&self.server_key(), &key)?;
        write_file(&self.server_cert(), &cert, 0o644)?;
        tracing::info!(sans = ?names, "issued a new server certificate");
        Ok((cert, key))
    }
}

/// True when the stored server certificate was issued by this CA, for exactly these names,
/// and is not about to expire.
fn server_cert_is_current(ca: &CertAuthority, cert_pem: &str, sans: &BTreeSet<String>) -> bool {
    let Ok(der) = pki::pem_to_der(cert_pem, "server.crt") else { return false };
    let same_issuer = matches!(
        (pki::subject_and_issuer(&der), pki::subject_and_issuer(ca.cert_der())),
        (Ok((_, issuer)), Ok((ca_subject, _))) if issuer == ca_subject
    );
    let same_names = pki::san_names(&der).is_ok_and(|names| &names == sans);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let fresh = pki::not_after_unix(&der).is_ok_and(|t| t - now > RENEW_BEFORE_SECS);
    same_issuer && same_names && fresh
}

/// The names the server certificate must carry.
pub fn wanted_sans(extra: &[String]) -> BTreeSet<String> {
    let mut names: BTreeSet<String> =
        ["localhost", "127.0.0.1", "::1"].iter().map(|s| pki::normalise_san(s)).collect();
    if let Some(host) = hostname() {
        names.insert(pki::normalise_san(&host));
    }
    names.extend(extra.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).map(pki::normalise_san));
    names
}

/// The machine's hostname, from the kernel (no libc call needed).
pub fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
}

/// `n` random bytes, hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> DataDirError {
    DataDirError::Io { action, path: path.to_owned(), source }
}

fn read(path: &Path) -> Result<String, DataDirError> {
    fs::read_to_string(path).map_err(|source| io("read", path, source))
}

fn read_optional(path: &Path) -> Result<Option<String>, DataDirError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io("read", path, source)),
    }
}

fn nonempty(s: String, path: &Path) -> Result<String, DataDirError> {
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err(DataDirError::Malformed { path: path.to_owned() });
    }
    Ok(trimmed.to_owned())
}

fn write_secret(path: &Path, contents: &str) -> Result<(), DataDirError> {
    write_file(path, contents, 0o600)
}

/// Writes through a temporary file and a rename, so a crash never leaves half a key.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), DataDirError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|source| io("create", &tmp, source))?;
    file.write_all(contents.as_bytes()).map_err(|source| io("write", &tmp, source))?;
    file.sync_all().map_err(|source| io("sync", &tmp, source))?;
    fs::rename(&tmp, path).map_err(|source| io("rename", &tmp, source))?;
    // Make the rename itself durable; a directory that cannot be opened only loses that.
    if let Some(dir) = path.parent().and_then(|p| fs::File::open(p).ok()) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_start_reuses_everything_and_renews_only_for_new_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let first = dir.load_or_init(&[]).unwrap();
        let second = dir.load_or_init(&[]).unwrap();
        assert_eq!(first.ca.fingerprint(), second.ca.fingerprint());
        assert_eq!(first.admin_token, second.admin_token);
        assert_eq!(first.server_cert_pem, second.server_cert_pem);
        assert_eq!(first.admin_token.len(), 64);

        let third = dir.load_or_init(&["outpost.example".into()]).unwrap();
        assert_ne!(third.server_cert_pem, first.server_cert_pem);
        assert_eq!(third.ca.fingerprint(), first.ca.fingerprint());
        let der = pki::pem_to_der(&third.server_cert_pem, "server").unwrap();
        assert!(pki::san_names(&der).unwrap().contains("outpost.example"));

        for secret in [dir.ca_key(), dir.server_key(), dir.admin_token()] {
            assert_eq!(fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600, "{secret:?}");
        }
    }

    #[test]
    fn half_a_ca_is_an_error_not_a_new_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        dir.load_or_init(&[]).unwrap();
        fs::remove_file(dir.ca_key()).unwrap();
        assert!(matches!(dir.load_or_init(&[]), Err(DataDirError::Malformed { .. })));
    }
}
