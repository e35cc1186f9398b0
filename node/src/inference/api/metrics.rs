//! Prometheus text for the inference manager's figures.

use std::fmt::Write as _;

use outpost_inference::{EngineInfo, Metrics};

pub fn render(m: &Metrics, engines: &[EngineInfo]) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ =
            writeln!(out, "# HELP outpost_inference_{name} {help}\n# TYPE outpost_inference_{name} {kind}");
        let _ = writeln!(out, "outpost_inference_{name} {value}");
    };
    metric("requests_total", "counter", "Requests admitted or refused.", m.requests_total as f64);
    metric(
        "refused_queue_full_total",
        "counter",
        "Requests refused because the queue was full.",
        m.refused_queue_full_total as f64,
    );
    metric("failed_total", "counter", "Requests that ended in an error.", m.failed_total as f64);
    metric("queue_depth", "gauge", "Requests waiting for a turn.", m.queue_depth as f64);
    metric("queue_bound", "gauge", "Most requests that may wait.", m.queue_bound as f64);
    metric("running", "gauge", "Requests computing now.", m.running as f64);
    metric("prompt_tokens_total", "counter", "Prompt tokens processed.", m.prompt_tokens_total as f64);
    metric("completion_tokens_total", "counter", "Tokens generated.", m.completion_tokens_total as f64);
    metric("embedded_texts_total", "counter", "Texts embedded.", m.embedded_texts_total as f64);
    metric("last_tokens_per_second", "gauge", "Decode speed of the last generation.", m.last_tokens_per_s);
    metric(
        "last_time_to_first_token_seconds",
        "gauge",
        "Time to first token of the last generation.",
        m.last_time_to_first_token_ms / 1000.0,
    );
    metric("loads_total", "counter", "Model loads.", m.loads_total as f64);
    metric("unloads_total", "counter", "Model unloads (least recently used first).", m.unloads_total as f64);
    metric("ram_used_bytes", "gauge", "RAM taken by loaded models (estimate).", m.ram_used_bytes as f64);
    metric("ram_budget_bytes", "gauge", "RAM budget for models.", m.ram_budget_bytes as f64);
    metric(
        "vram_used_bytes",
        "gauge",
        "GPU memory taken by loaded models (estimate).",
        m.vram_used_bytes as f64,
    );
    metric("vram_budget_bytes", "gauge", "GPU memory budget for models.", m.vram_budget_bytes as f64);
    let _ = writeln!(out, "# HELP outpost_inference_model_loaded_bytes Loaded models and their memory.");
    let _ = writeln!(out, "# TYPE outpost_inference_model_loaded_bytes gauge");
    for l in &m.loaded {
        let _ = writeln!(
            out,
            "outpost_inference_model_loaded_bytes{{digest=\"{}\",model=\"{}\",engine=\"{}\"}} {}",
            l.digest,
            escape(&l.label),
            l.engine,
            l.ram_bytes + l.vram_bytes
        );
    }
    let _ = writeln!(out, "# HELP outpost_inference_engine Engines built into this agent.");
    let _ = writeln!(out, "# TYPE outpost_inference_engine gauge");
    for e in engines {
        let _ = writeln!(
            out,
            "outpost_inference_engine{{name=\"{}\",version=\"{}\"}} 1",
            e.name,
            escape(&e.version)
        );
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
