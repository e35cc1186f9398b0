//! The llama.cpp adapter (cargo feature `llama`, through llama-cpp-2): owns the process-wide
//! llama.cpp backend, GGUF text generation and the models' chat templates. It must never hand
//! llama.cpp a file that [`crate::gguf::check`] has not passed, nor panic on any input: a panic
//! aborts the whole agent in release builds.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{LogOptions, send_logs_to_tracing};

use crate::engine::plain_chat_prompt;
use crate::gguf::{self, GgufInfo};
use crate::tools::{ToolFormat, ToolSpec};
use crate::{
    Capabilities, ChatMessage, EmbedOutput, FinishReason, GenerateRequest, GenerateStats, InferenceEngine,
    InferenceError, LoadOptions, LoadedModel, Logprob, MemoryEstimate, ModelFiles, Piece, Result, TokenSink,
};

const ENGINE: &str = "llama";
/// The llama-cpp-2 release in Cargo.lock (a test checks they agree).
pub const LLAMA_CPP_2_VERSION: &str = "0.1.160";
/// Context window when the load options leave it to the model: its own, at most this.
pub const DEFAULT_CONTEXT_CAP: u32 = 4096;
/// Prompt tokens decoded per batch (llama.cpp's `n_batch` and `n_ubatch`).
pub const PROMPT_BATCH: u32 = 512;
/// Memory llama.cpp's compute buffers take besides weights and KV cache: a base plus
/// activations of one prompt batch.
const COMPUTE_BASE_BYTES: u64 = 32 << 20;
const ACTIVATION_FLOATS_PER_EMBD: u64 = 8;

/// The backend can be initialised once per process; every engine shares it.
static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();

fn backend() -> Result<&'static LlamaBackend> {
    let backend = BACKEND.get_or_init(|| {
        // llama.cpp logs to stderr unless told otherwise: route it to `tracing`
        // (target `llama-cpp-2`; its INFO lines are chatty, filter them at `warn`).
        send_logs_to_tracing(LogOptions::default());
        LlamaBackend::init().map_err(|e| e.to_string())
    });
    backend.as_ref().map_err(|e| InferenceError::engine(ENGINE, format!("cannot initialise llama.cpp: {e}")))
}

/// The llama.cpp engine: GGUF generation models.
#[derive(Debug)]
pub struct LlamaEngine {
    backend: &'static LlamaBackend,
}

impl LlamaEngine {
    /// Initialises llama.cpp's backend (once per process; later calls share it).
    pub fn new() -> Result<Self> {
        Ok(Self { backend: backend()? })
    }
}

impl InferenceEngine for LlamaEngine {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn version(&self) -> String {
        format!("llama.cpp via llama-cpp-2 {LLAMA_CPP_2_VERSION}")
    }

    fn inspect(&self, model: &ModelFiles, opts: &LoadOptions) -> Result<MemoryEstimate> {
        let path = gguf_path(model)?;
        let info = gguf::check(path)?;
        let n_ctx = context_size(opts, context_length(path, &info)?)?;
        Ok(estimate(&info, n_ctx, offload(opts)))
    }

