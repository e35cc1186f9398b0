//! Outpost's inference core: the `InferenceEngine` port, the manager that keeps loaded models
//! within a RAM/VRAM budget (least-recently-used unload) behind a bounded request queue, and
//! checks on untrusted model files. Engine SDKs live only in their adapter modules (`llama`,
//! `candle`), each behind a cargo feature; the core never calls them directly.

mod engine;
mod error;
pub mod gguf;
mod manager;
mod stop;
pub mod tools;

#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "llama")]
pub mod llama;

pub use engine::{
    Capabilities, ChatMessage, EmbedOutput, FinishReason, GenerateRequest, GenerateStats, InferenceEngine,
    LoadOptions, LoadedModel, Logprob, MemoryEstimate, ModelFiles, Piece, TokenSink, plain_chat_prompt,
};
pub use error::{InferenceError, Result};
pub use manager::{
    EmbedOutcome, EngineInfo, GenerateOutcome, InferenceConfig, LoadedInfo, MAX_EMBED_TEXTS, MAX_TEXT_BYTES,
    Manager, Metrics, Prompt,
};
pub use stop::StopFilter;
pub use tools::{Constraint, ToolCall, ToolChoice, ToolFormat, ToolSpec};
