//! The manager against a hand-written twin engine: it "generates" by echoing the prompt one
//! character per token, and can be held mid-request to fill the queue.

use std::collections::BTreeMap;
use std::sync::Condvar;
use std::time::Duration;

use super::*;
use crate::{Capabilities, EmbedOutput, FinishReason, Piece, TokenSink};

#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

struct Twin {
    gate: Arc<Gate>,
    loads: Arc<Mutex<Vec<String>>>,
}

struct TwinModel {
    gate: Arc<Gate>,
}

impl InferenceEngine for Twin {
    fn name(&self) -> &'static str {
        "twin"
    }
    fn version(&self) -> String {
        "twin 1".into()
    }
    fn inspect(&self, model: &ModelFiles, _: &LoadOptions) -> Result<MemoryEstimate> {
        // The test encodes the model's size in its label: "name:MiB".
        let mib: u64 = model.label.rsplit(':').next().and_then(|s| s.parse().ok()).unwrap_or(1);
        Ok(MemoryEstimate { ram_bytes: mib << 20, vram_bytes: 0 })
    }
    fn load(&self, model: &ModelFiles, _: &LoadOptions) -> Result<Box<dyn LoadedModel>> {
        on_compute_thread()?;
        lock(&self.loads).push(model.digest.clone());
        Ok(Box::new(TwinModel { gate: self.gate.clone() }))
    }
}

impl LoadedModel for TwinModel {
    fn capabilities(&self) -> Capabilities {
        Capabilities { generate: true, embed: true }
    }
    fn context_length(&self) -> u32 {
        64
    }
    /// The chat's last message, so a test decides what is "generated".
    fn chat_prompt(&self, messages: &[ChatMessage], _: Option<&[ToolSpec]>) -> Result<String> {
        Ok(messages.last().map(|m| m.content.clone()).unwrap_or_default())
    }
    fn tool_format(&self) -> Option<ToolFormat> {
        Some(ToolFormat::Tagged)
    }
    fn generate(&self, req: &GenerateRequest, sink: TokenSink<'_>) -> Result<GenerateStats> {
        on_compute_thread()?;
        let mut open = lock(&self.gate.open);
        while !*open {
            open = self.gate.cv.wait(open).unwrap_or_else(|p| p.into_inner());
        }
        drop(open);
        let mut stats = GenerateStats {
            prompt_tokens: req.prompt.chars().count() as u32,
            completion_tokens: 0,
            time_to_first_token_ms: 1.0,
            generation_ms: 1.0,
            finish: FinishReason::Length,
        };
        for ch in req.prompt.chars().take(req.max_tokens as usize) {
            stats.completion_tokens += 1;
            if sink(Piece::text(&ch.to_string())).is_break() {
                stats.finish = FinishReason::Cancelled;
                return Ok(stats);
            }
        }
        if stats.completion_tokens < req.max_tokens {
            stats.finish = FinishReason::Stop;
        }
        Ok(stats)
    }
    fn embed(&self, texts: &[String]) -> Result<EmbedOutput> {
        on_compute_thread()?;
        Ok(EmbedOutput {
            vectors: texts.iter().map(|t| vec![t.len() as f32]).collect(),
            tokens: texts.len() as u32,
        })
    }
}

/// Engine work must run on the manager's own compute threads (not the runtime's, not tokio's
/// blocking pool): every test through the twin checks it.
fn on_compute_thread() -> Result<()> {
    match std::thread::current().name() {
        Some(name) if name.starts_with("outpost-infer-") => Ok(()),
        other => Err(InferenceError::engine("twin", format!("engine work ran on thread {other:?}"))),
    }
}

fn manager(budget_mib: u64, queue: usize) -> (Arc<Manager>, Arc<Gate>, Arc<Mutex<Vec<String>>>) {
    let gate = Arc::new(Gate { open: Mutex::new(true), cv: Condvar::new() });
    let loads = Arc::new(Mutex::new(Vec::new()));
    let cfg = InferenceConfig {
        ram_budget_bytes: budget_mib << 20,
        queue_bound: queue,
        ..InferenceConfig::default()
    };
    let engine: Arc<dyn InferenceEngine> = Arc::new(Twin { gate: gate.clone(), loads: loads.clone() });
    (Arc::new(Manager::new(cfg, vec![engine])), gate, loads)
}