    fn load(&self, model: &ModelFiles, opts: &LoadOptions) -> Result<Box<dyn LoadedModel>> {
        let path = gguf_path(model)?;
        // Checked again here: load must be safe whoever calls it, and the file may have changed.
        let info = gguf::check(path)?;
        let trained = context_length(path, &info)?;
        let n_ctx = context_size(opts, trained)?;
        let gpu_layers = if offload(opts) { u32::MAX } else { 0 };
        let params = LlamaModelParams::default().with_n_gpu_layers(gpu_layers);
        let started = Instant::now();
        let llama = LlamaModel::load_from_file(self.backend, path, &params).map_err(|e| match e {
            llama_cpp_2::LlamaModelLoadError::NullResult => InferenceError::InvalidModel {
                path: path.display().to_string(),
                format: "GGUF",
                reason: "llama.cpp refused to load it (its log, target llama-cpp-2, says why)".into(),
            },
            other => InferenceError::engine(ENGINE, format!("loading {}: {other}", path.display())),
        })?;
        // Without a template in the file the plain prompt is used.
        let template = llama.chat_template(None).ok();
        let jinja = template.as_ref().and_then(|t| t.to_str().ok()).and_then(|source| {
            let vocab = llama.vocab();
            let text = |t| vocab.text(t).and_then(|c| c.to_str().ok()).unwrap_or("").to_string();
            let bos = if vocab.should_add_bos() { text(vocab.bos()) } else { String::new() };
            Jinja::new(source, bos, text(vocab.eos()))
                .map_err(|e| tracing::debug!(model = %model.label, error = %e, "chat template is not Jinja minijinja reads"))
                .ok()
        });
        tracing::debug!(
            model = %model.label,
            n_ctx,
            gpu_layers,
            chat_template = template.is_some(),
            tool_format = ?jinja.as_ref().and_then(|j| j.tool_format),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "llama model loaded"
        );
        Ok(Box::new(LlamaLoaded {
            backend: self.backend,
            model: Arc::new(llama),
            label: model.label.clone(),
            n_ctx,
            threads: threads(opts.threads),
            template,
            jinja,
            new_context: Mutex::new(()),
            token_utf8: OnceLock::new(),
        }))
    }
}

fn gguf_path(model: &ModelFiles) -> Result<&Path> {
    model.find_suffix(".gguf").map(|p| p.as_path()).ok_or_else(|| InferenceError::InvalidModel {
        path: model.label.clone(),
        format: "GGUF",
        reason: "the model has no .gguf file".into(),
    })
}

/// The model's trained context, refused where llama.cpp could not represent it.
fn context_length(path: &Path, info: &GgufInfo) -> Result<Option<u32>> {
    match info.context_length {
        None | Some(0) => Ok(None),
        Some(n) => match u32::try_from(n) {
            Ok(n) if i32::try_from(n).is_ok() => Ok(Some(n)),
            _ => Err(InferenceError::InvalidModel {
                path: path.display().to_string(),
                format: "GGUF",
                reason: format!("{}.context_length {n} is out of range", info.architecture),
            }),
        },
    }
}

/// The context window a load gets: the options' own, else the model's capped at
/// [`DEFAULT_CONTEXT_CAP`].
fn context_size(opts: &LoadOptions, trained: Option<u32>) -> Result<u32> {
    let n = if opts.context > 0 {
        opts.context
    } else {
        trained.map_or(DEFAULT_CONTEXT_CAP, |t| t.min(DEFAULT_CONTEXT_CAP))
    };
    if i32::try_from(n).is_err() {
        return Err(InferenceError::BadRequest(format!("a context of {n} tokens is too large")));
    }
    Ok(n)
}

fn offload(opts: &LoadOptions) -> bool {
    opts.gpu && cfg!(feature = "cuda")
}

