//! GGUF checks before any native code sees the file: header, metadata and tensor table are
//! parsed with a bound on every count and length, and each tensor must lie inside the file, at
//! its alignment, without overlapping another. It reads the file; it never trusts a length.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::{InferenceError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 20;
const MAX_KEY_BYTES: u64 = 64 * 1024;
const MAX_STRING_BYTES: u64 = 16 << 20;
const MAX_ARRAY_LEN: u64 = 1 << 26;
const MAX_DIMS: u32 = 4;
const MAX_NAME_BYTES: u64 = 64;
const DEFAULT_ALIGNMENT: u64 = 32;

/// What the checks learned about a GGUF file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GgufInfo {
    pub version: u32,
    pub tensor_count: u64,
    pub file_bytes: u64,
    /// `general.architecture` (e.g. `llama`).
    pub architecture: String,
    /// `<arch>.context_length`.
    pub context_length: Option<u64>,
    /// `<arch>.block_count`.
    pub block_count: Option<u64>,
    /// `<arch>.embedding_length`.
    pub embedding_length: Option<u64>,
    /// `<arch>.attention.head_count`.
    pub head_count: Option<u64>,
    /// `<arch>.attention.head_count_kv`.
    pub head_count_kv: Option<u64>,
    /// Bytes of tensor data the table describes.
    pub tensor_bytes: u64,
}

/// Checks a GGUF file. Errors are `InferenceError::InvalidModel` naming the file and the fault.
pub fn check(path: &Path) -> Result<GgufInfo> {
    let invalid = |reason: String| InferenceError::InvalidModel {
        path: path.display().to_string(),
        format: "GGUF",
        reason,
    };
    let file = File::open(path).map_err(|e| invalid(format!("cannot open: {e}")))?;
    let len = file.metadata().map_err(|e| invalid(format!("cannot stat: {e}")))?.len();
    let mut r = Reader { inner: BufReader::with_capacity(256 * 1024, file), pos: 0, len };
    parse(&mut r).map_err(invalid)
}

struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

type Parse<T> = std::result::Result<T, String>;

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Parse<[u8; N]> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|_| self.truncated())?;
        self.pos += N as u64;
        Ok(buf)
    }
    fn truncated(&self) -> String {
        format!("truncated: the file ends at byte {} inside the header or tensor table", self.len)
    }
    fn u32(&mut self) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    /// Skips `n` bytes, refusing to run past the end of the file.
    fn skip(&mut self, n: u64) -> Parse<()> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(self.truncated());
        }
        let copied =
            std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink()).map_err(|e| e.to_string())?;
        if copied != n {
            return Err(self.truncated());
        }
        self.pos += n;
        Ok(())
    }
    fn string(&mut self, max: u64, what: &str) -> Parse<String> {
        let n = self.u64()?;
        if n > max {
            return Err(format!("{what} at byte {} is {n} bytes long (limit {max})", self.pos - 8));
        }
        if self.pos + n > self.len {
            return Err(self.truncated());
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|_| self.truncated())?;
        self.pos += n;
        String::from_utf8(buf).map_err(|_| format!("{what} ending at byte {} is not UTF-8", self.pos))
    }
}

/// A metadata value as far as the checks need it.
enum Value {
    Int(u64),
    Str(String),
    Other,
}

