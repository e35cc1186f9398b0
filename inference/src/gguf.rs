//! GGUF checks before any native code sees the file: header, metadata and tensor table are
//! parsed with bounds on every count and length, and each tensor must lie inside the file.

use std::path::Path;

use crate::Result;

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
}

/// Checks a GGUF file. Errors are `InferenceError::InvalidModel` naming the file and what is wrong.
pub fn check(path: &Path) -> Result<GgufInfo> {
    Err(crate::InferenceError::InvalidModel {
        path: path.display().to_string(),
        format: "GGUF",
        reason: "not implemented yet".into(),
    })
}