fn threads(n: usize) -> i32 {
    let n = if n == 0 { std::thread::available_parallelism().map_or(1, usize::from) } else { n };
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Weights + f16 KV cache for `n_ctx` tokens + compute buffers; on the GPU when offloading.
fn estimate(info: &GgufInfo, n_ctx: u32, offload: bool) -> MemoryEstimate {
    let embd = info.embedding_length.unwrap_or(0);
    let heads = info.head_count.unwrap_or(0);
    let kv_embd = match (heads, info.head_count_kv) {
        (0, _) => embd,
        (h, Some(kv)) => embd.saturating_mul(kv) / h,
        (_, None) => embd,
    };
    let kv_cache = u64::from(n_ctx)
        .saturating_mul(info.block_count.unwrap_or(0))
        .saturating_mul(2) // K and V
        .saturating_mul(kv_embd)
        .saturating_mul(2); // f16
    let compute = COMPUTE_BASE_BYTES.saturating_add(
        u64::from(PROMPT_BATCH).saturating_mul(embd).saturating_mul(4 * ACTIVATION_FLOATS_PER_EMBD),
    );
    let model = info.file_bytes.saturating_add(kv_cache).saturating_add(compute);
    if offload {
        // Host side: llama.cpp's staging and output buffers.
        MemoryEstimate { ram_bytes: compute, vram_bytes: model }
    } else {
        MemoryEstimate { ram_bytes: model, vram_bytes: 0 }
    }
}

struct LlamaLoaded {
    backend: &'static LlamaBackend,
    model: Arc<LlamaModel>,
    label: String,
    n_ctx: u32,
    threads: i32,
    template: Option<LlamaChatTemplate>,
    /// The same template as Jinja: for tools, tool calls in the history, and templates
    /// llama.cpp's own formatter does not know.
    jinja: Option<Jinja>,
    /// llama.cpp may write to the model while it creates a context: one at a time.
    new_context: Mutex<()>,
    /// Each token's text as UTF-8, made on the first constrained request.
    token_utf8: OnceLock<Vec<TokenUtf8>>,
}

impl LlamaLoaded {
    /// The log probability of `token` in the model's distribution (`logits`, before any sampling
    /// step) and the `top` most likely tokens.
    fn logprob(&self, logits: &[f32], token: LlamaToken, bytes: &[u8], top: u8) -> Logprob {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        #[allow(clippy::cast_possible_truncation)]
        let lse = max + sum.ln() as f32;
        let at = |t: usize| logits.get(t).map_or(f32::NEG_INFINITY, |l| l - lse);
        let mut best: Vec<(usize, f32)> = Vec::with_capacity(usize::from(top) + 1);
        if top > 0 {
            for (i, &l) in logits.iter().enumerate() {
                if best.len() < usize::from(top) || l > best[best.len() - 1].1 {
                    let pos = best.partition_point(|&(_, b)| b >= l);
                    best.insert(pos, (i, l));
                    best.truncate(usize::from(top));
                }
            }
        }
        let vocab = self.model.vocab();
        let mut piece = Vec::new();
        let top = best
            .into_iter()
            .map(|(i, _)| {
                piece.clear();
                #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
                vocab.token_to_piece_into(LlamaToken::new(i as i32), &mut piece, false, None);
                (piece.clone(), at(i))
            })
            .collect();
        let index = usize::try_from(token.0).unwrap_or(usize::MAX);
        Logprob { bytes: bytes.to_vec(), logprob: at(index), top }
    }
}

/// What a token's bytes are as UTF-8.
enum TokenUtf8 {
    Empty,
    /// Whole characters.
    Valid,
    /// Part of a character, or bytes that are no UTF-8 at all.
    Bytes(Box<[u8]>),
}

impl LlamaLoaded {
    /// Takes out (logit −∞) every candidate whose bytes, after `pending` (the start of a
    /// character the text so far ends with), cannot be the start of valid UTF-8.
    fn utf8_only(
        &self,
        candidates: &mut llama_cpp_2::token::data_array::LlamaTokenDataArray,
        pending: &[u8],
    ) {
        let table = self.token_utf8.get_or_init(|| {
            let vocab = self.model.vocab();
            let mut piece = Vec::with_capacity(32);
            vocab
                .tokens()
                .map(|t| {
                    piece.clear();
                    vocab.token_to_piece_into(t, &mut piece, false, None);
                    match std::str::from_utf8(&piece) {
                        _ if piece.is_empty() => TokenUtf8::Empty,
                        Ok(_) => TokenUtf8::Valid,
                        Err(_) => TokenUtf8::Bytes(piece.as_slice().into()),
                    }
                })
                .collect()
        });
        let mut joined = Vec::with_capacity(8);
        for c in candidates.data.iter_mut() {
            let ok = match usize::try_from(c.id().0).ok().and_then(|i| table.get(i)) {
                None | Some(TokenUtf8::Empty) => true,
                Some(TokenUtf8::Valid) => pending.is_empty(),
                Some(TokenUtf8::Bytes(b)) => {
                    joined.clear();
                    joined.extend_from_slice(pending);
                    joined.extend_from_slice(b);
                    std::str::from_utf8(&joined).map_or_else(|e| e.error_len().is_none(), |_| true)
                }
            };
            if !ok {
                c.set_logit(f32::NEG_INFINITY);
            }
        }
    }
}

impl LlamaLoaded {
    fn context(&self) -> Result<LlamaContext<'_>> {
        let batch = PROMPT_BATCH.min(self.n_ctx);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.n_ctx))
            .with_n_batch(batch)
            .with_n_ubatch(batch)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads)
            .with_no_perf(true);
        let _guard = self.new_context.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.model.new_context(self.backend, params).map_err(|e| {
            InferenceError::engine(ENGINE, format!("creating a context for {}: {e}", self.label))
        })
    }

    fn tokenize(&self, prompt: &str) -> Result<Vec<LlamaToken>> {
        // llama.cpp takes the length as an i32; a prompt that long cannot fit any context.
        if i32::try_from(prompt.len()).is_err() {
            return Err(InferenceError::PromptTooLong {
                model: self.label.clone(),
                prompt_tokens: prompt.len(),
                context: self.n_ctx as usize,
            });
        }
        // BOS as the model wants it; special tokens parsed, as chat templates write them.
        Ok(self.model.vocab().tokenize(prompt.as_bytes(), true, true))
    }
}

