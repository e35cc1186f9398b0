use std::io::Write;

use super::*;

/// A minimal GGUF writer for the tests.
struct Gguf {
    version: u32,
    kv: Vec<u8>,
    kv_count: u64,
    tensors: Vec<u8>,
    tensor_count: u64,
    data_len: u64,
}

impl Gguf {
    fn new() -> Self {
        let mut g =
            Self { version: 3, kv: vec![], kv_count: 0, tensors: vec![], tensor_count: 0, data_len: 0 };
        g.kv_str("general.architecture", "llama");
        g.kv_u32("llama.context_length", 128);
        g.kv_u32("llama.block_count", 2);
        g
    }
    fn key(&mut self, k: &str, ty: u32) {
        self.kv.extend((k.len() as u64).to_le_bytes());
        self.kv.extend(k.as_bytes());
        self.kv.extend(ty.to_le_bytes());
        self.kv_count += 1;
    }
    fn kv_str(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        self.kv.extend((v.len() as u64).to_le_bytes());
        self.kv.extend(v.as_bytes());
    }
    fn kv_u32(&mut self, k: &str, v: u32) {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) {
        self.tensors.extend((name.len() as u64).to_le_bytes());
        self.tensors.extend(name.as_bytes());
        self.tensors.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.tensors.extend(d.to_le_bytes());
        }
        self.tensors.extend(ty.to_le_bytes());
        self.tensors.extend(offset.to_le_bytes());
        self.tensor_count += 1;
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.tensor_count.to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.tensors);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(vec![0u8; self.data_len as usize]);
        out
    }
}

fn valid() -> Gguf {
    let mut g = Gguf::new();
    g.tensor("token_embd.weight", &[8, 4], 0, 0); // 128 bytes
    g.tensor("output.weight", &[32, 2], 8, 128); // Q8_0: 2 blocks of 34 = 68 bytes
    g.data_len = 128 + 68;
    g
}

fn check_bytes(bytes: &[u8]) -> Result<GgufInfo> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    check(f.path())
}

fn reason(bytes: &[u8]) -> String {
    match check_bytes(bytes) {
        Err(InferenceError::InvalidModel { reason, format: "GGUF", .. }) => reason,
        other => panic!("expected InvalidModel, got {other:?}"),
    }
}

#[test]
fn a_well_formed_file_passes_and_reports_its_metadata() {
    let info = check_bytes(&valid().bytes()).unwrap();
    assert_eq!(info.version, 3);
    assert_eq!(info.tensor_count, 2);
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.context_length, Some(128));
    assert_eq!(info.block_count, Some(2));
    assert_eq!(info.embedding_length, None);
    assert_eq!(info.tensor_bytes, 128 + 68);
}

#[test]
fn wrong_magic_is_refused() {
    let mut b = valid().bytes();
    b[..4].copy_from_slice(b"GGML");
    assert!(reason(&b).contains("wrong magic"));
    assert!(reason(b"GG").contains("too short"));
}

#[test]
fn every_truncation_is_an_error_never_a_panic() {
    let b = valid().bytes();
    for cut in 0..b.len() {
        let r = reason(&b[..cut]);
        assert!(r.contains("truncated") || r.contains("too short"), "cut at {cut}: {r}");
    }
}

#[test]
fn a_tensor_beyond_the_end_of_the_file_is_refused() {
    let mut g = valid();
    g.data_len = 100;
    assert!(reason(&g.bytes()).contains("needs bytes up to"));
}

#[test]
fn unaligned_overlapping_and_duplicate_tensors_are_refused() {
    let mut g = Gguf::new();
    g.tensor("a", &[4], 0, 8);
    g.data_len = 64;
    assert!(reason(&g.bytes()).contains("not aligned"));

    let mut g = Gguf::new();
    g.tensor("a", &[16], 0, 0);
    g.tensor("b", &[16], 0, 32);
    g.data_len = 128;
    assert!(reason(&g.bytes()).contains("overlaps"));

    let mut g = Gguf::new();
    g.tensor("a", &[4], 0, 0);
    g.tensor("a", &[4], 0, 32);
    g.data_len = 64;
    assert!(reason(&g.bytes()).contains("appears twice"));
}

#[test]
fn hostile_lengths_and_counts_are_bounded() {
    // A string claiming 2^40 bytes.
    let mut g = Gguf::new();
    g.key("x", 8);
    g.kv.extend((1u64 << 40).to_le_bytes());
    assert!(reason(&g.bytes()).contains("limit"));

    // A tensor count in the billions.
    let mut b = Gguf::new().bytes();
    b[8..16].copy_from_slice(&(1u64 << 33).to_le_bytes());
    assert!(reason(&b).contains("tensors (limit"));

    // Dimensions whose product overflows.
    let mut g = Gguf::new();
    g.tensor("big", &[u64::MAX / 2, 4], 0, 0);
    assert!(reason(&g.bytes()).contains("overflows"));

    // Five dimensions, an unknown tensor type, an unknown value type.
    let mut g = Gguf::new();
    g.tensor("t", &[1, 1, 1, 1, 1], 0, 0);
    assert!(reason(&g.bytes()).contains("dimensions"));
    let mut g = Gguf::new();
    g.tensor("t", &[4], 77, 0);
    assert!(reason(&g.bytes()).contains("unknown type 77"));
    let mut g = Gguf::new();
    g.key("y", 42);
    assert!(reason(&g.bytes()).contains("unknown value type 42"));
}

#[test]
fn a_block_type_needs_whole_blocks() {
    let mut g = Gguf::new();
    g.tensor("q", &[33], 8, 0);
    g.data_len = 128;
    assert!(reason(&g.bytes()).contains("not a multiple of its block"));
}

#[test]
fn unsupported_versions_and_a_missing_architecture_are_refused() {
    let mut g = valid();
    g.version = 1;
    assert!(reason(&g.bytes()).contains("version 1"));
    let mut g = Gguf { version: 3, kv: vec![], kv_count: 0, tensors: vec![], tensor_count: 0, data_len: 0 };
    g.kv_u32("llama.block_count", 1);
    assert!(reason(&g.bytes()).contains("general.architecture"));
}

#[test]
fn string_arrays_are_walked_not_trusted() {
    let mut g = valid();
    g.key("tokenizer.ggml.tokens", 9);
    g.kv.extend(8u32.to_le_bytes());
    g.kv.extend(2u64.to_le_bytes());
    for s in ["<s>", "</s>"] {
        g.kv.extend((s.len() as u64).to_le_bytes());
        g.kv.extend(s.as_bytes());
    }
    assert!(check_bytes(&g.bytes()).is_ok());
    let mut g = valid();
    g.key("scores", 9);
    g.kv.extend(6u32.to_le_bytes());
    g.kv.extend((1u64 << 30).to_le_bytes());
    assert!(reason(&g.bytes()).contains("items (limit"));
}
