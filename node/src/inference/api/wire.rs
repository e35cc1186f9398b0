//! Request bodies of the OpenAI-compatible API, as clients send them. Fields this endpoint
//! does not use are ignored (clients send many); values it cannot honour are refused.

use base64::Engine as _;
use outpost_inference::{ChatMessage, GenerateRequest};
use outpost_protocol::{MAX_GENERATE_TOKENS, MAX_STOP_BYTES, MAX_STOP_STRINGS};
use serde::Deserialize;

/// Fields completions and chat completions share.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub n: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

impl Common {
    /// The generation parameters, checked; OpenAI's default temperature is 1.
    pub fn params(&self, default_max_tokens: u32) -> Result<GenerateRequest, String> {
        if self.n.is_some_and(|n| n != 1) {
            return Err("n must be 1: one choice per request".into());
        }
        let max_tokens = self.max_tokens.unwrap_or(default_max_tokens);
        if max_tokens == 0 || max_tokens > MAX_GENERATE_TOKENS {
            return Err(format!("max_tokens must be 1 to {MAX_GENERATE_TOKENS}"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
            return Err("temperature must be between 0 and 2".into());
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS || stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return Err(format!("stop: at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_BYTES} bytes"));
        }
        Ok(GenerateRequest {
            prompt: String::new(),
            max_tokens,
            temperature,
            seed: self.seed.unwrap_or(0),
            stop,
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: Common,
    pub prompt: OneOrMany,
}

impl OneOrMany {
    /// A completion takes one prompt.
    pub fn single(self) -> Result<String, String> {
        let mut v = self.into_vec();
        if v.len() != 1 {
            return Err(format!("prompt must be one string ({} given)", v.len()));
        }
        Ok(v.remove(0))
    }
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Vec<WireMessage>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl WireMessage {
    pub fn into_message(self) -> Result<ChatMessage, String> {
        if !matches!(self.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(format!(
                "message role {:?} is not system, developer, user, assistant or tool",
                self.role
            ));
        }
        let content = match self.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(format!(
                                "message content part {kind:?}: only text parts are supported"
                            ));
                        }
                    }
                }
                text
            }
        };
        Ok(ChatMessage { role: self.role, content })
    }
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbedInput,
    #[serde(default)]
    pub encoding_format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbedInput {
    One(String),
    Many(Vec<String>),
    Tokens(#[allow(dead_code)] serde_json::Value),
}

impl EmbedInput {
    pub fn texts(self) -> Result<Vec<String>, String> {
        match self {
            Self::One(s) => Ok(vec![s]),
            Self::Many(v) if v.is_empty() => Err("input must not be empty".into()),
            Self::Many(v) => Ok(v),
            Self::Tokens(_) => {
                Err("input must be a string or an array of strings (token arrays are not supported)".into())
            }
        }
    }
}

/// Little-endian f32s, base64 (what `encoding_format: base64` asks for).
pub fn f32_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
