//! The local OpenAI-compatible endpoint for on-site applications: `/v1/models` (and
//! `/v1/models/{id}`), `/v1/completions`, `/v1/chat/completions` (both with SSE streaming),
//! `/v1/embeddings`, Prometheus `/metrics`, and `/health` for load balancers. It listens on
//! loopback or a unix socket only, and every request but `/health` needs an API key. A full
//! queue answers 429 at once, streamed or not; models load on first use.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::Path as UrlPath;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream};
use outpost_inference::{GenerateOutcome, GenerateRequest, InferenceError, Manager, ModelFiles, Prompt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ApiSettings, Inference, Listen};
use crate::inference::job::finish_name;

mod metrics;
mod wire;

use wire::{ChatRequest, CompletionRequest, EmbeddingsRequest, Refused};

/// Largest request body.
const MAX_BODY_BYTES: usize = 8 << 20;

#[derive(Clone)]
struct AppState {
    inference: Arc<Inference>,
    keys: Arc<Vec<String>>,
}

/// Reads the API keys: one per line, blank lines and `#` comments ignored.
pub fn read_keys(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read inference.api.api_key_file {}: {e}", path.display()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        anyhow::bail!("inference.api.api_key_file {} holds no key", path.display());
    }
    if let Some(short) = keys.iter().find(|k| k.len() < 16) {
        anyhow::bail!(
            "an API key in {} is {} characters; use at least 16 (e.g. `openssl rand -hex 24`)",
            path.display(),
            short.len()
        );
    }
    Ok(keys)
}

pub fn router(inference: Arc<Inference>, keys: Vec<String>) -> Router {
    let state = AppState { inference, keys: Arc::new(keys) };
    let keyed = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), require_key));
    // Load balancers and app front ends ask whether the endpoint answers, without a key: the
    // answer says nothing about the models.
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .merge(keyed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The endpoint, bound and ready to serve: binding first lets the agent fail at start (a port
/// taken, a key file missing) rather than run without the endpoint it was configured with.
pub struct Endpoint {
    app: Router,
    listener: Bound,
    pub address: String,
}

enum Bound {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Reads the keys and binds the listen address (loopback or a unix socket only).
pub async fn bind(inference: Arc<Inference>, api: &ApiSettings) -> anyhow::Result<Endpoint> {
    let key_file = api
        .api_key_file
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("inference.api.api_key_file is not set"))?;
    let app = router(inference, read_keys(key_file)?);
    let (listener, address) = match api.listen_addr().map_err(anyhow::Error::msg)? {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("inference endpoint cannot listen on {addr}: {e}"))?;
            let address = format!("http://{}", l.local_addr()?);
            (Bound::Tcp(l), address)
        }
        Listen::Unix(path) => {
            if path.exists() {
                std::fs::remove_file(&path)
                    .map_err(|e| anyhow::anyhow!("cannot replace the old socket {}: {e}", path.display()))?;
            }
            let l = tokio::net::UnixListener::bind(&path).map_err(|e| {
                anyhow::anyhow!("inference endpoint cannot listen on {}: {e}", path.display())
            })?;
            (Bound::Unix(l), format!("unix:{}", path.display()))
        }
    };
    Ok(Endpoint { app, listener, address })
}

impl Endpoint {
    /// Serves until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(address = %self.address, "inference endpoint listening");
        let done = async move { shutdown.cancelled().await };
        match self.listener {
            Bound::Tcp(l) => axum::serve(l, self.app).with_graceful_shutdown(done).await?,
            Bound::Unix(l) => axum::serve(l, self.app).with_graceful_shutdown(done).await?,
        }
        Ok(())
    }
}

async fn require_key(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer).unwrap_or("");
    // Compare every key in full so the time taken says nothing about a near miss.
    let ok = st.keys.iter().fold(false, |acc, k| acc | constant_time_eq(k.as_bytes(), given.as_bytes()));
    if !ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or wrong API key: send `Authorization: Bearer KEY` with a key from inference.api.api_key_file"
                .into(),
        );
    }
    next.run(req).await
}

