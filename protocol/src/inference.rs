//! Inference jobs (`generate`, `embed`) on a model of the node's model store, and the stamp
//! their results carry. Checks here are pure functions both the control plane (at submit) and
//! the node (on every signed manifest) apply.

use serde::{Deserialize, Serialize};

/// Most tokens one `generate` job may ask for.
pub const MAX_GENERATE_TOKENS: u32 = 8192;
/// Most stop strings, and most bytes of each.
pub const MAX_STOP_STRINGS: usize = 8;
pub const MAX_STOP_BYTES: usize = 64;
/// Most texts inline in one `embed` job (the manifest itself is bounded by the body limit).
pub const MAX_INLINE_TEXTS: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum InferenceKind {
    Generate,
    Embed,
}

/// An inference job. Its output (the full text, or the vectors as JSON lines) is written to the
/// node's local object store under `output_prefix` (default `outpost-results/<job>/`); the result
/// carries the model's digest, the engine, token counts and, for `generate`, the text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InferenceSpec {
    pub kind: InferenceKind,
    /// The model's digest (64 hex digits, as `outpost models list` shows it).
    pub model: String,
    /// `generate`: the prompt inline …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// … or the key of a local object holding it (UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_key: Option<String>,
    /// `generate`: most tokens to produce (default 128).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// `generate`: 0 (default) is greedy and deterministic.
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// `embed`: texts inline …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub texts: Vec<String>,
    /// … or the key of a local object with one JSON string per line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub texts_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_prefix: Option<String>,
    #[serde(default = "crate::default_timeout_secs")]
    pub timeout_secs: u64,
}

pub fn default_max_tokens() -> u32 {
    128
}

impl InferenceSpec {
    /// Checks what can be checked without the node's state; the message says what to change.
    pub fn check(&self) -> Result<(), String> {
        if self.model.len() != 64
            || !self.model.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "model must be a model digest (64 lowercase hex digits, see `outpost models list`), not {:?}",
                self.model
            ));
        }
        if self.timeout_secs == 0 {
            return Err("timeout_secs must be at least 1".into());
        }
        match self.kind {
            InferenceKind::Generate => {
                if self.prompt.is_some() == self.prompt_key.is_some() {
                    return Err("a generate job needs exactly one of prompt and prompt_key".into());
                }
                if !self.texts.is_empty() || self.texts_key.is_some() {
                    return Err("texts and texts_key belong to embed jobs".into());
                }
                if self.max_tokens == 0 || self.max_tokens > MAX_GENERATE_TOKENS {
                    return Err(format!("max_tokens must be 1 to {MAX_GENERATE_TOKENS}"));
                }
                if !self.temperature.is_finite() || !(0.0..=2.0).contains(&self.temperature) {
                    return Err("temperature must be between 0 and 2".into());
                }
                if self.stop.len() > MAX_STOP_STRINGS
                    || self.stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
                {
                    return Err(format!(
                        "at most {MAX_STOP_STRINGS} stop strings of 1 to {MAX_STOP_BYTES} bytes each"
                    ));
                }
            }
            InferenceKind::Embed => {
                if self.texts.is_empty() == self.texts_key.is_none() {
                    return Err("an embed job needs exactly one of texts and texts_key".into());
                }
                if self.prompt.is_some() || self.prompt_key.is_some() || !self.stop.is_empty() {
                    return Err("prompt, prompt_key and stop belong to generate jobs".into());
                }
                if self.texts.len() > MAX_INLINE_TEXTS {
                    return Err(format!("at most {MAX_INLINE_TEXTS} texts inline; use texts_key for more"));
                }
            }
        }
        Ok(())
    }

    /// The local object keys the job reads.
    pub fn input_keys(&self) -> impl Iterator<Item = &String> {
        self.prompt_key.iter().chain(self.texts_key.iter())
    }
}

/// What an inference result is stamped with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InferenceStamp {
    pub kind: InferenceKind,
    pub model_digest: String,
    pub engine: String,
    pub engine_version: String,
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
    /// `generate`: `stop` (end of text or a stop string) or `length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish: Option<String>,
    #[serde(default)]
    pub time_to_first_token_us: u64,
    /// From the first to the last generated token.
    #[serde(default)]
    pub generation_us: u64,
    /// `embed`: how many vectors, and their dimension.
    #[serde(default)]
    pub vectors: u32,
    #[serde(default)]
    pub dimensions: u32,
}

impl InferenceStamp {
    /// Decode speed: tokens after the first over the time they took.
    pub fn tokens_per_s(&self) -> f64 {
        if self.completion_tokens > 1 && self.generation_us > 0 {
            f64::from(self.completion_tokens - 1) * 1e6 / self.generation_us as f64
        } else {
            0.0
        }
    }
}
