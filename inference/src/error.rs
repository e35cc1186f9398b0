//! Errors of the inference core. Each says what failed and what to do; `status()` maps them to
//! the HTTP status the local endpoint answers with.

use thiserror::Error;

pub type Result<T, E = InferenceError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum InferenceError {
    #[error("model {0} is not in the model store; import it with `outpost models import`")]
    ModelNotPresent(String),
    #[error(
        "engine '{engine}' is not built into this agent (cargo feature `{engine}`); engines built in: {built}"
    )]
    EngineUnavailable { engine: String, built: String },
    #[error(
        "model {model} needs about {needed_mib} MiB of {kind} but the budget is {budget_mib} MiB \
         ([inference] {kind}_budget_mb)"
    )]
    OverBudget { model: String, kind: &'static str, needed_mib: u64, budget_mib: u64 },
    #[error("the inference queue is full ({bound} requests waiting); retry later")]
    QueueFull { bound: usize },
    #[error("the prompt is {prompt_tokens} tokens but model {model} has a context of {context} tokens")]
    PromptTooLong { model: String, prompt_tokens: usize, context: usize },
    #[error(
        "model {model} has a context of {context} tokens, but {} were asked for ({prompt_tokens} in the \
         prompt, {max_tokens} for the completion): shorten the prompt or lower max_tokens, or send \
         \"truncate\": true to stop at the end of the context instead",
        .prompt_tokens + *.max_tokens as usize
    )]
    ContextExceeded { model: String, prompt_tokens: usize, max_tokens: u32, context: usize },
    #[error("model {model} cannot {what} (engine {engine})")]
    Unsupported { model: String, engine: String, what: &'static str },
    #[error("model file {path} is not a valid {format} file: {reason}")]
    InvalidModel { path: String, format: &'static str, reason: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{engine} engine failed: {message}")]
    Engine { engine: String, message: String },
    #[error("the inference worker stopped unexpectedly")]
    WorkerGone,
}

impl InferenceError {
    /// The HTTP status an API answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            Self::ModelNotPresent(_) => 404,
            Self::QueueFull { .. } => 429,
            Self::OverBudget { .. } | Self::EngineUnavailable { .. } => 503,
            Self::PromptTooLong { .. }
            | Self::ContextExceeded { .. }
            | Self::Unsupported { .. }
            | Self::BadRequest(_) => 400,
            Self::InvalidModel { .. } => 422,
            Self::Engine { .. } | Self::WorkerGone => 500,
        }
    }

    /// A short machine-readable code (OpenAI-style `error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::ModelNotPresent(_) => "model_not_found",
            Self::QueueFull { .. } => "queue_full",
            Self::OverBudget { .. } => "model_over_budget",
            Self::EngineUnavailable { .. } => "engine_unavailable",
            Self::PromptTooLong { .. } | Self::ContextExceeded { .. } => "context_length_exceeded",
            Self::Unsupported { .. } => "unsupported",
            Self::InvalidModel { .. } => "invalid_model",
            Self::BadRequest(_) => "invalid_request",
            Self::Engine { .. } | Self::WorkerGone => "engine_error",
        }
    }

    /// Whether the same request may succeed later without a change on the caller's side.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::QueueFull { .. } | Self::WorkerGone)
    }

    /// An engine failure with its message.
    pub fn engine(engine: &str, message: impl std::fmt::Display) -> Self {
        Self::Engine { engine: engine.to_string(), message: message.to_string() }
    }
}
