//! The manager with the real llama.cpp engine: the budget refuses a model before loading it,
//! and least recently used models unload to make room (the queue is covered by
//! the manager's unit tests and, end to end, by the node's endpoint test).

#![allow(clippy::expect_used)]

mod support;

use std::sync::Arc;

use outpost_inference::llama::LlamaEngine;
use outpost_inference::{
    GenerateRequest, InferenceConfig, InferenceEngine, InferenceError, LoadOptions, Manager, ModelFiles,
    Prompt,
};

fn manager(ram_budget_mib: u64, queue_bound: usize) -> Manager {
    let engine: Arc<dyn InferenceEngine> = Arc::new(LlamaEngine::new().expect("llama.cpp backend"));
    let cfg = InferenceConfig {
        ram_budget_bytes: ram_budget_mib << 20,
        vram_budget_bytes: 0,
        queue_bound,
        concurrency: 1,
        load: LoadOptions { threads: 2, context: 256, gpu: false },
    };
    Manager::new(cfg, vec![engine])
}

/// The tiny model under another digest: to the manager, a second model.
fn tiny(as_digest: &str) -> ModelFiles {
    let mut m = support::model_files("tiny-llama", "llama");
    m.digest = as_digest.into();
    m.label = format!("tiny-{as_digest}");
    m
}

fn greedy(max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: String::new(),
        max_tokens,
        temperature: 0.0,
        seed: 0,
        stop: vec![],
        whole_completion: false,
        ..GenerateRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_larger_than_the_budget_is_refused_without_loading() {
    let m = manager(4, 4);
    let err =
        m.generate(&tiny("a"), Prompt::Text("hi".into()), greedy(4), None).await.expect_err("over budget");
    match &err {
        InferenceError::OverBudget { kind: "ram", needed_mib, budget_mib: 4, .. } => assert!(*needed_mib > 4),
        other => panic!("expected OverBudget, got {other:?}"),
    }
    assert!(err.to_string().contains("ram_budget_mb"), "{err}");
    assert_eq!(m.metrics().loads_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_used_model_unloads_when_the_next_does_not_fit() {
    // Room for one tiny model (its estimate: 11 MiB of weights, the KV cache and a working
    // allowance, about 48 MiB), not two.
    let m = manager(64, 4);
    let a = m.generate(&tiny("a"), Prompt::Text("hi".into()), greedy(4), None).await.expect("a");
    let b = m.generate(&tiny("b"), Prompt::Text("hi".into()), greedy(4), None).await.expect("b");
    assert_eq!(a.text, b.text, "same weights, same greedy text");
    let metrics = m.metrics();
    assert_eq!((metrics.loads_total, metrics.unloads_total), (2, 1), "{metrics:?}");
    assert_eq!(metrics.loaded.len(), 1);
    assert_eq!(metrics.loaded[0].digest, "b");
    assert!(metrics.ram_used_bytes <= metrics.ram_budget_bytes);
}