impl LlamaLoaded {
    /// How the request samples ([`Sampling`]): its chain, and the constraint's grammar, on from
    /// the start or waiting for the model to open a tool call.
    fn sampler(&self, req: &GenerateRequest) -> Result<Sampling> {
        let mut chain = Vec::with_capacity(4);
        if req.presence_penalty != 0.0 || req.frequency_penalty != 0.0 {
            let last_n = i32::try_from(req.max_tokens).unwrap_or(i32::MAX);
            chain.push(LlamaSampler::penalties(
                self.model.n_vocab(),
                last_n,
                1.0,
                req.frequency_penalty,
                req.presence_penalty,
            ));
        }
        if req.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if req.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(req.top_p.max(0.0), 1));
            }
            chain.push(LlamaSampler::temp(req.temperature));
            chain.push(LlamaSampler::dist(seed32(req.seed)));
        }
        let chain = if chain.len() == 1 { chain.remove(0) } else { LlamaSampler::chain(chain, true) };
        let mut sampling = Sampling { grammar: None, chain, after_tag: None };
        let Some(c) = &req.constraint else { return Ok(sampling) };
        let gbnf = llama_cpp_2::json_schema_to_grammar(&c.schema().to_string()).map_err(|e| {
            InferenceError::BadRequest(format!("the JSON schema cannot be turned into a grammar ({e})"))
        })?;
        match (c.around(), c.lazy_after()) {
            (_, Some((open, after, close))) => {
                // Switched on by the generation loop once the model writes `open` (llama.cpp's
                // own lazy grammar scans all the text so far with a regex on every token,
                // which recurses per character and can overflow a compute thread's stack).
                sampling.after_tag = Some((open, self.grammar(&wrap_grammar(&gbnf, after, close))?));
            }
            (Some((open, close)), None) => {
                sampling.grammar = Some(self.grammar(&wrap_grammar(&gbnf, open, close))?)
            }
            (None, None) => sampling.grammar = Some(self.grammar(&gbnf)?),
        }
        Ok(sampling)
    }

    fn grammar(&self, gbnf: &str) -> Result<LlamaSampler> {
        LlamaSampler::grammar(&self.model, gbnf, "root")
            .map_err(|e| InferenceError::BadRequest(format!("the request's grammar is not valid: {e}")))
    }

    /// A waiting grammar switched on once the opening tag is written: fed the text already
    /// written after the tag. None when that text does not fit (the call will not parse and
    /// comes back as content).
    fn grammar_after(&self, mut grammar: LlamaSampler, rest: &str) -> Option<LlamaSampler> {
        for t in self.model.vocab().tokenize(rest.as_bytes(), false, false) {
            grammar.try_accept(t).ok()?;
        }
        Some(grammar)
    }
}

