//! The manager: admits requests through a bounded queue, keeps loaded models within the RAM and
//! VRAM budgets (least recently used unload first), and runs every load and every request on its
//! own compute threads (`manager/compute.rs`), never on the async runtime's workers.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

use self::compute::ComputePool;
use crate::tools::{Constraint, ToolCall, ToolCallFilter, ToolChoice, ToolFormat, ToolSpec};
use crate::{
    ChatMessage, GenerateRequest, GenerateStats, InferenceEngine, InferenceError, LoadOptions, LoadedModel,
    Logprob, MemoryEstimate, ModelFiles, Result, StopFilter,
};

/// Most texts in one embedding request.
pub const MAX_EMBED_TEXTS: usize = 2048;
/// Most bytes of one prompt or text.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceConfig {
    pub ram_budget_bytes: u64,
    pub vram_budget_bytes: u64,
    /// Requests that may wait while others compute; one more is refused (429).
    pub queue_bound: usize,
    /// Requests that compute at once.
    pub concurrency: usize,
    pub load: LoadOptions,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            ram_budget_bytes: 4 << 30,
            vram_budget_bytes: 0,
            queue_bound: 16,
            concurrency: 1,
            load: LoadOptions {
                threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                context: 0,
                gpu: false,
            },
        }
    }
}

/// An engine built into this binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineInfo {
    pub name: String,
    pub version: String,
}

/// A model in memory, for metrics and `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadedInfo {
    pub digest: String,
    pub label: String,
    pub engine: String,
    pub ram_bytes: u64,
    pub vram_bytes: u64,
    pub idle_secs: f64,
    pub requests: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub requests_total: u64,
    pub refused_queue_full_total: u64,
    pub failed_total: u64,
    pub queue_depth: usize,
    pub queue_bound: usize,
    pub running: usize,
    pub prompt_tokens_total: u64,
    pub completion_tokens_total: u64,
    pub embedded_texts_total: u64,
    pub last_tokens_per_s: f64,
    pub last_time_to_first_token_ms: f64,
    pub loads_total: u64,
    pub unloads_total: u64,
    pub ram_used_bytes: u64,
    pub ram_budget_bytes: u64,
    pub vram_used_bytes: u64,
    pub vram_budget_bytes: u64,
    pub loaded: Vec<LoadedInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerateOutcome {
    /// The text, without the tool calls.
    pub text: String,
    /// The tool calls the answer made (finish reason `tool_calls`).
    pub tool_calls: Vec<ToolCall>,
    /// Each token's log probability, when the request asked for them.
    pub logprobs: Option<Vec<Logprob>>,
    pub stats: GenerateStats,
    pub model_digest: String,
    pub engine: String,
    pub engine_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbedOutcome {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: u32,
    pub elapsed_ms: f64,
    pub model_digest: String,
    pub engine: String,
    pub engine_version: String,
}

/// What a generation starts from: a prompt, or chat turns the model's template turns into one.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
    /// A chat with functions the model may call (tool_choice `none` is a plain chat).
    Tools {
        messages: Vec<ChatMessage>,
        tools: Vec<ToolSpec>,
        choice: ToolChoice,
    },
}

struct Slot {
    digest: String,
    label: String,
    engine: Arc<dyn InferenceEngine>,
    model: Arc<dyn LoadedModel>,
    estimate: MemoryEstimate,
    last_used: Instant,
    requests: u64,
}

#[derive(Default)]
struct Counters {
    requests: u64,
    refused: u64,
    failed: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    embedded: u64,
    last_tps: f64,
    last_ttft: f64,
    loads: u64,
    unloads: u64,
}

