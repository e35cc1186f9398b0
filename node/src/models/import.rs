//! Imports a model from a directory (`manifest.json` beside the files) or a plain `.tar`
//! archive whose first file is `manifest.json`. The signature is checked before any file is
//! read; files are streamed through `StoreWriter::stage` into `tmp/`, and the manifest is committed
//! only after every listed file is in place.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use outpost_protocol::{ModelManifest, SignedModelManifest};

use super::copy::Progress;
use super::store::{InstalledModel, Staged, StoreWriter};
use super::{
    MANIFEST_FILE, MAX_MANIFEST_BYTES, ModelError, Publishers, Result, check_relative_path, verify_manifest,
};

impl StoreWriter<'_> {
    /// Import the model at `source` (a directory or a `.tar` file). `report` sees the bytes
    /// copied so far after every chunk.
    pub fn import(
        &self,
        source: &Path,
        trust: &Publishers,
        report: &mut dyn FnMut(&Progress),
    ) -> Result<InstalledModel> {
        let meta = std::fs::metadata(source)
            .map_err(|e| ModelError::io(format!("cannot read {}", source.display()), e))?;
        if meta.is_dir() {
            self.import_dir(source, trust, report)
        } else {
            self.import_tar(source, trust, report)
        }
    }

    fn import_dir(
        &self,
        dir: &Path,
        trust: &Publishers,
        report: &mut dyn FnMut(&Progress),
    ) -> Result<InstalledModel> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let file = match File::open(&manifest_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ModelError::NoManifest { path: dir.into() });
            }
            Err(e) => return Err(ModelError::io(format!("cannot read {}", manifest_path.display()), e)),
        };
        let signed = read_signed(file, &manifest_path.display().to_string())?;
        let (manifest, digest) = verify_manifest(&signed, trust)?;
        // Every file must be there, and be a plain file, before anything is copied.
        for f in &manifest.files {
            let path = dir.join(&f.path);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_file() => {}
                Ok(_) => {
                    return Err(ModelError::UnexpectedEntry {
                        entry: f.path.clone(),
                        reason: "not a regular file (links are not followed)".into(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ModelError::MissingFile { path: f.path.clone() });
                }
                Err(e) => return Err(ModelError::io(format!("cannot read {}", path.display()), e)),
            }
        }
        let mut progress = start(&manifest);
        let mut staged = Staged::default();
        for f in &manifest.files {
            let path = dir.join(&f.path);
            let mut src = File::open(&path)
                .map_err(|e| ModelError::io(format!("cannot open {}", path.display()), e))?;
            self.stage(&mut src, f, manifest.format, &mut staged, &mut progress, report)?;
        }
        self.commit(&signed, &digest, staged)?;
        Ok(InstalledModel { digest, manifest, signed })
    }

    fn import_tar(
        &self,
        file: &Path,
        trust: &Publishers,
        report: &mut dyn FnMut(&Progress),
    ) -> Result<InstalledModel> {
        let mut f =
            File::open(file).map_err(|e| ModelError::io(format!("cannot open {}", file.display()), e))?;
        refuse_compressed(&mut f, file)?;
        let mut archive = tar::Archive::new(BufReader::new(f));
        let read_err =
            |e: std::io::Error| ModelError::io(format!("cannot read the archive {}", file.display()), e);
        let mut verified: Option<(SignedModelManifest, ModelManifest, String)> = None;
        let mut done: BTreeSet<String> = BTreeSet::new();
        let mut staged = Staged::default();
        let mut progress = Progress { done_bytes: 0, total_bytes: 0, file: String::new() };
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            let kind = entry.header().entry_type();
            let raw = String::from_utf8(entry.path_bytes().into_owned()).map_err(|_| {
                ModelError::UnexpectedEntry {
                    entry: "(not UTF-8)".into(),
                    reason: "path is not UTF-8".into(),
                }
            })?;
            let path = normalise(&raw);
            if kind.is_pax_global_extensions() || (kind.is_dir() && path.is_empty()) {
                continue;
            }
            let refuse = |reason: String| ModelError::UnexpectedEntry { entry: raw.clone(), reason };
            check_relative_path(&path).map_err(|r| refuse(format!("unsafe path: {r}")))?;
            if kind.is_dir() {
                continue;
            }
            if !kind.is_file() {
                return Err(refuse(format!("{kind:?} entries (links, devices) are not accepted")));
            }
            let Some((_, manifest, _)) = &verified else {
                if path != MANIFEST_FILE {
                    return Err(refuse(format!(
                        "the archive's first file must be {MANIFEST_FILE} (build it with `tar -cf MODEL.tar -C DIR {MANIFEST_FILE} FILES...`)"
                    )));
                }
                let signed = read_signed(&mut entry, &format!("{}:{MANIFEST_FILE}", file.display()))?;
                let (manifest, digest) = verify_manifest(&signed, trust)?;
                progress = start(&manifest);
                verified = Some((signed, manifest, digest));
                continue;
            };
            let Some(listed) = manifest.files.iter().find(|f| f.path == path) else {
                return Err(refuse("not listed in the signed manifest".into()));
            };
            if !done.insert(path.clone()) {
                return Err(refuse("appears twice in the archive".into()));
            }
            self.stage(&mut entry, listed, manifest.format, &mut staged, &mut progress, report)?;
        }
        let Some((signed, manifest, digest)) = verified else {
            return Err(ModelError::NoManifest { path: file.into() });
        };
        if let Some(missing) = manifest.files.iter().find(|f| !done.contains(&f.path)) {
            return Err(ModelError::MissingFile { path: missing.path.clone() });
        }
        self.commit(&signed, &digest, staged)?;
        Ok(InstalledModel { digest, manifest, signed })
    }
}