fn parse<R: Read>(r: &mut Reader<R>) -> Parse<GgufInfo> {
    let magic: [u8; 4] = r.bytes().map_err(|_| "too short to be a GGUF file".to_string())?;
    if &magic != MAGIC {
        return Err(format!("wrong magic {magic:02x?}: not a GGUF file"));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 or 3)"));
    }
    let tensor_count = r.u64()?;
    if tensor_count > MAX_TENSORS {
        return Err(format!("{tensor_count} tensors (limit {MAX_TENSORS})"));
    }
    let kv_count = r.u64()?;
    if kv_count > MAX_KV {
        return Err(format!("{kv_count} metadata entries (limit {MAX_KV})"));
    }
    let mut info = GgufInfo { version, tensor_count, file_bytes: r.len, ..GgufInfo::default() };
    let mut ints = Vec::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = HashSet::new();
    for _ in 0..kv_count {
        let key = r.string(MAX_KEY_BYTES, "a metadata key")?;
        let ty = r.u32()?;
        let value = value(r, ty, &key)?;
        match (key.as_str(), &value) {
            ("general.architecture", Value::Str(s)) => info.architecture.clone_from(s),
            ("general.alignment", Value::Int(a)) => alignment = *a,
            (_, Value::Int(v)) => ints.push((key.clone(), *v)),
            _ => {}
        }
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key '{key}' appears twice"));
        }
    }
    if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
        return Err(format!("general.alignment {alignment} is not a power of two up to 1 MiB"));
    }
    if info.architecture.is_empty() {
        return Err("no general.architecture string in the metadata".into());
    }
    let arch = info.architecture.clone();
    let int = |suffix: &str| ints.iter().find(|(k, _)| *k == format!("{arch}.{suffix}")).map(|(_, v)| *v);
    info.context_length = int("context_length");
    info.block_count = int("block_count");
    info.embedding_length = int("embedding_length");
    info.head_count = int("attention.head_count");
    info.head_count_kv = int("attention.head_count_kv");

    let mut tensors = Vec::with_capacity(tensor_count.min(4096) as usize);
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let name = r.string(MAX_NAME_BYTES, "a tensor name")?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor '{name}' appears twice"));
        }
        let dims = r.u32()?;
        if dims == 0 || dims > MAX_DIMS {
            return Err(format!("tensor '{name}' has {dims} dimensions (1 to {MAX_DIMS})"));
        }
        let mut elements: u64 = 1;
        let mut first = 0;
        for d in 0..dims {
            let n = r.u64()?;
            if d == 0 {
                first = n;
            }
            elements = elements
                .checked_mul(n)
                .filter(|e| *e <= i64::MAX as u64)
                .ok_or_else(|| format!("tensor '{name}' has an element count that overflows"))?;
        }
        let ty = r.u32()?;
        let (block, type_bytes) =
            type_size(ty).ok_or_else(|| format!("tensor '{name}' (#{i}) has unknown type {ty}"))?;
        if first % block != 0 {
            return Err(format!(
                "tensor '{name}': first dimension {first} is not a multiple of its block {block}"
            ));
        }
        let bytes = (elements / block)
            .checked_mul(type_bytes)
            .ok_or_else(|| format!("tensor '{name}' has a byte size that overflows"))?;
        let offset = r.u64()?;
        if offset % alignment != 0 {
            return Err(format!("tensor '{name}' offset {offset} is not aligned to {alignment}"));
        }
        tensors.push((offset, bytes, name));
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    tensors.sort_unstable();
    let mut end_of_previous = 0u64;
    for (offset, bytes, name) in &tensors {
        if *offset < end_of_previous {
            return Err(format!("tensor '{name}' overlaps the tensor before it"));
        }
        let end = data_start
            .checked_add(*offset)
            .and_then(|s| s.checked_add(*bytes))
            .ok_or_else(|| format!("tensor '{name}' lies beyond any file"))?;
        if end > r.len {
            return Err(format!(
                "truncated: tensor '{name}' needs bytes up to {end} but the file has {} bytes",
                r.len
            ));
        }
        end_of_previous = offset + bytes;
        info.tensor_bytes += bytes;
    }
    Ok(info)
}

fn value<R: Read>(r: &mut Reader<R>, ty: u32, key: &str) -> Parse<Value> {
    Ok(match ty {
        0 | 1 | 7 => Value::Int(u64::from(r.bytes::<1>()?[0])),
        2 | 3 => Value::Int(u64::from(u16::from_le_bytes(r.bytes()?))),
        4 | 5 => Value::Int(u64::from(r.u32()?)),
        10 | 11 => Value::Int(r.u64()?),
        6 => {
            r.skip(4)?;
            Value::Other
        }
        12 => {
            r.skip(8)?;
            Value::Other
        }
        8 => Value::Str(r.string(MAX_STRING_BYTES, "a metadata string")?),
        9 => {
            let item = r.u32()?;
            let n = r.u64()?;
            if n > MAX_ARRAY_LEN {
                return Err(format!("metadata array '{key}' has {n} items (limit {MAX_ARRAY_LEN})"));
            }
            match item {
                8 => {
                    for _ in 0..n {
                        r.string(MAX_STRING_BYTES, "a metadata string")?;
                    }
                }
                9 => return Err(format!("metadata array '{key}' nests arrays")),
                _ => {
                    let width = scalar_width(item)
                        .ok_or_else(|| format!("metadata array '{key}' has unknown item type {item}"))?;
                    r.skip(n * width)?;
                }
            }
            Value::Other
        }
        _ => return Err(format!("metadata '{key}' has unknown value type {ty}")),
    })
}

fn scalar_width(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

/// ggml tensor types: (elements per block, bytes per block).
fn type_size(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        0 => (1, 4),     // F32
        1 => (1, 2),     // F16
        2 => (32, 18),   // Q4_0
        3 => (32, 20),   // Q4_1
        6 => (32, 22),   // Q5_0
        7 => (32, 24),   // Q5_1
        8 => (32, 34),   // Q8_0
        9 => (32, 36),   // Q8_1
        10 => (256, 84), // Q2_K
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),
        18 => (256, 98),
        19 => (256, 50),
        20 => (32, 18), // IQ4_NL
        21 => (256, 110),
        22 => (256, 82),
        23 => (256, 136),
        24 => (1, 1), // I8
        25 => (1, 2),
        26 => (1, 4),
        27 => (1, 8),
        28 => (1, 8),    // F64
        29 => (256, 56), // IQ1_M
        30 => (1, 2),    // BF16
        34 => (256, 54), // TQ1_0
        35 => (256, 66), // TQ2_0
        39 => (32, 17),  // MXFP4
        _ => return None,
    })
}

#[cfg(test)]
#[path = "gguf/tests.rs"]
mod tests;
