//! The `InferenceEngine` port: what the core asks of an engine adapter. Adapters are blocking
//! (they own compute threads); the manager calls them off the async runtime's workers.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::tools::{Constraint, ToolCall, ToolFormat, ToolSpec};
use crate::{InferenceError, Result};

/// A model's files as the model store holds them: the manifest's relative paths mapped to the
/// verified blobs on disk. The digest names the model everywhere (results, metrics, LRU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// SHA-256 of the signed manifest payload, 64 hex digits.
    pub digest: String,
    /// `name@version`, for messages.
    pub label: String,
    /// Engine the manifest names (`llama`, `candle`).
    pub engine: String,
    /// Manifest path (e.g. `model.safetensors`, `1_Pooling/config.json`) → blob path.
    pub files: BTreeMap<String, PathBuf>,
}

impl ModelFiles {
    /// The first file whose manifest path ends with `suffix` (e.g. `.gguf`).
    pub fn find_suffix(&self, suffix: &str) -> Option<&PathBuf> {
        self.files.iter().find(|(p, _)| p.ends_with(suffix)).map(|(_, b)| b)
    }

    /// The blob of exactly this manifest path.
    pub fn get(&self, path: &str) -> Option<&PathBuf> {
        self.files.get(path)
    }

    /// Sum of the files' sizes on disk.
    pub fn total_bytes(&self) -> u64 {
        self.files.values().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
    }
}

/// Settings an adapter loads a model with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Compute threads per request.
    pub threads: usize,
    /// Context window (tokens) for generation models; 0 = the model's own (capped by the adapter).
    pub context: u32,
    /// Offload to the GPU where the adapter was built with one (layers: all).
    pub gpu: bool,
}

/// What loading the model will cost, so the manager can keep the budget before loading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub ram_bytes: u64,
    pub vram_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub generate: bool,
    pub embed: bool,
}

/// One chat turn (OpenAI's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The calls an assistant turn made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` turn answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }
}

/// A generation request as the engine sees it. Stop strings are applied by the core
/// ([`crate::StopFilter`]) so every engine treats them alike.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub max_tokens: u32,
    /// 0 = greedy (deterministic).
    pub temperature: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Refuse (`ContextExceeded`) a prompt whose `max_tokens` would not fit in the context,
    /// instead of stopping at the end of the context with finish reason `length` (what jobs do).
    pub whole_completion: bool,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches this (1 = off).
    pub top_p: f32,
    /// OpenAI's penalties on tokens already generated (0 = off), -2 to 2.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// What the text must be (JSON, a schema, a tool call), enforced by a grammar.
    pub constraint: Option<Constraint>,
    /// Report each token's log probability, with this many alternatives (0 to 20).
    pub logprobs: Option<u8>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            max_tokens: 128,
            temperature: 0.0,
            seed: 0,
            stop: Vec::new(),
            whole_completion: false,
            top_p: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            constraint: None,
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context window reached.
    Length,
    /// The caller stopped listening (e.g. the client disconnected).
    Cancelled,
    /// The answer is a tool call.
    ToolCalls,
}

/// Figures of one generation, measured by the adapter around its own compute.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenerateStats {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// From the start of prompt processing to the first generated token.
    pub time_to_first_token_ms: f64,
    /// From the first to the last generated token.
    pub generation_ms: f64,
    pub finish: FinishReason,
}

impl GenerateStats {
    /// Decode speed: tokens after the first over the time they took.
    pub fn tokens_per_s(&self) -> f64 {
        if self.completion_tokens > 1 && self.generation_ms > 0.0 {
            f64::from(self.completion_tokens - 1) * 1000.0 / self.generation_ms
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedOutput {
    /// One vector per input text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens over all inputs (without padding).
    pub tokens: u32,
}

/// A generated token's log probability (natural log, of the model's distribution before any
/// sampling step), and the most likely alternatives when asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logprob {
    /// The token's bytes (a token may be part of a character).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The `n` most likely tokens at that step, most likely first.
    pub top: Vec<(Vec<u8>, f32)>,
}

/// A generated piece of text: one token's, or the rest of a character held over from earlier
/// tokens. `logprob` is there when the request asked for log probabilities.
#[derive(Debug)]
pub struct Piece<'a> {
    pub text: &'a str,
    pub logprob: Option<Logprob>,
}

impl<'a> Piece<'a> {
    pub fn text(text: &'a str) -> Self {
        Self { text, logprob: None }
    }
}

/// Receives each generated piece; `Break` stops generation (finish = cancelled).
pub type TokenSink<'a> = &'a mut dyn FnMut(Piece<'_>) -> ControlFlow<()>;

/// An engine adapter: loads models of its format.
pub trait InferenceEngine: Send + Sync {
    /// `llama`, `candle`: the name manifests use in `engine`.
    fn name(&self) -> &'static str;
    /// Engine and library version, stamped on every result.
    fn version(&self) -> String;
    /// Checks the files (without handing them to native code that could crash on bad input)
    /// and estimates the memory a load takes.
    fn inspect(&self, model: &ModelFiles, opts: &LoadOptions) -> Result<MemoryEstimate>;
    fn load(&self, model: &ModelFiles, opts: &LoadOptions) -> Result<Box<dyn LoadedModel>>;
}

/// A model in memory. Requests may run on it from several threads.
pub trait LoadedModel: Send + Sync {
    fn capabilities(&self) -> Capabilities;
    /// Context window in tokens (0 when it does not generate).
    fn context_length(&self) -> u32;
    /// The prompt for a chat: the model's own template where it has one. With `tools` the
    /// template must know how to show them ([`Self::tool_format`]).
    fn chat_prompt(&self, messages: &[ChatMessage], tools: Option<&[ToolSpec]>) -> Result<String> {
        if tools.is_some() {
            return Err(InferenceError::BadRequest(
                "this model has no chat template with tool support".into(),
            ));
        }
        Ok(plain_chat_prompt(messages))
    }
    /// How the model writes a tool call; None when its chat template has no tool support.
    fn tool_format(&self) -> Option<ToolFormat> {
        None
    }
    fn generate(&self, req: &GenerateRequest, sink: TokenSink<'_>) -> Result<GenerateStats>;
    fn embed(&self, texts: &[String]) -> Result<EmbedOutput>;
}

/// The chat prompt for a model without a template: one `role: content` line per turn, then
/// `assistant:` for the model to continue.
pub fn plain_chat_prompt(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&m.role);
        out.push_str(": ");
        out.push_str(&m.content);
        out.push('\n');
    }
    out.push_str("assistant:");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_chat_prompt_ends_with_the_assistant_turn() {
        let msgs = vec![ChatMessage::new("system", "be brief"), ChatMessage::new("user", "hi")];
        assert_eq!(plain_chat_prompt(&msgs), "system: be brief\nuser: hi\nassistant:");
    }

    #[test]
    fn decode_speed_ignores_the_first_token() {
        let s = GenerateStats {
            prompt_tokens: 3,
            completion_tokens: 11,
            time_to_first_token_ms: 50.0,
            generation_ms: 100.0,
            finish: FinishReason::Length,
        };
        assert!((s.tokens_per_s() - 100.0).abs() < 1e-9);
    }
}