/// How a request samples: the constraint's grammar (when on) removes every token it forbids,
/// then the chain (penalties, nucleus, temperature, the draw or the most likely token).
struct Sampling {
    grammar: Option<LlamaSampler>,
    chain: LlamaSampler,
    /// A grammar waiting for the model to open a tool call: the tag, and the grammar of what
    /// follows it.
    after_tag: Option<(&'static str, LlamaSampler)>,
}

/// A schema grammar between two literals: its root becomes a rule of its own.
fn wrap_grammar(gbnf: &str, open: &str, close: &str) -> String {
    const INNER: &str = "outpost-wrapped-root";
    let mut out = format!("root ::= {} {INNER} {}\n", gbnf_literal(open), gbnf_literal(close));
    for line in gbnf.lines() {
        match line.strip_prefix("root ::=") {
            Some(rest) => out.push_str(&format!("{INNER} ::={rest}")),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn gbnf_literal(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A chat template run as Jinja (minijinja with Python's string methods), as the model's
/// authors wrote it for Hugging Face's tokenizer.
struct Jinja {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
    /// How the template writes tool calls; None when it leaves tools out.
    tool_format: Option<ToolFormat>,
}

/// Fuel for one rendering (minijinja's instruction budget): a template that loops without end
/// fails instead of holding a compute thread.
const TEMPLATE_FUEL: u64 = 50_000_000;

impl Jinja {
    fn new(source: &str, bos: String, eos: String) -> std::result::Result<Jinja, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(TEMPLATE_FUEL));
        // As Hugging Face's tokenizer (and llama.cpp) run chat templates.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| String::new());
        env.add_template_owned("chat", source.to_string())?;
        let mut jinja = Jinja { env, bos, eos, tool_format: None };
        // Whether the template shows tools: render a chat with one and look for its name.
        const PROBE: &str = "outpost_probe_function";
        let probe = ToolSpec {
            name: PROBE.into(),
            description: Some("probe".into()),
            parameters: serde_json::json!({"type": "object", "properties": {}}),
        };
        let shown =
            jinja.render(&[ChatMessage::new("user", "hi")], Some(&[probe])).is_ok_and(|p| p.contains(PROBE));
        // The call formats Outpost reads; a template that shows tools but writes calls some
        // other way (e.g. Mistral's `[TOOL_CALLS]`) has no tool support here.
        jinja.tool_format = if !shown {
            None
        } else if source.contains(crate::tools::CALL_OPEN) {
            Some(ToolFormat::Tagged)
        } else if source.contains("\"name\"") && !source.contains("[TOOL_CALLS]") {
            Some(ToolFormat::Json)
        } else {
            None
        };
        Ok(jinja)
    }

    fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[ToolSpec]>,
    ) -> std::result::Result<String, minijinja::Error> {
        let messages: Vec<serde_json::Value> = messages.iter().map(message_value).collect();
        let tools: Option<Vec<serde_json::Value>> =
            tools.map(|t| t.iter().map(ToolSpec::template_value).collect());
        let ctx = minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        };
        let prompt = self.env.get_template("chat")?.render(ctx)?;
        // The tokenizer adds BOS itself.
        Ok(match prompt.strip_prefix(self.bos.as_str()) {
            Some(rest) if !self.bos.is_empty() => rest.to_string(),
            _ => prompt,
        })
    }
}

/// A message as Hugging Face templates read it: a call's arguments as an object.
fn message_value(m: &ChatMessage) -> serde_json::Value {
    // OpenAI's newer name for the system turn; templates know `system`.
    let role = if m.role == "developer" { "system" } else { m.role.as_str() };
    let mut v = serde_json::json!({"role": role, "content": m.content});
    if !m.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let arguments = serde_json::from_str::<serde_json::Value>(&c.arguments)
                    .unwrap_or_else(|_| serde_json::Value::String(c.arguments.clone()));
                serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments}})
            })
            .collect();
        v["tool_calls"] = calls.into();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = id.clone().into();
    }
    v
}

