//! Request bodies of the OpenAI-compatible API, as clients send them. Every field is either
//! honoured or refused with a 400 that names it ([`check_rest`]): nothing a client asks for is
//! silently ignored. A null is the same as an absent field, as OpenAI takes it.

use base64::Engine as _;
use outpost_inference::tools::check_schema;
use outpost_inference::{ChatMessage, Constraint, GenerateRequest, ToolCall, ToolChoice, ToolSpec};
use outpost_protocol::{MAX_GENERATE_TOKENS, MAX_STOP_BYTES, MAX_STOP_STRINGS};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
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
    pub top_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
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
            top_p: f.opt("top_p")?,
            presence_penalty: f.opt("presence_penalty")?,
            frequency_penalty: f.opt("frequency_penalty")?,
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
            "best_of" => value.as_f64() == Some(1.0),
            "logit_bias" => value.as_object().is_some_and(Map::is_empty),
            "modalities" => value.as_array().is_some_and(|m| m.iter().all(|x| x == "text")),
            _ => false,
        };
        if default {
            continue;
        }
        let (code, why) = match param.as_str() {
            "tools" | "tool_choice" | "response_format" => {
                ("unsupported_parameter", "only on /v1/chat/completions")
            }
            "functions" | "function_call" => (
                "unsupported_parameter",
                "the legacy function calling API is not supported; use tools and tool_choice",
            ),
            "logprobs" | "top_logprobs" => ("unsupported_parameter", "log probabilities are not returned"),
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
        let top_p = self.top_p.unwrap_or(1.0);
        if !top_p.is_finite() || !(0.0..=1.0).contains(&top_p) {
            return Err("top_p must be between 0 and 1".into());
        }
        let penalty = |name: &str, v: Option<f32>| match v {
            Some(p) if !p.is_finite() || !(-2.0..=2.0).contains(&p) => {
                Err(format!("{name} must be between -2 and 2"))
            }
            v => Ok(v.unwrap_or(0.0)),
        };
        let presence_penalty = penalty("presence_penalty", self.presence_penalty)?;
        let frequency_penalty = penalty("frequency_penalty", self.frequency_penalty)?;
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
            top_p,
            presence_penalty,
            frequency_penalty,
            constraint: None,
            logprobs: None,
        })
    }
}

#[derive(Debug)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    /// Log probabilities with this many alternatives per token.
    pub logprobs: Option<u8>,
    pub common: Common,
}

/// Most alternatives per token a request may ask for.
const MAX_TOP_LOGPROBS: u8 = 20;

impl CompletionRequest {
    pub fn from_body(body: Value) -> Result<CompletionRequest, Refused> {
        Fields::parse(body, |f| {
            // An int (alternatives per token); false is the same as absent.
            if f.0.get("logprobs") == Some(&Value::Bool(false)) {
                f.0.remove("logprobs");
            }
            let logprobs: Option<u8> = f.opt("logprobs")?;
            let common = Common::take(f)?;
            if logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
                return Err(invalid(
                    "logprobs",
                    format!("at most {MAX_TOP_LOGPROBS} alternatives per token"),
                ));
            }
            logprobs_without_stream(logprobs, &common)?;
            Ok(CompletionRequest { prompt: f.required("prompt")?, logprobs, common })
        })
    }
}

/// Log probabilities come with the whole answer only.
fn logprobs_without_stream(logprobs: Option<u8>, common: &Common) -> Result<(), Refused> {
    if logprobs.is_some() && common.streaming() {
        return Err(Refused {
            param: "logprobs".into(),
            code: "unsupported_parameter",
            message: "logprobs: returned with a whole answer only, not with stream: true".into(),
        });
    }
    Ok(())
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
    pub messages: Vec<ChatMessage>,
    /// The functions the model may call and how much it should; None without tools (or with
    /// tool_choice `none`).
    pub tools: Option<(Vec<ToolSpec>, ToolChoice)>,
    /// What `response_format` asks of the text.
    pub constraint: Option<Constraint>,
    /// Log probabilities with this many alternatives per token (`logprobs`, `top_logprobs`).
    pub logprobs: Option<u8>,
    pub max_completion_tokens: Option<u32>,
    pub common: Common,
}

