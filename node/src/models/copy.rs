//! Copies one model file into the store's `tmp/` while hashing it, checking its size as bytes
//! arrive (a source larger than the manifest says is cut off at once) and sniffing the first
//! bytes of weight files. Memory use is one fixed buffer, whatever the file size.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use outpost_protocol::{ModelFile, ModelFormat};
use sha2::{Digest, Sha256};

use super::{ModelError, Result};

const BUF_BYTES: usize = 1024 * 1024;
/// Bytes needed to recognise a weight file: safetensors' 8-byte header length and its `{`.
const SNIFF_BYTES: usize = 9;

/// Where an import stands, handed to the caller's progress callback after every chunk.
#[derive(Debug, Clone)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// The file being copied.
    pub file: String,
}

/// Copy `src` to a new file in `tmp_dir` and check it against `entry`; `sniff` names the
/// format when the file's extension says it holds the weights. Returns the temporary path;
/// on error nothing is left behind.
pub(crate) fn copy_verified(
    src: &mut dyn Read,
    entry: &ModelFile,
    sniff: Option<ModelFormat>,
    tmp_dir: &Path,
    progress: &mut Progress,
    report: &mut dyn FnMut(&Progress),
) -> Result<PathBuf> {
    let tmp = tmp_dir.join(format!("{}.{}", entry.sha256, uuid::Uuid::new_v4().simple()));
    let result = copy_into(src, entry, sniff, &tmp, progress, report);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| tmp)
}

fn copy_into(
    src: &mut dyn Read,
    entry: &ModelFile,
    sniff: Option<ModelFormat>,
    tmp: &Path,
    progress: &mut Progress,
    report: &mut dyn FnMut(&Progress),
) -> Result<()> {
    let mut out =
        File::create(tmp).map_err(|e| ModelError::io(format!("cannot create {}", tmp.display()), e))?;
    let mut hasher = Sha256::new();
    let mut head: Vec<u8> = Vec::with_capacity(SNIFF_BYTES);
    let mut buf = vec![0u8; BUF_BYTES];
    let mut got: u64 = 0;
    progress.file.clone_from(&entry.path);
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ModelError::io(format!("cannot read {}", entry.path), e)),
        };
        let chunk = buf.get(..n).unwrap_or_default();
        got += n as u64;
        if got > entry.size {
            return Err(ModelError::TooLarge { path: entry.path.clone(), want: entry.size });
        }
        if head.len() < SNIFF_BYTES {
            let take = (SNIFF_BYTES - head.len()).min(chunk.len());
            head.extend_from_slice(chunk.get(..take).unwrap_or_default());
            if head.len() == SNIFF_BYTES
                && let Some(format) = sniff
            {
                check_magic(&entry.path, format, &head, entry.size)?;
            }
        }
        hasher.update(chunk);
        out.write_all(chunk).map_err(|e| ModelError::io(format!("cannot write {}", tmp.display()), e))?;
        progress.done_bytes += n as u64;
        report(progress);
    }
    if got < entry.size {
        return Err(ModelError::Truncated { path: entry.path.clone(), want: entry.size, got });
    }
    if head.len() < SNIFF_BYTES
        && let Some(format) = sniff
    {
        check_magic(&entry.path, format, &head, entry.size)?;
    }
    let digest = hex::encode(hasher.finalize());
    if digest != entry.sha256 {
        return Err(ModelError::HashMismatch {
            path: entry.path.clone(),
            want: entry.sha256.clone(),
            got: digest,
        });
    }
    out.sync_all().map_err(|e| ModelError::io(format!("cannot sync {}", tmp.display()), e))
}

/// Cheap sanity checks of a weight file's first bytes, so a mislabelled file is refused with a
/// clear message rather than failing later inside an engine.
pub(crate) fn check_magic(path: &str, format: ModelFormat, head: &[u8], size: u64) -> Result<()> {
    let bad = |reason: String| ModelError::BadFormat { path: path.into(), format: format.as_str(), reason };
    match format {
        ModelFormat::Gguf => {
            let magic = head.get(..4).ok_or_else(|| bad(format!("only {} bytes long", head.len())))?;
            if magic != b"GGUF" {
                return Err(bad(format!("starts with {magic:02x?}, not the magic \"GGUF\"")));
            }
        }
        ModelFormat::Safetensors => {
            let (len, brace) = match (head.get(..8), head.get(8)) {
                (Some(len), Some(brace)) => (len, *brace),
                _ => return Err(bad(format!("only {} bytes long", head.len()))),
            };
            let mut le = [0u8; 8];
            le.copy_from_slice(len);
            let header_len = u64::from_le_bytes(le);
            if header_len == 0 || header_len > size.saturating_sub(8) {
                return Err(bad(format!("header length {header_len} does not fit a {size}-byte file")));
            }
            if brace != b'{' {
                return Err(bad("the JSON header does not start with '{'".into()));
            }
        }
    }
    Ok(())
}

/// The format to sniff for `path`: the model's format when the extension matches it.
pub(crate) fn sniff_for(path: &str, format: ModelFormat) -> Option<ModelFormat> {
    path.ends_with(&format!(".{}", format.as_str())).then_some(format)
}