fn start(manifest: &ModelManifest) -> Progress {
    Progress { done_bytes: 0, total_bytes: manifest.files.iter().map(|f| f.size).sum(), file: String::new() }
}

/// `./a/b` and `a/b/` name `a/b`.
fn normalise(raw: &str) -> String {
    let mut p = raw;
    while let Some(rest) = p.strip_prefix("./") {
        p = rest;
    }
    let p = if p == "." { "" } else { p };
    p.trim_end_matches('/').to_string()
}

/// Reads and parses a signed manifest (bounded), telling an unsigned one apart.
fn read_signed(src: impl Read, origin: &str) -> Result<SignedModelManifest> {
    let mut text = String::new();
    src.take(MAX_MANIFEST_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| ModelError::io(format!("cannot read {origin}"), e))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ModelError::InvalidManifest(format!(
            "{origin} is larger than {MAX_MANIFEST_BYTES} bytes"
        )));
    }
    serde_json::from_str(&text).map_err(|e| {
        let looks_unsigned = serde_json::from_str::<serde_json::Value>(&text)
            .map(|v| v.get("files").is_some() || v.get("signature_hex").is_none())
            .unwrap_or(false);
        if looks_unsigned {
            ModelError::Unsigned { path: origin.into(), message: e.to_string() }
        } else {
            ModelError::InvalidManifest(format!("{origin}: {e}"))
        }
    })
}

/// Only plain tar is read; say so clearly rather than failing on a garbled header.
fn refuse_compressed(f: &mut File, path: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut magic = [0u8; 6];
    let n = f.read(&mut magic).map_err(|e| ModelError::io(format!("cannot read {}", path.display()), e))?;
    f.seek(SeekFrom::Start(0)).map_err(|e| ModelError::io(format!("cannot read {}", path.display()), e))?;
    let head = magic.get(..n).unwrap_or_default();
    let compressed = head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]);
    if compressed {
        return Err(ModelError::InvalidManifest(format!(
            "{} is a compressed archive; give a plain .tar or the unpacked directory",
            path.display()
        )));
    }
    Ok(())
}
