//! Model manifests: what a publisher signs about a model (name, version, format, files with
//! size and SHA-256), and the summary a node reports in its heartbeat. The signed bytes are
//! the `payload` string exactly as carried, the same pattern as [`crate::SignedEnvelope`].

use serde::{Deserialize, Serialize};

/// On-disk format of a model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    Gguf,
    Safetensors,
}

impl ModelFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Gguf => "gguf",
            ModelFormat::Safetensors => "safetensors",
        }
    }
}

/// What a publisher vouches for. Carried as JSON inside [`SignedModelManifest::payload`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    pub name: String,
    pub version: String,
    pub format: ModelFormat,
    /// The inference engine meant to load it: `llama` (GGUF) or `candle` (safetensors).
    pub engine: String,
    /// SPDX identifier or short name of the model's licence.
    pub license: String,
    /// Every file of the model; paths are relative, `/`-separated, without `..`.
    pub files: Vec<ModelFile>,
    /// For an embedding model trained to be truncated (Matryoshka representation learning):
    /// the smaller vector sizes the publisher vouches for, ascending. The local endpoint's
    /// `dimensions` may ask for one of these and nothing else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embedding_dimensions: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub path: String,
    pub size: u64,
    /// SHA-256 of the file's bytes, 64 lowercase hex digits.
    pub sha256: String,
}

/// A model manifest as shipped (`manifest.json` beside the files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedModelManifest {
    /// The JSON of a [`ModelManifest`]; these exact UTF-8 bytes are signed.
    pub payload: String,
    /// Id of the publisher key ([`crate::PublicKey::key_id`]).
    pub key_id: String,
    /// ed25519 signature over the payload's UTF-8 bytes, hex.
    pub signature_hex: String,
}

/// A model present on a node, as its heartbeat reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelSummary {
    /// SHA-256 of the signed payload: the model's identity.
    pub digest: String,
    pub name: String,
    pub version: String,
    pub format: ModelFormat,
    pub engine: String,
}
