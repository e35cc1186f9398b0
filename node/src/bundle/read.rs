//! Reading a bundle: the signed manifest first, then every part streamed to a staging
//! directory while its SHA-256 and size are checked against the manifest. Nothing is trusted
//! or applied before the whole file verified; every failure names the part and the reason.
//! Memory stays bounded whatever the bundle's size: parts are copied through a fixed buffer.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use outpost_protocol::{
    BundleManifest, BundlePart, MANIFEST_MEMBER, MAX_MANIFEST_BYTES, PublicKey, SignedEnvelope,
};
use sha2::{Digest, Sha256};

use super::BundleError;

/// A bundle whose signature, target, counter, expiry and every part verified, with the parts
/// meant for this node staged as files.
#[derive(Debug)]
pub struct Verified {
    pub manifest: BundleManifest,
    /// This node's counter in the manifest.
    pub counter: u64,
    /// The parts this node applies, each with its staged file, in manifest order.
    pub parts: Vec<(BundlePart, PathBuf)>,
}

/// What the reader checks the manifest against.
pub struct Expect<'a> {
    pub org_id: &'a str,
    pub org_keys: &'a [PublicKey],
    pub node_id: &'a str,
    pub now_unix_ms: u64,
}

/// Reads and checks only the signed manifest (for `bundle inspect`, and before staging).
pub fn manifest(path: &Path, expect: &Expect<'_>) -> Result<BundleManifest, BundleError> {
    let file = open(path)?;
    let decoder = zstd::stream::read::Decoder::new(file).map_err(|e| BundleError::Corrupt(e.to_string()))?;
    let mut archive = tar::Archive::new(decoder);
    let mut entries = archive.entries().map_err(corrupt)?;
    read_manifest(&mut entries, expect)
}

fn open(path: &Path) -> Result<File, BundleError> {
    File::open(path).map_err(|e| BundleError::Io { context: format!("open {}", path.display()), source: e })
}

fn corrupt(e: std::io::Error) -> BundleError {
    BundleError::Corrupt(e.to_string())
}

fn read_manifest<R: Read>(
    entries: &mut tar::Entries<'_, R>,
    expect: &Expect<'_>,
) -> Result<BundleManifest, BundleError> {
    let mut first = match entries.next() {
        Some(e) => e.map_err(corrupt)?,
        None => {
            return Err(BundleError::Corrupt("the file holds no manifest (empty or not a bundle)".into()));
        }
    };
    check_member(&first, MANIFEST_MEMBER)?;
    let size = first.header().size().map_err(corrupt)?;
    if size > MAX_MANIFEST_BYTES {
        return Err(BundleError::Corrupt(format!(
            "{MANIFEST_MEMBER} is {size} bytes, more than {MAX_MANIFEST_BYTES}"
        )));
    }
    let mut text = Vec::with_capacity(size as usize);
    (&mut first).take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut text).map_err(corrupt)?;
    let env: SignedEnvelope = serde_json::from_slice(&text)
        .map_err(|e| BundleError::Corrupt(format!("{MANIFEST_MEMBER} is not a signed envelope: {e}")))?;
    let verifier = crate::verify::ManifestVerifier::with_keys(expect.node_id, expect.org_keys)
        .map_err(BundleError::Signature)?;
    let payload = verifier.verify_payload(&env).map_err(|e| BundleError::Signature(e.to_string()))?;
    let manifest: BundleManifest = serde_json::from_str(payload)
        .map_err(|e| BundleError::Corrupt(format!("the signed manifest does not parse: {e}")))?;
    manifest.check().map_err(BundleError::Corrupt)?;
    if manifest.org_id != expect.org_id {
        return Err(BundleError::WrongTarget(format!(
            "the bundle is for organisation {}, this node belongs to {}",
            manifest.org_id, expect.org_id
        )));
    }
    if !manifest.counters.contains_key(expect.node_id) {
        let nodes: Vec<&str> = manifest.counters.keys().map(String::as_str).take(5).collect();
        return Err(BundleError::WrongTarget(format!(
            "the bundle is for node(s) {}, not this node ({})",
            nodes.join(", "),
            expect.node_id
        )));
    }
    if manifest.expires_unix_ms <= expect.now_unix_ms {
        return Err(BundleError::Expired { expires_unix_ms: manifest.expires_unix_ms });
    }
    Ok(manifest)
}

/// The member must be a plain file named exactly `want`.
fn check_member<R: Read>(entry: &tar::Entry<'_, R>, want: &str) -> Result<(), BundleError> {
    let raw = entry.path_bytes();
    let name = String::from_utf8_lossy(&raw).into_owned();
    let kind = entry.header().entry_type();
    if kind.is_symlink() || kind.is_hard_link() {
        return Err(BundleError::BadMember {
            member: name,
            reason: "a link; bundles hold plain files only".into(),
        });
    }
    if !kind.is_file() {
        return Err(BundleError::BadMember { member: name, reason: format!("not a plain file ({kind:?})") });
    }
    if name.starts_with('/') || name.split('/').any(|s| s == "..") {
        return Err(BundleError::BadMember { member: name, reason: "its path leaves the bundle".into() });
    }
    if name != want {
        return Err(BundleError::BadMember { member: name, reason: format!("expected {want} here") });
    }
    Ok(())
}