fn model(name: &str, mib: u64) -> ModelFiles {
    ModelFiles {
        digest: name.into(),
        label: format!("{name}:{mib}"),
        engine: "twin".into(),
        files: BTreeMap::new(),
    }
}

fn req(max_tokens: u32, stop: &[&str]) -> GenerateRequest {
    GenerateRequest {
        prompt: String::new(),
        max_tokens,
        temperature: 0.0,
        seed: 0,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        whole_completion: false,
        ..GenerateRequest::default()
    }
}

fn text(p: &str) -> Prompt {
    Prompt::Text(p.into())
}

#[tokio::test]
async fn generation_streams_pieces_and_stamps_the_model() {
    let (m, _, _) = manager(100, 4);
    let (tx, mut rx) = mpsc::channel(64);
    let out = m.generate(&model("a", 1), text("hello"), req(10, &[]), Some(tx)).await.unwrap();
    assert_eq!(out.text, "hello");
    assert_eq!(
        (out.model_digest.as_str(), out.engine.as_str(), out.engine_version.as_str()),
        ("a", "twin", "twin 1")
    );
    assert_eq!(out.stats.finish, FinishReason::Stop);
    let mut streamed = String::new();
    while let Ok(p) = rx.try_recv() {
        streamed.push_str(&p);
    }
    assert_eq!(streamed, "hello");
    let metrics = m.metrics();
    assert_eq!((metrics.requests_total, metrics.completion_tokens_total, metrics.loads_total), (1, 5, 1));
}

#[tokio::test]
async fn stop_strings_end_generation_and_never_reach_the_caller() {
    let (m, _, _) = manager(100, 4);
    let out = m.generate(&model("a", 1), text("one. two. three"), req(64, &[". t"]), None).await.unwrap();
    assert_eq!(out.text, "one");
    assert_eq!(out.stats.finish, FinishReason::Stop);
    let out = m.generate(&model("a", 1), text("abcdef"), req(3, &["zz"]), None).await.unwrap();
    assert_eq!((out.text.as_str(), out.stats.finish), ("abc", FinishReason::Length));
}

#[tokio::test]
async fn a_model_larger_than_the_budget_is_refused_before_loading() {
    let (m, _, loads) = manager(100, 4);
    let err = m.generate(&model("huge", 500), text("x"), req(1, &[]), None).await.unwrap_err();
    assert!(matches!(err, InferenceError::OverBudget { needed_mib: 500, budget_mib: 100, .. }), "{err}");
    assert_eq!(err.status(), 503);
    assert!(lock(&loads).is_empty());
}

