//! Request bodies of the OpenAI-compatible API, as clients send them. Every field is either
//! honoured or refused with a 400 that names it ([`check_rest`]): nothing a client asks for is
//! silently ignored. A null is the same as an absent field, as OpenAI takes it.

use base64::Engine as _;
use outpost_inference::{ChatMessage, GenerateRequest};
use outpost_protocol::{MAX_GENERATE_TOKENS, MAX_STOP_BYTES, MAX_STOP_STRINGS};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A field the endpoint refuses: the field, an OpenAI-style code, and why.
#[derive(Debug, PartialEq)]
pub struct Refused {
    pub param: String,
    pub code: &'static str,
    pub message: String,
}

/// A request body's fields, taken one by one so that a wrong one is named in the error; what
/// is left at the end goes through [`check_rest`].
pub struct Fields(Map<String, Value>);

impl Fields {
    fn of(body: Value) -> Result<Fields, Refused> {
        match body {
            Value::Object(map) => Ok(Fields(map)),
            _ => Err(Refused {
                param: String::new(),
                code: "invalid_request",
                message: "the request body must be a JSON object".into(),
            }),
        }
    }

    /// An optional field (null is absent).
    pub fn opt<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, Refused> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v).map(Some).map_err(|e| Refused {
                param: name.into(),
                code: "invalid_type",
                message: format!("{name}: {e}"),
            }),
        }
    }

    pub fn required<T: DeserializeOwned>(&mut self, name: &str) -> Result<T, Refused> {
        self.opt(name)?.ok_or_else(|| Refused {
            param: name.into(),
            code: "missing_required_parameter",
            message: format!("{name} is required"),
        })
    }

    /// A request from `body`: `take` takes the fields it knows, then every field left is
    /// accepted or refused by name ([`check_rest`]), so no request type can skip that step.
    fn parse<T>(body: Value, take: impl FnOnce(&mut Fields) -> Result<T, Refused>) -> Result<T, Refused> {
        let mut f = Fields::of(body)?;
        let req = take(&mut f)?;
        check_rest(&f.0)?;
        Ok(req)
    }
}

/// Fields completions and chat completions share.
#[derive(Debug)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    /// Outpost's own: stop at the end of the context (finish reason `length`) rather than
    /// refusing a prompt and max_tokens that do not fit.
    pub truncate: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

impl Common {
    fn take(f: &mut Fields) -> Result<Common, Refused> {
        Ok(Common {
            model: f.required("model")?,
            max_tokens: f.opt("max_tokens")?,
            temperature: f.opt("temperature")?,
            seed: f.opt("seed")?,
            stop: f.opt("stop")?,
            stream: f.opt("stream")?,
            stream_options: f.opt("stream_options")?,
            n: f.opt("n")?,
            truncate: f.opt("truncate")?,
        })
    }

    pub fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a streamed answer ends with a usage chunk; stream_options without a stream is
    /// refused, as OpenAI does.
    pub fn include_usage(&self) -> Result<bool, Refused> {
        match &self.stream_options {
            None => Ok(false),
            Some(_) if !self.streaming() => Err(Refused {
                param: "stream_options".into(),
                code: "invalid_value",
                message: "stream_options is only allowed when stream is true".into(),
            }),
            Some(o) => Ok(o.include_usage.unwrap_or(false)),
        }
    }
}

/// Fields a client may send that change nothing here: identifiers and bookkeeping.
const ACCEPTED: &[&str] = &["user", "metadata", "store", "service_tier", "parallel_tool_calls"];

/// The fields of a request no named field took (`rest`): each is accepted (null, a value that
/// asks for what the endpoint does anyway, or bookkeeping) or refused with the field's name.
pub fn check_rest(rest: &Map<String, Value>) -> Result<(), Refused> {
    for (param, value) in rest {
        if value.is_null() || ACCEPTED.contains(&param.as_str()) {
            continue;
        }
        let default = match param.as_str() {
            "tools" | "functions" => value.as_array().is_some_and(Vec::is_empty),
            "tool_choice" | "function_call" => value == "none",
            "response_format" => value.get("type").is_some_and(|t| t == "text"),
            "logprobs" | "echo" => value == &Value::Bool(false),
            "top_p" | "best_of" => value.as_f64() == Some(1.0),
            "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
            "logit_bias" => value.as_object().is_some_and(Map::is_empty),
            "modalities" => value.as_array().is_some_and(|m| m.iter().all(|x| x == "text")),
            _ => false,
        };
        if default {
            continue;
        }
        let (code, why) = match param.as_str() {
            "tools" | "tool_choice" | "functions" | "function_call" => {
                ("unsupported_parameter", "tool calling is not supported by this endpoint yet")
            }
            "response_format" => (
                "unsupported_parameter",
                "structured outputs (json_object, json_schema) are not supported yet; only {\"type\": \"text\"}",
            ),
            "logprobs" | "top_logprobs" => ("unsupported_parameter", "log probabilities are not returned"),
            "top_p" => ("unsupported_parameter", "only top_p = 1 (no nucleus sampling); use temperature"),
            "presence_penalty" | "frequency_penalty" => ("unsupported_parameter", "only 0 (no penalties)"),
            "logit_bias" => ("unsupported_parameter", "logit_bias is not supported"),
            "echo" | "best_of" | "suffix" => ("unsupported_parameter", "not supported for completions here"),
            "dimensions" => (
                "unsupported_parameter",
                "the model's manifest does not declare truncated embeddings; its vectors have their full size",
            ),
            "modalities" | "audio" | "prediction" | "reasoning_effort" | "web_search_options" => {
                ("unsupported_parameter", "text generation only")
            }
            _ => ("unknown_parameter", "unrecognized request argument"),
        };
        return Err(Refused { param: param.clone(), code, message: format!("{param}: {why}") });
    }
    Ok(())
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
            // OpenAI's answer to a prompt and an explicit max_tokens over the context is a 400,
            // unless the client opts into stopping at the end of the context; without
            // max_tokens the completion may use what the context has left.
            whole_completion: self.max_tokens.is_some() && !self.truncate.unwrap_or(false),
        })
    }
}

#[derive(Debug)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    pub common: Common,
}

impl CompletionRequest {
    pub fn from_body(body: Value) -> Result<CompletionRequest, Refused> {
        Fields::parse(body, |f| {
            Ok(CompletionRequest { prompt: f.required("prompt")?, common: Common::take(f)? })
        })
    }
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

#[derive(Debug)]
pub struct ChatRequest {
    pub messages: Vec<WireMessage>,
    pub max_completion_tokens: Option<u32>,
    pub common: Common,
}

impl ChatRequest {
    pub fn from_body(body: Value) -> Result<ChatRequest, Refused> {
        Fields::parse(body, |f| {
            Ok(ChatRequest {
                messages: f.required("messages")?,
                max_completion_tokens: f.opt("max_completion_tokens")?,
                common: Common::take(f)?,
            })
        })
    }
}

/// A chat message: a field it does not know (`tool_calls`, `tool_call_id`, `audio`, …) is
/// refused by name, like the request's own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// The participant's name: accepted; the chat template has no place for it.
    #[serde(default, rename = "name")]
    _name: Option<String>,
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

#[derive(Debug)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbedInput,
    pub encoding_format: Option<String>,
}

impl EmbeddingsRequest {
    pub fn from_body(body: Value) -> Result<EmbeddingsRequest, Refused> {
        Fields::parse(body, |f| {
            Ok(EmbeddingsRequest {
                model: f.required("model")?,
                input: f.required("input")?,
                encoding_format: f.opt("encoding_format")?,
            })
        })
    }
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