impl ChatRequest {
    pub fn from_body(body: Value) -> Result<ChatRequest, Refused> {
        Fields::parse(body, |f| {
            let messages: Vec<WireMessage> = f.required("messages")?;
            let tools: Option<Vec<WireTool>> = f.opt("tools")?;
            let tool_choice: Option<Value> = f.opt("tool_choice")?;
            let response_format: Option<Value> = f.opt("response_format")?;
            let logprobs = match (f.opt::<bool>("logprobs")?, f.opt::<u8>("top_logprobs")?) {
                (Some(true), top) if top.unwrap_or(0) <= MAX_TOP_LOGPROBS => Some(top.unwrap_or(0)),
                (Some(true), _) => {
                    return Err(invalid("top_logprobs", format!("at most {MAX_TOP_LOGPROBS}")));
                }
                (_, Some(_)) => return Err(invalid("top_logprobs", "needs logprobs: true")),
                _ => None,
            };
            let req = ChatRequest {
                messages: into_messages(messages)?,
                tools: tools_and_choice(tools.unwrap_or_default(), tool_choice)?,
                constraint: response_format.map(constraint).transpose()?.flatten(),
                logprobs,
                max_completion_tokens: f.opt("max_completion_tokens")?,
                common: Common::take(f)?,
            };
            logprobs_without_stream(req.logprobs, &req.common)?;
            if req.logprobs.is_some() && req.tools.is_some() {
                return Err(Refused {
                    param: "logprobs".into(),
                    code: "unsupported_parameter",
                    message: "logprobs: not returned together with tools".into(),
                });
            }
            if req.constraint.is_some() && req.tools.is_some() {
                return Err(Refused {
                    param: "response_format".into(),
                    code: "unsupported_parameter",
                    message:
                        "response_format: not supported together with tools (a tool's arguments already \
                              follow its schema)"
                            .into(),
                });
            }
            Ok(req)
        })
    }
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> Refused {
    let param = param.into();
    Refused { message: format!("{param}: {}", message.into()), param, code: "invalid_value" }
}

/// A tool definition as OpenAI's API takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireTool {
    #[serde(rename = "type")]
    kind: String,
    function: WireFunction,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    /// A call's arguments always follow the schema (a grammar enforces it): accepted either way.
    #[serde(default, rename = "strict")]
    _strict: Option<bool>,
}

/// Tools, checked one by one (each error names the tool's field), and the tool_choice.
fn tools_and_choice(
    tools: Vec<WireTool>,
    choice: Option<Value>,
) -> Result<Option<(Vec<ToolSpec>, ToolChoice)>, Refused> {
    let mut specs: Vec<ToolSpec> = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        if t.kind != "function" {
            return Err(invalid(
                format!("tools[{i}].type"),
                format!("{:?} is not a tool type; use \"function\"", t.kind),
            ));
        }
        let name = t.function.name;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(invalid(
                format!("tools[{i}].function.name"),
                format!("{name:?} must be 1 to 64 letters, digits, underscores or dashes"),
            ));
        }
        if specs.iter().any(|s| s.name == name) {
            return Err(invalid(format!("tools[{i}].function.name"), format!("{name:?} is defined twice")));
        }
        let param = format!("tools[{i}].function.parameters");
        let parameters =
            t.function.parameters.unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
        if !parameters.is_object() || parameters.get("type").is_some_and(|t| t != "object") {
            return Err(invalid(param, "must be a JSON schema of type \"object\""));
        }
        check_schema(&parameters).map_err(|e| invalid(param, e))?;
        specs.push(ToolSpec { name, description: t.function.description, parameters });
    }
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!("{other:?} is not none, auto, required or a function"),
                ));
            }
        },
        Some(v) => {
            let name = (v.get("type") == Some(&Value::from("function")))
                .then(|| v.pointer("/function/name").and_then(Value::as_str))
                .flatten()
                .ok_or_else(|| {
                    invalid(
                        "tool_choice",
                        "must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}",
                    )
                })?;
            if !specs.iter().any(|s| s.name == name) {
                return Err(invalid(
                    "tool_choice",
                    format!("names the function {name:?}, which is not in tools"),
                ));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    if specs.is_empty() {
        return match choice {
            ToolChoice::Auto => Ok(None),
            _ => Err(invalid("tool_choice", "a function must be called, but the request has no tools")),
        };
    }
    Ok(Some((specs, choice)))
}

/// `response_format`: text (no constraint), any JSON object, or JSON valid for a schema.
fn constraint(format: Value) -> Result<Option<Constraint>, Refused> {
    match format.get("type").and_then(Value::as_str).unwrap_or("") {
        "text" => Ok(None),
        "json_object" => Ok(Some(Constraint::JsonObject)),
        "json_schema" => {
            let schema = format
                .pointer("/json_schema/schema")
                .cloned()
                .ok_or_else(|| invalid("response_format.json_schema.schema", "is required"))?;
            check_schema(&schema).map_err(|e| invalid("response_format.json_schema.schema", e))?;
            Ok(Some(Constraint::JsonSchema(schema)))
        }
        other => {
            Err(invalid("response_format.type", format!("{other:?} is not text, json_object or json_schema")))
        }
    }
}

/// Chat messages, checked: every tool result answers a call an earlier assistant turn made.
fn into_messages(messages: Vec<WireMessage>) -> Result<Vec<ChatMessage>, Refused> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let msg = m.into_message().map_err(|e| invalid(format!("messages[{i}]"), e))?;
        if msg.role == "tool" {
            let Some(id) = &msg.tool_call_id else {
                return Err(invalid(
                    format!("messages[{i}].tool_call_id"),
                    "a tool message needs the id of the call it answers",
                ));
            };
            if !out.iter().any(|p| p.tool_calls.iter().any(|c| &c.id == id)) {
                return Err(invalid(
                    format!("messages[{i}].tool_call_id"),
                    format!("{id:?} answers no call an earlier assistant message made"),
                ));
            }
        }
        out.push(msg);
    }
    if out.is_empty() {
        return Err(invalid("messages", "must not be empty"));
    }
    Ok(out)
}