#[tokio::test]
async fn the_least_recently_used_model_is_unloaded_to_make_room() {
    let (m, _, loads) = manager(100, 4);
    for name in ["a", "b", "a", "c"] {
        m.embed(&model(name, 40), vec!["x".into()]).await.unwrap();
    }
    // a, b loaded (80 MiB); a used again; c needs 40 more → b (least recent) goes.
    let loaded: Vec<String> = m.metrics().loaded.into_iter().map(|l| l.digest).collect();
    assert_eq!(loaded.len(), 2);
    assert!(loaded.contains(&"a".to_string()) && loaded.contains(&"c".to_string()), "{loaded:?}");
    assert_eq!(*lock(&loads), vec!["a", "b", "c"]);
    assert_eq!(m.metrics().unloads_total, 1);
    assert_eq!(m.metrics().ram_used_bytes, 80 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_queue_bound_are_refused_with_429() {
    let (m, gate, _) = manager(100, 2);
    *lock(&gate.open) = false;
    let mut held = Vec::new();
    // One computes, two wait: the queue is full.
    for _ in 0..3 {
        let m = m.clone();
        held.push(tokio::spawn(
            async move { m.generate(&model("a", 1), text("hi"), req(2, &[]), None).await },
        ));
    }
    for _ in 0..200 {
        let mt = m.metrics();
        if mt.running == 1 && mt.queue_depth == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((m.metrics().running, m.metrics().queue_depth), (1, 2));
    let err = m.generate(&model("a", 1), text("hi"), req(2, &[]), None).await.unwrap_err();
    assert!(matches!(err, InferenceError::QueueFull { bound: 2 }), "{err}");
    assert_eq!((err.status(), err.retryable()), (429, true));
    *lock(&gate.open) = true;
    gate.cv.notify_all();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().text, "hi");
    }
    let mt = m.metrics();
    assert_eq!((mt.refused_queue_full_total, mt.queue_depth, mt.running), (1, 0, 0));
}

#[tokio::test]
async fn a_dropped_stream_receiver_cancels_generation() {
    let (m, _, _) = manager(100, 4);
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let out = m.generate(&model("a", 1), text("abcdef"), req(64, &[]), Some(tx)).await.unwrap();
    assert_eq!(out.stats.finish, FinishReason::Cancelled);
    assert!(out.stats.completion_tokens <= 1);
}

#[tokio::test]
async fn an_engine_not_built_in_and_oversized_requests_are_clear_errors() {
    let (m, _, _) = manager(100, 4);
    let mut f = model("g", 1);
    f.engine = "llama".into();
    let err = m.generate(&f, text("x"), req(1, &[]), None).await.unwrap_err();
    assert!(err.to_string().contains("cargo feature `llama`") && err.to_string().contains("twin"), "{err}");
    let err = m.embed(&model("a", 1), vec![String::new(); MAX_EMBED_TEXTS + 1]).await.unwrap_err();
    assert_eq!(err.status(), 400);
    let err = m
        .generate(&model("a", 1), text(&"x".repeat(MAX_TEXT_BYTES + 1)), req(1, &[]), None)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
}

#[tokio::test]
async fn unload_frees_the_model() {
    let (m, _, loads) = manager(100, 4);
    m.embed(&model("a", 10), vec!["x".into()]).await.unwrap();
    assert!(m.unload("a"));
    assert!(!m.unload("a"));
    assert!(m.metrics().loaded.is_empty());
    m.embed(&model("a", 10), vec!["x".into()]).await.unwrap();
    assert_eq!(lock(&loads).len(), 2);
}

#[test]
fn a_streamed_piece_waits_for_a_slow_client_but_not_for_a_stalled_or_gone_one() {
    let (tx, mut rx) = mpsc::channel::<String>(1);
    assert!(send_within(&tx, "a".into(), Duration::from_millis(20)).is_continue());
    // Full and nobody reading: gives up after the stall time.
    let started = Instant::now();
    assert!(send_within(&tx, "b".into(), Duration::from_millis(20)).is_break());
    assert!(started.elapsed() >= Duration::from_millis(20));
    // A reader that takes the piece a little later: the send goes through.
    let reader = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(10));
        let first = rx.blocking_recv();
        (first, rx)
    });
    assert!(send_within(&tx, "c".into(), Duration::from_secs(10)).is_continue());
    let (first, mut rx) = reader.join().expect("reader");
    assert_eq!(first.as_deref(), Some("a"));
    assert_eq!(rx.try_recv().ok().as_deref(), Some("c"));
    drop(rx);
    assert!(send_within(&tx, "d".into(), Duration::from_secs(10)).is_break(), "receiver gone");
}

#[tokio::test]
async fn tool_calls_are_taken_out_of_the_text_and_the_rest_streams() {
    let (m, _, _) = manager(100, 4);
    let tools = vec![ToolSpec {
        name: "f".into(),
        description: None,
        parameters: serde_json::json!({"type": "object"}),
    }];
    let said = r#"ok <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>"#;
    let prompt = Prompt::Tools {
        messages: vec![ChatMessage::new("user", said)],
        tools: tools.clone(),
        choice: ToolChoice::Auto,
    };
    let (tx, mut rx) = mpsc::channel(256);
    let out = m.generate(&model("t", 1), prompt, req(200, &[]), Some(tx)).await.expect("generate");
    assert_eq!(out.text, "ok ");
    assert_eq!(
        out.tool_calls,
        [ToolCall { id: String::new(), name: "f".into(), arguments: r#"{"a":1}"#.into() }]
    );
    assert_eq!(out.stats.finish, FinishReason::ToolCalls);
    let mut streamed = String::new();
    while let Some(p) = rx.recv().await {
        streamed.push_str(&p);
    }
    assert_eq!(streamed, "ok ");

    // Cut short inside the call: no call, the text as it is, finish reason length.
    let prompt =
        Prompt::Tools { messages: vec![ChatMessage::new("user", said)], tools, choice: ToolChoice::Required };
    let out = m.generate(&model("t", 1), prompt, req(20, &[]), None).await.expect("generate");
    assert!(out.tool_calls.is_empty());
    assert_eq!(out.text, said.chars().take(20).collect::<String>());
    assert_eq!(out.stats.finish, FinishReason::Length);
}