/// Verify the whole bundle and stage the parts this node applies under `staging` (created
/// here; the caller removes it on failure), or only verify them (`None`: `bundle inspect`).
/// `last_counter` is the counter of the last bundle this node imported.
pub fn verify_and_stage(
    path: &Path,
    expect: &Expect<'_>,
    last_counter: u64,
    staging: Option<&Path>,
    progress: &dyn Fn(u64),
) -> Result<Verified, BundleError> {
    let file = BufReader::with_capacity(256 * 1024, open(path)?);
    let decoder = zstd::stream::read::Decoder::with_buffer(file).map_err(corrupt)?;
    let mut archive = tar::Archive::new(decoder);
    let mut entries = archive.entries().map_err(corrupt)?;
    let manifest = read_manifest(&mut entries, expect)?;
    let counter = manifest.counters[expect.node_id];
    if counter <= last_counter && !super::apply::ack_only(&manifest.parts) {
        return Err(BundleError::Replayed { counter, last: last_counter });
    }
    let mine = |p: &BundlePart| p.node_id.as_deref().is_none_or(|n| n == expect.node_id);
    let keep = |p: &BundlePart| staging.is_some() && mine(p);
    if let Some(staging) = staging {
        let needed: u64 = manifest.parts.iter().filter(|p| mine(p)).map(|p| p.size).sum();
        super::check_free_space(staging, needed)?;
        std::fs::create_dir_all(staging)
            .map_err(|e| BundleError::Io { context: format!("create {}", staging.display()), source: e })?;
    }

    let mut parts = Vec::new();
    let mut done: u64 = 0;
    let mut buf = vec![0u8; 256 * 1024];
    for (i, part) in manifest.parts.iter().enumerate() {
        let mut entry = match entries.next() {
            Some(e) => {
                e.map_err(|e| BundleError::Truncated(format!("part {} ({}): {e}", part.name, part.label)))?
            }
            None => {
                return Err(BundleError::Truncated(format!(
                    "part {} ({}) is missing: the file ends after {i} of {} parts",
                    part.name,
                    part.label,
                    manifest.parts.len()
                )));
            }
        };
        check_member(&entry, &part.name)?;
        let declared = entry.header().size().map_err(corrupt)?;
        if declared != part.size {
            return Err(BundleError::BadMember {
                member: part.name.clone(),
                reason: format!("{declared} bytes in the tar, {} in the signed manifest", part.size),
            });
        }
        let dest = staging.map(|s| s.join(format!("{i:04}"))).unwrap_or_default();
        let mut out: Box<dyn Write> =
            if keep(part) {
                Box::new(std::io::BufWriter::new(File::create(&dest).map_err(|e| BundleError::Io {
                    context: format!("create {}", dest.display()),
                    source: e,
                })?))
            } else {
                Box::new(std::io::sink())
            };
        let mut hash = Sha256::new();
        let mut seen: u64 = 0;
        // Never more than the declared size: a member that goes on is refused at the bound.
        let mut limited = (&mut entry).take(part.size.saturating_add(1));
        loop {
            let n = limited
                .read(&mut buf)
                .map_err(|e| BundleError::Truncated(format!("part {} ({}): {e}", part.name, part.label)))?;
            if n == 0 {
                break;
            }
            seen += n as u64;
            if seen > part.size {
                return Err(BundleError::BadMember {
                    member: part.name.clone(),
                    reason: format!("larger than the {} bytes the manifest declares", part.size),
                });
            }
            hash.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| BundleError::Io { context: format!("write {}", dest.display()), source: e })?;
            done += n as u64;
            progress(done);
        }
        if seen != part.size {
            return Err(BundleError::Truncated(format!(
                "part {} ({}) has {seen} of its {} bytes",
                part.name, part.label, part.size
            )));
        }
        let got = hex::encode(hash.finalize());
        if got != part.sha256 {
            return Err(BundleError::Digest { part: part.name.clone(), label: part.label.clone() });
        }
        out.flush()
            .map_err(|e| BundleError::Io { context: format!("write {}", dest.display()), source: e })?;
        drop(out);
        if keep(part) {
            File::open(&dest)
                .and_then(|f| f.sync_all())
                .map_err(|e| BundleError::Io { context: format!("sync {}", dest.display()), source: e })?;
            parts.push((part.clone(), dest));
        }
    }
    if let Some(extra) = entries.next() {
        let name = extra.map(|e| String::from_utf8_lossy(&e.path_bytes()).into_owned());
        return Err(match name {
            Ok(name) => {
                BundleError::BadMember { member: name, reason: "not listed in the signed manifest".into() }
            }
            Err(e) => BundleError::Corrupt(format!("after the last part: {e}")),
        });
    }
    Ok(Verified { manifest, counter, parts })
}