/// A chat message: a field it does not know (`audio`, …) is refused by name, like the
/// request's own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// The participant's name: accepted; the chat template has no place for it.
    #[serde(default, rename = "name")]
    _name: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    /// An assistant turn's refusal, as the SDKs send the history back: accepted.
    #[serde(default, rename = "refusal")]
    _refusal: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireToolCall {
    id: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    function: WireCall,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireCall {
    name: String,
    arguments: String,
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
        let mut tool_calls = Vec::new();
        for c in self.tool_calls.unwrap_or_default() {
            if self.role != "assistant" {
                return Err("only assistant messages have tool_calls".into());
            }
            if c.kind.as_deref().is_some_and(|k| k != "function") {
                return Err(format!("tool call {:?} is not of type function", c.id));
            }
            tool_calls.push(ToolCall { id: c.id, name: c.function.name, arguments: c.function.arguments });
        }
        if self.tool_call_id.is_some() && self.role != "tool" {
            return Err("only tool messages have a tool_call_id".into());
        }
        Ok(ChatMessage { role: self.role, content, tool_calls, tool_call_id: self.tool_call_id })
    }
}

#[derive(Debug)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbedInput,
    pub encoding_format: Option<String>,
    /// Truncated vectors of this size, where the model's manifest declares it.
    pub dimensions: Option<u32>,
}

impl EmbeddingsRequest {
    pub fn from_body(body: Value) -> Result<EmbeddingsRequest, Refused> {
        Fields::parse(body, |f| {
            Ok(EmbeddingsRequest {
                model: f.required("model")?,
                input: f.required("input")?,
                encoding_format: f.opt("encoding_format")?,
                dimensions: f.opt("dimensions")?,
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

/// The first `d` components of a vector, scaled back to unit length (how a model trained for
/// truncation is truncated); None when the vector is shorter.
pub fn truncated(v: &[f32], d: usize) -> Option<Vec<f32>> {
    let head = v.get(..d)?;
    let norm = head.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    #[allow(clippy::cast_possible_truncation)]
    Some(if norm > 0.0 {
        head.iter().map(|x| (f64::from(*x) / norm) as f32).collect()
    } else {
        head.to_vec()
    })
}

/// Little-endian f32s, base64 (what `encoding_format: base64` asks for).
pub fn f32_base64(v: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for f in v {
        bytes.extend_from_slice(&f.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An embeddings answer, serialised straight from the vectors: no JSON tree of thousands of
/// numbers, and each float written as the shortest text that reads back as the same `f32`.
#[derive(Serialize)]
pub struct Embeddings<'a> {
    pub object: &'static str,
    pub data: Vec<Embedding<'a>>,
    pub model: &'a str,
    pub usage: EmbeddingUsage,
}

#[derive(Serialize)]
pub struct Embedding<'a> {
    pub object: &'static str,
    pub index: usize,
    pub embedding: Vector<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum Vector<'a> {
    Floats(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
}