/// The credentials of an `Authorization: Bearer …` header; the scheme is case-insensitive, as
/// every HTTP authentication scheme is.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The OpenAI error type of a status: what the SDKs tell client errors from server errors by.
fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

/// An OpenAI-style error body.
fn error(status: StatusCode, code: &str, message: String) -> Response {
    error_for(status, code, message, None)
}

fn error_for(status: StatusCode, code: &str, message: String, param: Option<&str>) -> Response {
    let kind = error_type(status.as_u16());
    let mut resp =
        (status, Json(json!({"error": {"message": message, "type": kind, "code": code, "param": param}})))
            .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    resp
}

fn inference_error(e: &InferenceError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, e.code(), e.to_string())
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", message.into())
}

fn refused(r: Refused) -> Response {
    error_for(StatusCode::BAD_REQUEST, r.code, r.message, Some(&r.param))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn models(State(st): State<AppState>) -> Response {
    let models = match st.inference.models.list() {
        Ok(m) => m,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "model_store", e.to_string()),
    };
    let data: Vec<Value> = models.iter().map(model_object).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

fn model_object(m: &crate::models::InstalledModel) -> Value {
    json!({
        "id": format!("{}@{}", m.manifest.name, m.manifest.version),
        "object": "model",
        "created": 0,
        "owned_by": "outpost",
        "digest": m.digest,
        "engine": m.manifest.engine,
        "format": m.manifest.format.as_str(),
    })
}

/// `GET /v1/models/{id}`: one model as the list shows it, found the way requests name it
/// (`NAME@VERSION`, `NAME` or digest).
async fn model(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    match resolve_installed(&st, &id).await {
        Ok((m, _)) => Json(model_object(&m)).into_response(),
        Err(response) => response,
    }
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    let body = metrics::render(&st.inference.manager.metrics(), &st.inference.manager.engines());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The model a request names, resolved in the store (off the async workers: it reads files).
async fn resolve(st: &AppState, selector: &str) -> Result<ModelFiles, Response> {
    resolve_installed(st, selector).await.map(|(_, files)| files)
}

/// The model a request names, with its manifest.
async fn resolve_installed(
    st: &AppState,
    selector: &str,
) -> Result<(crate::models::InstalledModel, ModelFiles), Response> {
    let inference = st.inference.clone();
    let selector = selector.to_string();
    tokio::task::spawn_blocking(move || inference.resolve(&selector))
        .await
        .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "engine_error", "model lookup failed".into()))?
        .map_err(|e| inference_error(&e))
}

type Handled = Result<Response, Response>;

/// A JSON body, or a 400 in OpenAI's shape saying what is wrong with it.
// The error is the response itself, built once per failed request: boxing it gains nothing.
#[allow(clippy::result_large_err)]
fn json_body<T>(
    body: Result<Json<Value>, JsonRejection>,
    parse: fn(Value) -> Result<T, Refused>,
) -> Result<T, Response> {
    let value = body.map(|Json(b)| b).map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("the request body is larger than {} MiB", MAX_BODY_BYTES >> 20),
            )
        } else {
            bad_request(e.body_text())
        }
    })?;
    parse(value).map_err(refused)
}

async fn completions(State(st): State<AppState>, body: Result<Json<Value>, JsonRejection>) -> Handled {
    let req = json_body(body, CompletionRequest::from_body)?;
    let prompt = req.prompt.single().map_err(bad_request)?;
    let mut params = req.common.params(16).map_err(bad_request)?;
    params.logprobs = req.logprobs;
    let stream = Streaming::of(&req.common)?;
    let model = resolve(&st, &req.common.model).await?;
    let shape = Shape::Completion { id: request_id("cmpl"), model: req.common.model.clone() };
    Ok(generate(st, model, Prompt::Text(prompt), params, stream, shape).await)
}