/// Folds the request's 64-bit seed into llama.cpp's 32 bits, avoiding `u32::MAX`, which
/// llama.cpp reads as "pick a random seed".
fn seed32(seed: u64) -> u32 {
    #[allow(clippy::cast_possible_truncation)]
    let s = (seed ^ (seed >> 32)) as u32;
    if s == u32::MAX { u32::MAX - 1 } else { s }
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1e3
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl LoadedModel for LlamaLoaded {
    fn capabilities(&self) -> Capabilities {
        Capabilities { generate: true, embed: false }
    }

    fn context_length(&self) -> u32 {
        self.n_ctx
    }

    fn chat_prompt(&self, messages: &[ChatMessage], tools: Option<&[ToolSpec]>) -> Result<String> {
        let bytes =
            messages.iter().map(|m| m.role.len() + m.content.len()).fold(0usize, usize::saturating_add);
        // llama-cpp-2 sizes its buffer as an i32 of twice the text: keep well inside that.
        if bytes > (i32::MAX / 4) as usize {
            return Err(InferenceError::BadRequest(format!("the chat is {bytes} bytes long")));
        }
        if messages.iter().any(|m| m.content.contains('\0') || m.role.contains('\0')) {
            return Err(InferenceError::BadRequest("a chat message contains a NUL character".into()));
        }
        let jinja = |tools| -> Result<Option<String>> {
            let Some(j) = &self.jinja else { return Ok(None) };
            match j.render(messages, tools) {
                Ok(p) => Ok(Some(p)),
                // The template itself refused the chat (raise_exception): the caller's to fix.
                Err(e) if e.kind() == minijinja::ErrorKind::InvalidOperation => Err(
                    InferenceError::BadRequest(format!("the model's chat template refused the chat: {e}")),
                ),
                Err(e) => {
                    tracing::warn!(model = %self.label, error = %e, "chat template failed as Jinja");
                    Ok(None)
                }
            }
        };
        if let Some(tools) = tools {
            if self.jinja.as_ref().and_then(|j| j.tool_format).is_none() {
                return Err(InferenceError::BadRequest(format!(
                    "model {} has no chat template with tool support",
                    self.label
                )));
            }
            return jinja(Some(tools))?.ok_or_else(|| {
                InferenceError::BadRequest(format!(
                    "model {}: its chat template cannot show these tools",
                    self.label
                ))
            });
        }
        // Calls and their results in the history need the template's own Jinja.
        let history_has_tools = messages.iter().any(|m| !m.tool_calls.is_empty() || m.tool_call_id.is_some());
        if history_has_tools {
            return jinja(None)?.ok_or_else(|| {
                InferenceError::BadRequest(format!(
                    "model {}: its chat template cannot show tool calls and results in the history",
                    self.label
                ))
            });
        }
        let Some(template) = &self.template else {
            return Ok(plain_chat_prompt(messages));
        };
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| InferenceError::BadRequest("a chat message contains a NUL character".into()))?;
        match self.model.apply_chat_template(template, &chat, true) {
            Ok(prompt) => Ok(prompt),
            Err(e) => {
                // A template llama.cpp's formatter does not know: the Jinja itself, where it
                // renders the last message; else the plain prompt.
                let last = messages.last().map_or("", |m| m.content.as_str());
                if let Some(p) = jinja(None)?.filter(|p| p.contains(last) && !p.trim().is_empty()) {
                    return Ok(p);
                }
                tracing::warn!(model = %self.label, error = %e, "chat template not usable; plain prompt");
                Ok(plain_chat_prompt(messages))
            }
        }
    }

    fn tool_format(&self) -> Option<ToolFormat> {
        self.jinja.as_ref().and_then(|j| j.tool_format)
    }

    fn generate(&self, req: &GenerateRequest, sink: TokenSink<'_>) -> Result<GenerateStats> {
        if req.temperature.is_nan() {
            return Err(InferenceError::BadRequest("temperature is not a number".into()));
        }
        let prompt = self.tokenize(&req.prompt)?;
        let n_ctx = self.n_ctx as usize;
        if prompt.len() >= n_ctx {
            return Err(InferenceError::PromptTooLong {
                model: self.label.clone(),
                prompt_tokens: prompt.len(),
                context: n_ctx,
            });
        }
        if prompt.is_empty() {
            return Err(InferenceError::BadRequest("the prompt is empty".into()));
        }
        if req.whole_completion && prompt.len() + req.max_tokens as usize > n_ctx {
            return Err(InferenceError::ContextExceeded {
                model: self.label.clone(),
                prompt_tokens: prompt.len(),
                max_tokens: req.max_tokens,
                context: n_ctx,
            });
        }
        let mut stats = GenerateStats {
            prompt_tokens: to_u32(prompt.len()),
            completion_tokens: 0,
            time_to_first_token_ms: 0.0,
            generation_ms: 0.0,
            finish: FinishReason::Length,
        };
        if req.max_tokens == 0 {
            return Ok(stats);
        }
        let fail = |e: &dyn std::fmt::Display| InferenceError::engine(ENGINE, format!("{}: {e}", self.label));

        let mut ctx = self.context()?;
        let chunk = ctx.n_batch().clamp(1, PROMPT_BATCH) as usize;
        let mut batch = LlamaBatch::new(chunk, 1);
        let vocab = self.model.vocab();
        let mut sampling = self.sampler(req)?;
        // While a grammar waits for its opening tag: the end of the text that may be the tag's
        // start.
        let mut held = String::new();

        let start = Instant::now();
        let last = prompt.len() - 1;
        for (pos, token) in (0i32..).zip(&prompt) {
            // pos < n_ctx <= i32::MAX (checked at load)
            let i = pos as usize;
            batch.add(*token, pos, &[0], i == last).map_err(|e| fail(&e))?;
            if batch.n_tokens() as usize == chunk || i == last {
                ctx.decode(&mut batch).map_err(|e| fail(&e))?;
                if i != last {
                    batch.clear();
                }
            }
        }

        // The context holds n_past tokens; a sampled token needs one more slot to be decoded.
        let mut n_past = prompt.len();
        let mut logits = batch.n_tokens() - 1;
        let mut text = Utf8Stream::default();
        let mut piece = Vec::with_capacity(32);
        let mut first = None;
        let mut last_token = start;
        let max_tokens = req.max_tokens;
        let finish = loop {
            let token = if let Some(grammar) = &mut sampling.grammar {
                // A grammar reads bytes as characters, but lets through byte tokens that
                // make no valid UTF-8 (surrogates, overlong forms): those are taken out first,
                // so constrained text is exactly the characters the grammar counted.
                let mut candidates = ctx.token_data_array_ith(logits);
                self.utf8_only(&mut candidates, &text.pending);
                candidates.apply_sampler(grammar);
                if !candidates.data.iter().any(|c| c.logit().is_finite()) {
                    return Err(fail(&"no token fits the request's grammar"));
                }
                candidates.apply_sampler(&mut sampling.chain);
                let token = candidates.selected_token().ok_or_else(|| fail(&"no token could be sampled"))?;
                // A token the grammar refuses would leave llama.cpp's grammar state empty
                // (and the next step would abort the process): end with an error instead.
                grammar.try_accept(token).map_err(|e| fail(&format!("the grammar refused a token: {e}")))?;
                sampling.chain.accept(token);
                token
            } else {
                sampling.chain.sample(&ctx, logits)
            };
            let now = Instant::now();
            if first.is_none() {
                first = Some(now);
            }
            if vocab.is_eog(token) {
                break FinishReason::Stop;
            }
            last_token = now;
            stats.completion_tokens += 1;
            piece.clear();
            vocab.token_to_piece_into(token, &mut piece, false, None);
            let logprob =
                req.logprobs.map(|top| self.logprob(ctx.get_logits_ith(logits), token, &piece, top));
            let out = text.push(&piece);
            if let Some((tag, _)) = &sampling.after_tag {
                held.push_str(out);
                if let Some(at) = held.find(tag) {
                    let rest = &held[at + tag.len()..];
                    if let Some((_, grammar)) = sampling.after_tag.take() {
                        sampling.grammar = self.grammar_after(grammar, rest);
                    }
                } else {
                    held.drain(..held.len() - crate::stop::held_prefix(&held, tag));
                }
            }
            if sink(Piece { text: out, logprob }).is_break() {
                break FinishReason::Cancelled;
            }
            if stats.completion_tokens >= max_tokens || n_past >= n_ctx {
                break FinishReason::Length;
            }
            batch.clear();
            batch.add(token, n_past as i32, &[0], true).map_err(|e| fail(&e))?;
            ctx.decode(&mut batch).map_err(|e| fail(&e))?;
            n_past += 1;
            logits = 0;
        };
        if finish != FinishReason::Cancelled
            && let Some(rest) = text.finish()
        {
            let _ = sink(Piece::text(&rest));
        }
        if let Some(first) = first {
            stats.time_to_first_token_ms = ms(start, first);
            stats.generation_ms = ms(first, last_token);
        }
        stats.finish = finish;
        Ok(stats)
    }

    fn embed(&self, _texts: &[String]) -> Result<EmbedOutput> {
        Err(InferenceError::Unsupported { model: self.label.clone(), engine: ENGINE.into(), what: "embed" })
    }
}