pub struct Manager {
    cfg: InferenceConfig,
    engines: Vec<Arc<dyn InferenceEngine>>,
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
    slots: Mutex<Vec<Slot>>,
    load_lock: tokio::sync::Mutex<()>,
    counters: Mutex<Counters>,
    /// Runs every load and request (`compute.rs` says why not tokio's blocking pool).
    compute: ComputePool,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// Sets the flag when the request's future is dropped, so the compute thread stops early.
struct Abandon(Arc<AtomicBool>);
impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How long a streamed request waits for its client to take the next piece before it stops
/// (a client that keeps the connection open but reads nothing would hold a compute thread).
const STREAM_STALL: Duration = Duration::from_secs(60);

/// Sends a streamed piece from a compute thread, waiting at most `stall` while the channel is
/// full; `Break` when the receiver is gone or stalled.
fn send_within(tx: &mpsc::Sender<String>, mut piece: String, stall: Duration) -> ControlFlow<()> {
    let deadline = Instant::now() + stall;
    loop {
        match tx.try_send(piece) {
            Ok(()) => return ControlFlow::Continue(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return ControlFlow::Break(()),
            Err(mpsc::error::TrySendError::Full(back)) => {
                if Instant::now() >= deadline {
                    tracing::warn!("a streaming client took no text for {stall:?}; generation stopped");
                    return ControlFlow::Break(());
                }
                piece = back;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Manager {
    pub fn new(cfg: InferenceConfig, engines: Vec<Arc<dyn InferenceEngine>>) -> Self {
        let concurrency = cfg.concurrency.max(1);
        Self {
            admitted: Arc::new(Semaphore::new(cfg.queue_bound + concurrency)),
            running: Arc::new(Semaphore::new(concurrency)),
            cfg,
            engines,
            slots: Mutex::new(Vec::new()),
            load_lock: tokio::sync::Mutex::new(()),
            counters: Mutex::new(Counters::default()),
            // One thread per request computing at once, no more: every thread that runs
            // llama.cpp keeps an OpenMP team. A load, or a request after an abandoned one that
            // is still finishing, waits its turn in the channel.
            compute: ComputePool::new(concurrency, concurrency + 1),
        }
    }

    pub fn config(&self) -> &InferenceConfig {
        &self.cfg
    }

    pub fn engines(&self) -> Vec<EngineInfo> {
        self.engines.iter().map(|e| EngineInfo { name: e.name().into(), version: e.version() }).collect()
    }

    /// Generates text. Pieces go to `stream` as they come (after stop strings are applied);
    /// the whole text is also in the outcome.
    pub async fn generate(
        &self,
        model: &ModelFiles,
        prompt: Prompt,
        req: GenerateRequest,
        stream: Option<mpsc::Sender<String>>,
    ) -> Result<GenerateOutcome> {
        let text_len = match &prompt {
            Prompt::Text(t) => t.len(),
            Prompt::Chat(m) | Prompt::Tools { messages: m, .. } => m.iter().map(|m| m.content.len()).sum(),
        };
        if text_len > MAX_TEXT_BYTES {
            return Err(InferenceError::BadRequest(format!("the prompt is over {MAX_TEXT_BYTES} bytes")));
        }
        let (_admit, _run) = self.admit().await?;
        let result = self.generate_admitted(model, prompt, req, stream).await;
        self.count(|c| match &result {
            Ok(o) => {
                c.prompt_tokens += u64::from(o.stats.prompt_tokens);
                c.completion_tokens += u64::from(o.stats.completion_tokens);
                c.last_tps = o.stats.tokens_per_s();
                c.last_ttft = o.stats.time_to_first_token_ms;
            }
            Err(_) => c.failed += 1,
        });
        result
    }

    async fn generate_admitted(
        &self,
        model: &ModelFiles,
        prompt: Prompt,
        req: GenerateRequest,
        stream: Option<mpsc::Sender<String>>,
    ) -> Result<GenerateOutcome> {
        let (loaded, engine) = self.ensure_loaded(model).await?;
        if !loaded.capabilities().generate {
            return Err(InferenceError::Unsupported {
                model: model.label.clone(),
                engine: engine.name().into(),
                what: "generate text",
            });
        }
        let model_label = model.label.clone();
        let abandoned = Arc::new(AtomicBool::new(false));
        let _guard = Abandon(abandoned.clone());
        let (model_digest, engine_name, engine_version) =
            (model.digest.clone(), engine.name().to_string(), engine.version());
        let run = move || -> Result<GenerateOutcome> {
            let mut req = req;
            let mut calls = None;
            req.prompt = match prompt {
                Prompt::Text(t) => t,
                Prompt::Chat(m) => loaded.chat_prompt(&m, None)?,
                Prompt::Tools { messages, tools, choice } => {
                    let Some(format) = loaded.tool_format() else {
                        return Err(InferenceError::BadRequest(format!(
                            "model {} has no chat template with tool support: send the request without tools",
                            model_label
                        )));
                    };
                    if req.constraint.is_some() {
                        return Err(InferenceError::BadRequest(
                            "response_format and tools cannot be used together".into(),
                        ));
                    }
                    let prompt = loaded.chat_prompt(&messages, Some(&tools))?;
                    let (constrained, lazy) = match &choice {
                        ToolChoice::Auto => (tools.clone(), true),
                        ToolChoice::Required => (tools.clone(), false),
                        ToolChoice::Named(n) => {
                            (tools.iter().filter(|t| &t.name == n).cloned().collect(), false)
                        }
                    };
                    // A JSON-format call cannot be told from an answer that starts with JSON
                    // until it is whole, so `auto` leaves such a model's text free.
                    if !(lazy && format == ToolFormat::Json) {
                        req.constraint = Some(Constraint::ToolCall { format, tools: constrained, lazy });
                    }
                    calls = Some(ToolCallFilter::new(format, &tools));
                    prompt
                }
            };
            let mut filter = StopFilter::new(&req.stop);
            let mut text = String::new();
            let mut gone = false;
            let emit = |piece: String, text: &mut String| -> ControlFlow<()> {
                if piece.is_empty() {
                    return ControlFlow::Continue(());
                }
                text.push_str(&piece);
                match &stream {
                    Some(tx) => send_within(tx, piece, STREAM_STALL),
                    None => ControlFlow::Continue(()),
                }
            };
            let mut logprobs = req.logprobs.map(|_| Vec::new());
            let mut stats = loaded.generate(&req, &mut |piece| {
                if abandoned.load(Ordering::Relaxed) {
                    gone = true;
                    return ControlFlow::Break(());
                }
                if let (Some(all), Some(lp)) = (&mut logprobs, piece.logprob) {
                    all.push(lp);
                }
                let mut out = filter.push(piece.text);
                if let Some(c) = &mut calls {
                    out = c.push(&out);
                }
                if emit(out, &mut text).is_break() {
                    gone = true;
                    return ControlFlow::Break(());
                }
                if filter.stopped() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            })?;
            let mut made = Vec::new();
            if filter.stopped() && !gone {
                stats.finish = crate::FinishReason::Stop;
            }
            if !gone {
                let mut rest = filter.finish();
                if let Some(c) = &mut calls {
                    rest = c.push(&rest);
                    let (tail, found) = c.finish();
                    rest.push_str(&tail);
                    made = found;
                }
                let _ = emit(rest, &mut text);
                if !made.is_empty() && stats.finish == crate::FinishReason::Stop {
                    stats.finish = crate::FinishReason::ToolCalls;
                }
            }
            // Tokens past the text (a stop string, held back) are not part of the answer.
            if let Some(all) = &mut logprobs {
                let mut bytes = 0;
                let keep = all
                    .iter()
                    .take_while(|lp| {
                        bytes += lp.bytes.len();
                        bytes <= text.len()
                    })
                    .count();
                all.truncate(keep);
            }
            Ok(GenerateOutcome {
                text,
                tool_calls: made,
                logprobs,
                stats,
                model_digest,
                engine: engine_name,
                engine_version,
            })
        };
        self.compute.run(run).await
    }

    /// Embeds texts, one vector each, in order.
    pub async fn embed(&self, model: &ModelFiles, texts: Vec<String>) -> Result<EmbedOutcome> {
        if texts.len() > MAX_EMBED_TEXTS {
            return Err(InferenceError::BadRequest(format!(
                "{} texts in one request (limit {MAX_EMBED_TEXTS})",
                texts.len()
            )));
        }
        if texts.iter().any(|t| t.len() > MAX_TEXT_BYTES) {
            return Err(InferenceError::BadRequest(format!("a text is over {MAX_TEXT_BYTES} bytes")));
        }
        let (_admit, _run) = self.admit().await?;
        let result = async {
            let (loaded, engine) = self.ensure_loaded(model).await?;
            if !loaded.capabilities().embed {
                return Err(InferenceError::Unsupported {
                    model: model.label.clone(),
                    engine: engine.name().into(),
                    what: "embed text",
                });
            }
            let started = Instant::now();
            let out = self.compute.run(move || loaded.embed(&texts)).await?;
            Ok(EmbedOutcome {
                tokens: out.tokens,
                vectors: out.vectors,
                elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
                model_digest: model.digest.clone(),
                engine: engine.name().into(),
                engine_version: engine.version(),
            })
        }
        .await;
        self.count(|c| match &result {
            Ok(o) => c.embedded += o.vectors.len() as u64,
            Err(_) => c.failed += 1,
        });
        result
    }

    /// A place in the queue (refused at once when it is full), then a turn to compute.
    async fn admit(&self) -> Result<(tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit)> {
        self.count(|c| c.requests += 1);
        let Ok(admit) = self.admitted.clone().try_acquire_owned() else {
            self.count(|c| c.refused += 1);
            return Err(InferenceError::QueueFull { bound: self.cfg.queue_bound });
        };
        let run = self.running.clone().acquire_owned().await.map_err(|_| InferenceError::WorkerGone)?;
        Ok((admit, run))
    }

    /// The model in memory, loading it (and unloading least recently used ones) if needed.
    async fn ensure_loaded(
        &self,
        model: &ModelFiles,
    ) -> Result<(Arc<dyn LoadedModel>, Arc<dyn InferenceEngine>)> {
        if let Some(found) = self.touch(&model.digest) {
            return Ok(found);
        }
        let engine = self.engines.iter().find(|e| e.name() == model.engine).cloned().ok_or_else(|| {
            InferenceError::EngineUnavailable { engine: model.engine.clone(), built: self.built_names() }
        })?;
        let _one_load_at_a_time = self.load_lock.lock().await;
        if let Some(found) = self.touch(&model.digest) {
            return Ok(found);
        }
        let opts = self.cfg.load.clone();
        let (files, e) = (model.clone(), engine.clone());
        let estimate = self.compute.run(move || e.inspect(&files, &opts)).await?;
        self.check_budget(model, estimate)?;
        self.make_room(estimate);
        let opts = self.cfg.load.clone();
        let (files, e) = (model.clone(), engine.clone());
        let started = Instant::now();
        let loaded: Arc<dyn LoadedModel> = self.compute.run(move || e.load(&files, &opts)).await?.into();
        tracing::info!(
            model = %model.label, digest = %model.digest, engine = engine.name(),
            ram_mib = estimate.ram_bytes >> 20, load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        lock(&self.slots).push(Slot {
            digest: model.digest.clone(),
            label: model.label.clone(),
            engine: engine.clone(),
            model: loaded.clone(),
            estimate,
            last_used: Instant::now(),
            requests: 1,
        });
        self.count(|c| c.loads += 1);
        Ok((loaded, engine))
    }

    fn touch(&self, digest: &str) -> Option<(Arc<dyn LoadedModel>, Arc<dyn InferenceEngine>)> {
        let mut slots = lock(&self.slots);
        let slot = slots.iter_mut().find(|s| s.digest == digest)?;
        slot.last_used = Instant::now();
        slot.requests += 1;
        Some((slot.model.clone(), slot.engine.clone()))
    }

    fn check_budget(&self, model: &ModelFiles, need: MemoryEstimate) -> Result<()> {
        let over = |kind, needed: u64, budget: u64| InferenceError::OverBudget {
            model: model.label.clone(),
            kind,
            needed_mib: needed.div_ceil(1 << 20),
            budget_mib: budget >> 20,
        };
        if need.ram_bytes > self.cfg.ram_budget_bytes {
            return Err(over("ram", need.ram_bytes, self.cfg.ram_budget_bytes));
        }
        if need.vram_bytes > self.cfg.vram_budget_bytes {
            return Err(over("vram", need.vram_bytes, self.cfg.vram_budget_bytes));
        }
        Ok(())
    }

    /// Unloads least recently used models until `need` fits. A model a request still holds
    /// stays in memory until that request ends, so the budget can be briefly exceeded only by
    /// models in use.
    fn make_room(&self, need: MemoryEstimate) {
        let mut slots = lock(&self.slots);
        slots.sort_by_key(|s| s.last_used);
        loop {
            let ram: u64 = slots.iter().map(|s| s.estimate.ram_bytes).sum();
            let vram: u64 = slots.iter().map(|s| s.estimate.vram_bytes).sum();
            let fits = ram + need.ram_bytes <= self.cfg.ram_budget_bytes
                && vram + need.vram_bytes <= self.cfg.vram_budget_bytes;
            if fits || slots.is_empty() {
                break;
            }
            let evicted = slots.remove(0);
            tracing::info!(model = %evicted.label, digest = %evicted.digest, "unloading the least recently used model to stay within the budget");
            self.count(|c| c.unloads += 1);
        }
    }

    /// Unloads a model now (e.g. when it is removed from the store). Returns whether it was loaded.
    pub fn unload(&self, digest: &str) -> bool {
        let mut slots = lock(&self.slots);
        let before = slots.len();
        slots.retain(|s| s.digest != digest);
        let gone = slots.len() < before;
        drop(slots);
        if gone {
            self.count(|c| c.unloads += 1);
        }
        gone
    }

    pub fn metrics(&self) -> Metrics {
        let slots = lock(&self.slots);
        let loaded: Vec<LoadedInfo> = slots
            .iter()
            .map(|s| LoadedInfo {
                digest: s.digest.clone(),
                label: s.label.clone(),
                engine: s.engine.name().into(),
                ram_bytes: s.estimate.ram_bytes,
                vram_bytes: s.estimate.vram_bytes,
                idle_secs: s.last_used.elapsed().as_secs_f64(),
                requests: s.requests,
            })
            .collect();
        drop(slots);
        let concurrency = self.cfg.concurrency.max(1);
        let running = concurrency - self.running.available_permits();
        let admitted = self.cfg.queue_bound + concurrency - self.admitted.available_permits();
        let c = lock(&self.counters);
        Metrics {
            requests_total: c.requests,
            refused_queue_full_total: c.refused,
            failed_total: c.failed,
            queue_depth: admitted.saturating_sub(running),
            queue_bound: self.cfg.queue_bound,
            running,
            prompt_tokens_total: c.prompt_tokens,
            completion_tokens_total: c.completion_tokens,
            embedded_texts_total: c.embedded,
            last_tokens_per_s: c.last_tps,
            last_time_to_first_token_ms: c.last_ttft,
            loads_total: c.loads,
            unloads_total: c.unloads,
            ram_used_bytes: loaded.iter().map(|l| l.ram_bytes).sum(),
            ram_budget_bytes: self.cfg.ram_budget_bytes,
            vram_used_bytes: loaded.iter().map(|l| l.vram_bytes).sum(),
            vram_budget_bytes: self.cfg.vram_budget_bytes,
            loaded,
        }
    }

    fn built_names(&self) -> String {
        let names: Vec<&str> = self.engines.iter().map(|e| e.name()).collect();
        if names.is_empty() { "none".into() } else { names.join(", ") }
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut lock(&self.counters));
    }
}

#[path = "manager/compute.rs"]
mod compute;
#[cfg(test)]
#[path = "manager/tests.rs"]
mod tests;