async fn chat_completions(State(st): State<AppState>, body: Result<Json<Value>, JsonRejection>) -> Handled {
    let req = json_body(body, ChatRequest::from_body)?;
    let mut common = req.common;
    if let Some(n) = req.max_completion_tokens {
        common.max_tokens = Some(n);
    }
    let mut params = common.params(128).map_err(bad_request)?;
    params.constraint = req.constraint;
    params.logprobs = req.logprobs;
    let stream = Streaming::of(&common)?;
    let model = resolve(&st, &common.model).await?;
    let shape = Shape::Chat { id: request_id("chatcmpl"), model: common.model.clone() };
    let prompt = match req.tools {
        None => Prompt::Chat(req.messages),
        Some((tools, choice)) => Prompt::Tools { messages: req.messages, tools, choice },
    };
    Ok(generate(st, model, prompt, params, stream, shape).await)
}

/// Whether the answer streams, and whether the stream ends with a usage chunk.
#[derive(Clone, Copy)]
enum Streaming {
    No,
    Yes { usage: bool },
}

impl Streaming {
    #[allow(clippy::result_large_err)]
    fn of(common: &wire::Common) -> Result<Streaming, Response> {
        let usage = common.include_usage().map_err(refused)?;
        Ok(if common.streaming() { Streaming::Yes { usage } } else { Streaming::No })
    }
}

/// How a generation's answer is shaped: text completion or chat completion.
#[derive(Clone)]
enum Shape {
    Completion { id: String, model: String },
    Chat { id: String, model: String },
}

impl Shape {
    fn whole(&self, out: &GenerateOutcome) -> Value {
        let usage = usage(out);
        let finish = finish_name(out.stats.finish);
        let fingerprint = format!("{}:{}", out.engine, out.model_digest);
        match self {
            Shape::Completion { id, model } => json!({
                "id": id, "object": "text_completion", "created": now_secs(), "model": model,
                "system_fingerprint": fingerprint,
                "choices": [{"index": 0, "text": out.text, "logprobs": completion_logprobs(out), "finish_reason": finish}],
                "usage": usage,
            }),
            Shape::Chat { id, model } => {
                let mut message = json!({"role": "assistant", "content": out.text});
                if !out.tool_calls.is_empty() {
                    if out.text.is_empty() {
                        message["content"] = Value::Null;
                    }
                    message["tool_calls"] = tool_calls_value(out, false);
                }
                json!({
                    "id": id, "object": "chat.completion", "created": now_secs(), "model": model,
                    "system_fingerprint": fingerprint,
                    "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(out), "finish_reason": finish}],
                    "usage": usage,
                })
            }
        }
    }

    /// The chunk with the answer's tool calls, each whole (streamed once the calls are parsed).
    fn tool_calls_chunk(&self, out: &GenerateOutcome, first: bool) -> Option<Value> {
        let Shape::Chat { id, model } = self else { return None };
        let mut delta = json!({"tool_calls": tool_calls_value(out, true)});
        if first {
            delta["role"] = "assistant".into();
        }
        Some(json!({
            "id": id, "object": "chat.completion.chunk", "created": now_secs(), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}],
        }))
    }

    /// The chunk `stream_options.include_usage` asks for: no choices, the usage.
    fn usage_chunk(&self, out: &GenerateOutcome) -> Value {
        let (id, model, object) = match self {
            Shape::Completion { id, model } => (id, model, "text_completion"),
            Shape::Chat { id, model } => (id, model, "chat.completion.chunk"),
        };
        json!({"id": id, "object": object, "created": now_secs(), "model": model, "choices": [], "usage": usage(out)})
    }

    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        match self {
            Shape::Completion { id, model } => json!({
                "id": id, "object": "text_completion", "created": now_secs(), "model": model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
            }),
            Shape::Chat { id, model } => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({
                    "id": id, "object": "chat.completion.chunk", "created": now_secs(), "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
        }
    }
}