/// Turns token bytes into text: a character split across tokens comes out whole with the token
/// that completes it; bytes that can never be UTF-8 become U+FFFD.
#[derive(Default)]
struct Utf8Stream {
    /// The start of an incomplete character (at most 3 bytes).
    pending: Vec<u8>,
    out: String,
}

impl Utf8Stream {
    /// The text these bytes complete (empty while a character is still incomplete).
    fn push<'a>(&'a mut self, bytes: &'a [u8]) -> &'a str {
        if self.pending.is_empty()
            && let Ok(s) = std::str::from_utf8(bytes)
        {
            return s;
        }
        self.pending.extend_from_slice(bytes);
        self.out.clear();
        let mut start = 0;
        while start < self.pending.len() {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    self.out.push_str(s);
                    start = self.pending.len();
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    self.out.push_str(&String::from_utf8_lossy(&self.pending[start..valid]));
                    match e.error_len() {
                        Some(n) => {
                            self.out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + n;
                        }
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        &self.out
    }

    /// What is left at the end: an incomplete character, as U+FFFD.
    fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            None
        } else {
            let rest = String::from_utf8_lossy(&self.pending).into_owned();
            self.pending.clear();
            Some(rest)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(pieces: &[&[u8]]) -> Vec<String> {
        let mut s = Utf8Stream::default();
        let mut out: Vec<String> = pieces.iter().map(|p| s.push(p).to_string()).collect();
        out.extend(s.finish());
        out
    }

    #[test]
    fn a_character_split_across_tokens_comes_out_whole_with_its_last_byte() {
        let euro = "€".as_bytes();
        assert_eq!(collect(&[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"]), ["a", "", "", "€", "b"]);
        assert_eq!(collect(&[&euro[..2], &[euro[2], b'x']]), ["", "€x"]);
    }

    #[test]
    fn bytes_that_are_never_utf8_become_replacement_characters() {
        assert_eq!(collect(&[b"\xff", b"a\x80b"]), ["\u{FFFD}", "a\u{FFFD}b"]);
        // A lead byte followed by a non-continuation byte.
        assert_eq!(collect(&[b"\xe2", b"z"]), ["", "\u{FFFD}z"]);
        // An incomplete character at the end.
        assert_eq!(collect(&[b"\xe2\x82"]), ["", "\u{FFFD}"]);
    }

    #[test]
    fn seeds_never_fold_to_llama_cpp_random_seed() {
        assert_ne!(seed32(u64::from(u32::MAX)), u32::MAX);
        assert_eq!(seed32(42), 42);
    }

    #[test]
    fn the_estimate_counts_weights_kv_cache_and_compute() {
        let info = GgufInfo {
            file_bytes: 1000,
            embedding_length: Some(256),
            head_count: Some(4),
            head_count_kv: Some(2),
            block_count: Some(4),
            ..GgufInfo::default()
        };
        let e = estimate(&info, 512, false);
        let kv = 512 * 4 * 2 * 128 * 2;
        let compute = COMPUTE_BASE_BYTES + u64::from(PROMPT_BATCH) * 256 * 32;
        assert_eq!(e, MemoryEstimate { ram_bytes: 1000 + kv + compute, vram_bytes: 0 });
        let e = estimate(&info, 512, true);
        assert_eq!(e, MemoryEstimate { ram_bytes: compute, vram_bytes: 1000 + kv + compute });
    }
}
