//! The server's data directory: CA, server certificate, admin token and the sled database.
//! It creates what is missing on first start (secrets 0600, written atomically) and renews the
//! server certificate when its names change or it nears expiry; it never replaces the CA on its
//! own.
//!
//! A CA rotation (`outpost-control ca rotate`) writes the next CA and a server certificate it
//! issued beside the current ones (`ca.next.*`, `server.next.*`), then `ca.rotation.json` (the
//! switch time and the old CA's signature over the announcement), which commits it. After the
//! switch, the next start (or the next rotation) moves them into place and keeps the old CA's
//! certificate as `ca.retired-<fingerprint>.crt`; each step can be repeated after a crash.

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
    /// A CA rotation under way.
    pub next: Option<NextCa>,
}

/// The CA a rotation switches to, with the server certificate it issued.
pub struct NextCa {
    pub ca: CertAuthority,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub rotation: Rotation,
}

/// What `ca.rotation.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// When the server switches to the next CA (Unix ms).
    pub switch_unix_ms: u64,
    /// The old CA's signature over the announcement (see `outpost_protocol::CaRotation`).
    pub signature_hex: String,
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
    /// The key that seals the organisations' signing secrets in a shared (PostgreSQL) store.
    pub fn store_key(&self) -> PathBuf {
        self.root.join("store.key")
    }

    /// The store key (32 bytes), created on first use. Every replica must hold the same one:
    /// it travels with the copy of the data directory.
    pub fn load_or_create_store_key(&self) -> Result<[u8; 32], DataDirError> {
        if let Some(key) = self.read_store_key()? {
            return Ok(key);
        }
        write_secret(&self.store_key(), &random_hex(32))?;
        self.read_store_key()?.ok_or(DataDirError::Malformed { path: self.store_key() })
    }

    /// The store key, when the data directory has one.
    pub fn read_store_key(&self) -> Result<Option<[u8; 32]>, DataDirError> {
        let Some(text) = read_optional(&self.store_key())? else { return Ok(None) };
        let bytes =
            hex::decode(text.trim()).map_err(|_| DataDirError::Malformed { path: self.store_key() })?;
        let key =
            <[u8; 32]>::try_from(bytes).map_err(|_| DataDirError::Malformed { path: self.store_key() })?;
        Ok(Some(key))
    }
    pub fn ca_next_key(&self) -> PathBuf {
        self.root.join("ca.next.key")
    }
    pub fn ca_next_cert(&self) -> PathBuf {
        self.root.join("ca.next.crt")
    }
    pub fn server_next_key(&self) -> PathBuf {
        self.root.join("server.next.key")
    }
    pub fn server_next_cert(&self) -> PathBuf {
        self.root.join("server.next.crt")
    }
    pub fn rotation(&self) -> PathBuf {
        self.root.join("ca.rotation.json")
    }

    /// Writes a CA rotation: the next CA and its server certificate first, then the rotation
    /// record that commits them.
    pub fn write_rotation(&self, next: &NextCa) -> Result<(), DataDirError> {
        write_secret(&self.ca_next_key(), &next.ca.key_pem())?;
        write_file(&self.ca_next_cert(), next.ca.cert_pem(), 0o644)?;
        write_secret(&self.server_next_key(), &next.server_key_pem)?;
        write_file(&self.server_next_cert(), &next.server_cert_pem, 0o644)?;
        let record = serde_json::to_string_pretty(&next.rotation).unwrap_or_default();
        write_file(&self.rotation(), &record, 0o644)
    }

    /// The rotation under way, if `ca.rotation.json` commits one.
    pub fn read_rotation(&self) -> Result<Option<NextCa>, DataDirError> {
        let Some(record) = read_optional(&self.rotation())? else { return Ok(None) };
        let rotation: Rotation =
            serde_json::from_str(&record).map_err(|_| DataDirError::Malformed { path: self.rotation() })?;
        let ca = CertAuthority::from_pem(&read(&self.ca_next_cert())?, &read(&self.ca_next_key())?)
            .map_err(|source| DataDirError::Pki { path: self.ca_next_cert(), source })?;
        Ok(Some(NextCa {
            ca,
            server_cert_pem: read(&self.server_next_cert())?,
            server_key_pem: read(&self.server_next_key())?,
            rotation,
        }))
    }

    /// Moves a rotation whose switch is at or before `now_ms` into place: the next CA and
    /// server certificate become the current ones, the old CA certificate is kept as
    /// `ca.retired-<fingerprint>.crt` and its key is gone. Repeatable after a crash at any step.
    pub fn finish_rotation(&self, now_ms: u64) -> Result<bool, DataDirError> {
        let Some(record) = read_optional(&self.rotation())? else { return Ok(false) };
        let rotation: Rotation =
            serde_json::from_str(&record).map_err(|_| DataDirError::Malformed { path: self.rotation() })?;
        // Once a file has moved the rotation is finished whatever the clock says (a clock set
        // back between two starts must not leave half a move).
        let begun = !self.ca_next_key().exists() || !self.ca_next_cert().exists();
        if rotation.switch_unix_ms > now_ms && !begun {
            return Ok(false);
        }
        let rename = |from: PathBuf, to: PathBuf| -> Result<(), DataDirError> {
            if from.exists() {
                fs::rename(&from, &to).map_err(|source| io("rename", &from, source))?;
            }
            Ok(())
        };
        if self.ca_next_key().exists() && self.ca_next_cert().exists() {
            let old = read(&self.ca_cert())?;
            let fingerprint = pki::pem_to_der(&old, "ca.crt")
                .map(|der| pki::sha256_hex(&der)[..16].to_owned())
                .unwrap_or_else(|_| "unreadable".into());
            let keep = self.root.join(format!("ca.retired-{fingerprint}.crt"));
            write_file(&keep, &old, 0o644)?;
        }
        rename(self.ca_next_key(), self.ca_key())?;
        rename(self.ca_next_cert(), self.ca_cert())?;
        rename(self.server_next_key(), self.server_key())?;
        rename(self.server_next_cert(), self.server_cert())?;
        fs::remove_file(self.rotation()).map_err(|source| io("remove", &self.rotation(), source))?;
        if let Ok(dir) = fs::File::open(&self.root) {
            let _ = dir.sync_all();
        }
        tracing::info!("finished the CA rotation: the new CA is the current one");
        Ok(true)
    }

    /// The CA whose certificates the server presents at `now_ms` (the next one of a rotation
    /// once its switch has come), without touching anything (for `ca fingerprint`).
    pub fn presented_ca(&self, now_ms: u64) -> Result<CertAuthority, DataDirError> {
        match self.read_rotation()? {
            Some(next) if next.rotation.switch_unix_ms <= now_ms => Ok(next.ca),
            _ => self.read_ca(),
        }
    }

    /// Loads the directory's materials, creating whatever is missing. The server certificate
    /// covers localhost, 127.0.0.1, ::1, the hostname and `extra_sans`.
    pub fn load_or_init(&self, extra_sans: &[String]) -> Result<Materials, DataDirError> {
        if !self.root.exists() {
            fs::create_dir_all(&self.root).map_err(|source| io("create", &self.root, source))?;
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .map_err(|source| io("restrict permissions of", &self.root, source))?;
        }
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.finish_rotation(now_ms)?;
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
        let next = self.read_rotation()?;
        Ok(Materials { ca, server_cert_pem, server_key_pem, admin_token, next })
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

    fn next_ca(switch_unix_ms: u64) -> NextCa {
        let ca = CertAuthority::generate().expect("CA");
        let (server_cert_pem, server_key_pem) = ca.issue_server_cert(&["localhost".into()]).expect("cert");
        NextCa {
            ca,
            server_cert_pem,
            server_key_pem,
            rotation: Rotation { switch_unix_ms, signature_hex: "00".into() },
        }
    }

    #[test]
    fn a_rotation_is_finished_only_after_its_switch_and_again_after_a_crash() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = DataDir::new(tmp.path());
        let first = dir.load_or_init(&[]).expect("init");
        assert!(first.next.is_none());
        let next = next_ca(1_000);
        let new_fingerprint = next.ca.fingerprint().to_owned();
        dir.write_rotation(&next).expect("written");
        assert_eq!(dir.read_rotation().expect("read").map(|n| n.rotation.switch_unix_ms), Some(1_000));
        assert_eq!(dir.presented_ca(999).expect("ca").fingerprint(), first.ca.fingerprint());
        assert_eq!(dir.presented_ca(1_000).expect("ca").fingerprint(), new_fingerprint);

        assert!(!dir.finish_rotation(999).expect("not yet"), "before the switch nothing moves");
        assert_eq!(dir.read_ca().expect("ca").fingerprint(), first.ca.fingerprint());

        // A crash after the key moved but before the certificate did: the next pass finishes.
        fs::rename(dir.ca_next_key(), dir.ca_key()).expect("half a move");
        assert!(matches!(dir.read_ca(), Err(DataDirError::Pki { .. })), "the half-moved pair does not load");
        assert!(dir.finish_rotation(1_000).expect("finished"));
        assert_eq!(dir.read_ca().expect("ca").fingerprint(), new_fingerprint);
        assert!(dir.read_rotation().expect("read").is_none());
        assert!(!dir.ca_next_cert().exists() && !dir.server_next_cert().exists());
        assert!(!dir.finish_rotation(2_000).expect("nothing to do"), "finishing twice changes nothing");

        // The server starts on the new CA with the certificate it issued.
        let again = dir.load_or_init(&[]).expect("load");
        assert_eq!(again.ca.fingerprint(), new_fingerprint);
        assert!(again.next.is_none());
    }

    #[test]
    fn a_damaged_rotation_record_is_an_error_not_a_silent_reset() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = DataDir::new(tmp.path());
        dir.load_or_init(&[]).expect("init");
        fs::write(dir.rotation(), "{").expect("write");
        assert!(matches!(dir.read_rotation(), Err(DataDirError::Malformed { .. })));
        assert!(dir.load_or_init(&[]).is_err());
    }

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