/// A token's text (lossy where it is part of a character).
fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Chat log probabilities: `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`.
fn chat_logprobs(out: &GenerateOutcome) -> Value {
    let Some(all) = &out.logprobs else { return Value::Null };
    let entry =
        |bytes: &[u8], logprob: f32| json!({"token": token_text(bytes), "logprob": logprob, "bytes": bytes});
    let content: Vec<Value> = all
        .iter()
        .map(|lp| {
            let mut e = entry(&lp.bytes, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|(b, l)| entry(b, *l)).collect::<Vec<_>>().into();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Legacy completion log probabilities: parallel lists of tokens, their log probabilities,
/// the alternatives and each token's offset in the text.
fn completion_logprobs(out: &GenerateOutcome) -> Value {
    let Some(all) = &out.logprobs else { return Value::Null };
    let mut offset = 0;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for lp in all {
        let t = token_text(&lp.bytes);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        lps.push(lp.logprob);
        let top: serde_json::Map<String, Value> =
            lp.top.iter().map(|(b, l)| (token_text(b), json!(l))).collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// The tool calls in OpenAI's shape, each with an id of its own (and its index, in a stream).
fn tool_calls_value(out: &GenerateOutcome, indexed: bool) -> Value {
    let calls: Vec<Value> = out
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let id = if c.id.is_empty() {
                format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
            } else {
                c.id.clone()
            };
            let mut v =
                json!({"id": id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}});
            if indexed {
                v["index"] = i.into();
            }
            v
        })
        .collect();
    Value::Array(calls)
}

/// A stream's text chunks, serialised once up to the text: per piece only the text is escaped
/// and copied (no JSON tree, no clock read per token).
struct PieceFrames {
    head: String,
    head_first: String,
    tail: &'static str,
}

impl PieceFrames {
    fn new(shape: &Shape) -> Self {
        let created = now_secs();
        let quoted = |s: &str| Value::from(s).to_string();
        match shape {
            Shape::Completion { id, model } => {
                let head = format!(
                    r#"{{"id":{},"object":"text_completion","created":{created},"model":{},"choices":[{{"index":0,"text":"#,
                    quoted(id),
                    quoted(model)
                );
                Self { head_first: head.clone(), head, tail: r#","logprobs":null,"finish_reason":null}]}"# }
            }
            Shape::Chat { id, model } => {
                let base = format!(
                    r#"{{"id":{},"object":"chat.completion.chunk","created":{created},"model":{},"choices":[{{"index":0,"delta":{{"#,
                    quoted(id),
                    quoted(model)
                );
                Self {
                    head: format!(r#"{base}"content":"#),
                    head_first: format!(r#"{base}"role":"assistant","content":"#),
                    tail: r#"},"logprobs":null,"finish_reason":null}]}"#,
                }
            }
        }
    }

    fn chunk(&self, text: &str, first: bool) -> String {
        let head = if first { &self.head_first } else { &self.head };
        let mut out = Vec::with_capacity(head.len() + text.len() + 2 + self.tail.len());
        out.extend_from_slice(head.as_bytes());
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, text);
        out.extend_from_slice(self.tail.as_bytes());
        String::from_utf8(out).unwrap_or_default()
    }
}

fn usage(out: &GenerateOutcome) -> Value {
    let (p, c) = (out.stats.prompt_tokens, out.stats.completion_tokens);
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

async fn generate(
    st: AppState,
    model: ModelFiles,
    prompt: Prompt,
    req: GenerateRequest,
    stream: Streaming,
    shape: Shape,
) -> Response {
    let Streaming::Yes { usage } = stream else {
        return match st.inference.manager.generate(&model, prompt, req, None).await {
            Ok(out) => Json(shape.whole(&out)).into_response(),
            Err(e) => inference_error(&e),
        };
    };
    let (tx, mut rx) = mpsc::channel::<String>(256);
    let (done_tx, mut done_rx) = oneshot::channel();
    let inference = st.inference.clone();
    tokio::spawn(async move {
        let out = Manager::generate(&inference.manager, &model, prompt, req, Some(tx)).await;
        let _ = done_tx.send(out);
    });
    // Errors that come before the first token (queue full, prompt too long, model over budget)
    // get their HTTP status, as without streaming: nothing is sent until a token exists or the
    // generation has ended. The piece channel closes before the outcome is sent, so a closed
    // channel means "wait for the outcome", never "stream".
    let first = tokio::select! {
        // Pieces first: an outcome that is ready with pieces still queued streams them.
        biased;
        piece = rx.recv() => piece,
        done = &mut done_rx => return ended_before_streaming(shape, rx, done, usage),
    };
    match first {
        Some(piece) => sse(shape, Some(piece), rx, None, Some(done_rx), usage),
        None => ended_before_streaming(shape, rx, done_rx.await, usage),
    }
}

/// A streamed generation that ended before its first piece was taken: an error gets its status;
/// a success is streamed, with whatever pieces are still queued, then its final chunk.
fn ended_before_streaming(
    shape: Shape,
    mut rx: mpsc::Receiver<String>,
    done: Result<Result<GenerateOutcome, InferenceError>, oneshot::error::RecvError>,
    usage: bool,
) -> Response {
    match done {
        Ok(Err(e)) => inference_error(&e),
        Ok(Ok(out)) => {
            let mut text = String::new();
            while let Ok(piece) = rx.try_recv() {
                text.push_str(&piece);
            }
            sse(shape, (!text.is_empty()).then_some(text), rx, Some(Ok(out)), None, usage)
        }
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "engine_error", "generation stopped".into()),
    }
}

/// The shortest time between two text events of one stream. Pieces that come faster than this
/// wait and go out together in one event, so a fast model costs one wake-up of the HTTP task,
/// one socket write and one client parse per frame instead of per token: the compute threads
/// are interrupted at most 200 times a second. A piece never waits longer than this, the first
/// one not at all, and the end of the generation cuts the wait short.
const FRAME: Duration = Duration::from_millis(5);

type Outcome = Result<GenerateOutcome, InferenceError>;

/// The SSE stream: a first chunk (with the role, for chat), one chunk per piece (or per run of
/// pieces that arrived within a frame), a final chunk with the finish reason, then `[DONE]`.
fn sse(
    shape: Shape,
    first: Option<String>,
    rx: mpsc::Receiver<String>,
    finished: Option<Outcome>,
    done_rx: Option<oneshot::Receiver<Outcome>>,
    usage: bool,
) -> Response {
    struct St {
        shape: Shape,
        frames: PieceFrames,
        pending: Option<String>,
        rx: mpsc::Receiver<String>,
        finished: Option<Outcome>,
        done_rx: Option<oneshot::Receiver<Outcome>>,
        usage: bool,
        started: bool,
        over: bool,
        last_event: Option<Instant>,
    }
    impl St {
        /// Waits until `until`, or until the generation has ended (its outcome is then kept:
        /// every piece is queued before it).
        async fn pace(&mut self, until: Instant) {
            let Some(done) = self.done_rx.as_mut() else {
                return tokio::time::sleep_until(until).await;
            };
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                out = done => {
                    self.done_rx = None;
                    self.finished = Some(out.unwrap_or(Err(InferenceError::WorkerGone)));
                }
            }
        }
    }
    let frames = PieceFrames::new(&shape);
    let init = St {
        shape,
        frames,
        pending: first,
        rx,
        finished,
        done_rx,
        usage,
        started: false,
        over: false,
        last_event: None,
    };
    let events = stream::unfold(init, |mut s| async move {
        if s.over {
            return None;
        }
        let piece = match s.pending.take() {
            Some(p) => Some(p),
            None => {
                if let Some(at) = s.last_event
                    && s.finished.is_none()
                {
                    s.pace(at + FRAME).await;
                }
                if s.finished.is_none() { s.rx.recv().await } else { s.rx.try_recv().ok() }
            }
        };
        // Pieces that arrived while the last event was being written go out as one event: a
        // client that lags gets fewer, larger chunks instead of a backlog of tiny ones.
        let piece = piece.map(|mut p| {
            while let Ok(more) = s.rx.try_recv() {
                p.push_str(&more);
            }
            p
        });
        let data = if let Some(piece) = piece {
            let first = !s.started;
            s.started = true;
            s.last_event = Some(Instant::now());
            s.frames.chunk(&piece, first)
        } else {
            let out = match s.finished.take() {
                Some(o) => o,
                None => match s.done_rx.take() {
                    Some(rx) => rx.await.unwrap_or(Err(InferenceError::WorkerGone)),
                    None => Err(InferenceError::WorkerGone),
                },
            };
            s.over = true;
            let mut events = Vec::with_capacity(3);
            match out {
                Ok(o) => {
                    if !o.tool_calls.is_empty()
                        && let Some(chunk) = s.shape.tool_calls_chunk(&o, !s.started)
                    {
                        events.push(chunk.to_string());
                        s.started = true;
                    }
                    events.push(s.shape.chunk(None, Some(finish_name(o.stats.finish)), !s.started).to_string());
                    if s.usage {
                        events.push(s.shape.usage_chunk(&o).to_string());
                    }
                }
                // After the first token the status is sent: the error travels in the stream,
                // typed by its cause.
                Err(e) => events.push(
                    json!({"error": {"message": e.to_string(), "type": error_type(e.status()), "code": e.code(), "param": null}})
                        .to_string(),
                ),
            }
            events.push("[DONE]".into());
            let events: Vec<Result<Event, Infallible>> =
                events.into_iter().map(|d| Ok(Event::default().data(d))).collect();
            return Some((stream::iter(events), s));
        };
        Some((stream::iter(vec![Ok(Event::default().data(data))]), s))
    });
    let flat: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(futures_util::StreamExt::flatten(events));
    Sse::new(flat).into_response()
}

async fn embeddings(State(st): State<AppState>, body: Result<Json<Value>, JsonRejection>) -> Handled {
    let req = json_body(body, EmbeddingsRequest::from_body)?;
    let texts = req.input.texts().map_err(bad_request)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(bad_request(format!("encoding_format {other:?}: use float or base64"))),
    };
    let (installed, model) = resolve_installed(&st, &req.model).await?;
    if let Some(d) = req.dimensions {
        let declared = &installed.manifest.embedding_dimensions;
        if !declared.contains(&d) {
            let why = if declared.is_empty() {
                format!(
                    "model {} declares no truncated sizes in its manifest; its vectors have their full size",
                    model.label
                )
            } else {
                let sizes: Vec<String> = declared.iter().map(u32::to_string).collect();
                format!(
                    "model {} declares the sizes {} in its manifest, not {d}",
                    model.label,
                    sizes.join(", ")
                )
            };
            return Err(refused(Refused {
                param: "dimensions".into(),
                code: "unsupported_value",
                message: format!("dimensions: {why}"),
            }));
        }
    }
    let mut out = st.inference.manager.embed(&model, texts).await.map_err(|e| inference_error(&e))?;
    if let Some(d) = req.dimensions {
        for v in &mut out.vectors {
            let full = v.len();
            *v = wire::truncated(v, d as usize).ok_or_else(|| {
                inference_error(&InferenceError::InvalidModel {
                    path: model.label.clone(),
                    format: "safetensors",
                    reason: format!("its manifest declares {d} dimensions but its vectors have {full}"),
                })
            })?;
        }
    }
    let data = out
        .vectors
        .iter()
        .enumerate()
        .map(|(index, v)| wire::Embedding {
            object: "embedding",
            index,
            embedding: if base64 {
                wire::Vector::Base64(wire::f32_base64(v))
            } else {
                wire::Vector::Floats(v)
            },
        })
        .collect();
    let usage = wire::EmbeddingUsage { prompt_tokens: out.tokens, total_tokens: out.tokens };
    Ok(Json(wire::Embeddings { object: "list", data, model: &req.model, usage }).into_response())
}

#[cfg(test)]
mod tests;
