//! The llama.cpp adapter on the tiny random-weights llama (vocabulary: <unk>, <s>, </s> and the
//! 256 byte tokens): its text is meaningless, so these check plumbing, determinism and limits.

#![allow(clippy::expect_used)]

mod support;

use std::ops::ControlFlow;

use outpost_inference::llama::LlamaEngine;
use outpost_inference::{
    ChatMessage, Constraint, FinishReason, GenerateRequest, GenerateStats, InferenceEngine, InferenceError,
    LoadOptions, LoadedModel, ModelFiles, Piece, ToolCall, ToolFormat, ToolSpec,
};

fn engine() -> LlamaEngine {
    LlamaEngine::new().expect("llama.cpp backend")
}

fn tiny() -> ModelFiles {
    support::model_files("tiny-llama", "llama")
}

fn opts(context: u32) -> LoadOptions {
    LoadOptions { threads: 2, context, gpu: false }
}

fn load(context: u32) -> Box<dyn LoadedModel> {
    engine().load(&tiny(), &opts(context)).expect("load tiny-llama")
}

fn req(prompt: &str, max_tokens: u32, temperature: f32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        max_tokens,
        temperature,
        seed,
        stop: vec![],
        whole_completion: false,
        ..GenerateRequest::default()
    }
}

/// Generates, collecting the pieces the sink received.
fn run(model: &dyn LoadedModel, req: &GenerateRequest) -> (Vec<String>, GenerateStats) {
    let mut pieces = Vec::new();
    let stats = model
        .generate(req, &mut |p: Piece<'_>| {
            pieces.push(p.text.to_string());
            ControlFlow::Continue(())
        })
        .expect("generate");
    (pieces, stats)
}

#[test]
fn greedy_generation_is_deterministic_across_calls_and_loaded_instances() {
    let a = load(0);
    let b = load(0);
    let r = req("Once upon a time", 24, 0.0, 0);
    let (first, s1) = run(a.as_ref(), &r);
    let (again, s2) = run(a.as_ref(), &r);
    let (other, s3) = run(b.as_ref(), &r);
    assert!(s1.completion_tokens > 0);
    assert_eq!(first, again);
    assert_eq!(first, other);
    assert_eq!(s1.completion_tokens, s2.completion_tokens);
    assert_eq!(s1.completion_tokens, s3.completion_tokens);
    // The seed does not matter without temperature.
    let (seeded, _) = run(a.as_ref(), &req("Once upon a time", 24, 0.0, 99));
    assert_eq!(first, seeded);
}

#[test]
fn greedy_generation_gives_the_same_text_on_threads_sharing_a_model() {
    let model = load(256);
    let r = req("shared", 16, 0.0, 0);
    let (alone, _) = run(model.as_ref(), &r);
    let outputs: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(|| run(model.as_ref(), &r).0)).collect();
        handles.into_iter().map(|h| h.join().expect("generation thread")).collect()
    });
    for out in outputs {
        assert_eq!(out, alone);
    }
}

#[test]
fn max_tokens_is_respected_with_finish_length() {
    let model = load(0);
    for max in [1, 7] {
        let (pieces, stats) = run(model.as_ref(), &req("Once upon a time", max, 0.0, 0));
        assert_eq!(stats.finish, FinishReason::Length, "max_tokens {max}");
        assert_eq!(stats.completion_tokens, max);
        // One piece per token (a piece may be empty while a character is incomplete), plus at
        // most one for an incomplete character at the end.
        assert!(pieces.len() == max as usize || pieces.len() == max as usize + 1, "{pieces:?}");
    }
    let (pieces, stats) = run(model.as_ref(), &req("Once upon a time", 0, 0.0, 0));
    assert_eq!((stats.finish, stats.completion_tokens, pieces.len()), (FinishReason::Length, 0, 0));
    assert!(stats.prompt_tokens > 0);
}

#[test]
fn generation_stops_with_finish_length_when_the_context_is_full() {
    let model = load(64);
    assert_eq!(model.context_length(), 64);
    let (_, stats) = run(model.as_ref(), &req("abc", 1000, 0.0, 0));
    // Every generated token but the last needs a slot in the context.
    assert!(stats.prompt_tokens + stats.completion_tokens <= 65, "{stats:?}");
    if stats.finish == FinishReason::Length {
        assert_eq!(stats.prompt_tokens + stats.completion_tokens, 65, "{stats:?}");
    } else {
        assert_eq!(stats.finish, FinishReason::Stop);
    }
}

#[test]
fn a_fixed_seed_with_temperature_repeats_and_other_seeds_differ() {
    let model = load(0);
    let text = |seed| {
        let (pieces, stats) = run(model.as_ref(), &req("Once upon a time", 32, 1.0, seed));
        (pieces.concat(), stats.completion_tokens)
    };
    let first = text(7);
    assert_eq!(first, text(7));
    // With near-uniform random weights, 32 sampled tokens repeating under three other seeds
    // would be a bug, not chance.
    assert!([8, 9, 1 << 40].into_iter().any(|seed| text(seed) != first));
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_with_its_counts() {
    let model = load(64);
    let prompt = "x".repeat(100);
    let err = model.generate(&req(&prompt, 4, 0.0, 0), &mut |_| ControlFlow::Continue(())).unwrap_err();
    match err {
        InferenceError::PromptTooLong { model, prompt_tokens, context } => {
            assert_eq!(model, "tiny-llama@1");
            assert!(prompt_tokens > 100, "byte tokens + BOS: {prompt_tokens}");
            assert_eq!(context, 64);
        }
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
}

#[test]
fn a_whole_completion_that_cannot_fit_is_refused_with_both_numbers_before_any_token() {
    let model = load(64);
    let mut pieces = 0;
    let fits = req("abc", 40, 0.0, 0);
    let over = GenerateRequest { max_tokens: 70, whole_completion: true, ..fits.clone() };
    let err = model.generate(&over, &mut |_| {
        pieces += 1;
        ControlFlow::Continue(())
    });
    match err.unwrap_err() {
        InferenceError::ContextExceeded { prompt_tokens, max_tokens, context, .. } => {
            assert_eq!((max_tokens, context), (70, 64));
            assert!(prompt_tokens >= 3, "{prompt_tokens}");
        }
        other => panic!("expected ContextExceeded, got {other:?}"),
    }
    assert_eq!(pieces, 0, "refused before generating");
    let fine = GenerateRequest { whole_completion: true, ..fits };
    assert!(model.generate(&fine, &mut |_| ControlFlow::Continue(())).is_ok(), "a completion that fits runs");
}

#[test]
fn a_sink_that_breaks_after_three_pieces_cancels_after_three_tokens() {
    let model = load(0);
    let mut calls = 0;
    let stats = model
        .generate(&req("Once upon a time", 50, 0.0, 0), &mut |_| {
            calls += 1;
            if calls == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        })
        .expect("generate");
    assert_eq!(stats.finish, FinishReason::Cancelled);
    assert_eq!(stats.completion_tokens, 3);
    assert_eq!(calls, 3, "no piece after the sink said stop");
}

#[test]
fn stats_are_plausible() {
    let model = load(0);
    let (pieces, stats) = run(model.as_ref(), &req("Hello there", 16, 0.0, 0));
    assert!(stats.prompt_tokens >= 12, "BOS + at least one token a byte: {stats:?}");
    assert!(stats.completion_tokens > 1);
    assert!(pieces.len() >= stats.completion_tokens as usize);
    assert!(stats.time_to_first_token_ms > 0.0);
    assert!(stats.generation_ms > 0.0);
    assert!(stats.tokens_per_s() > 0.0);
    assert!(stats.time_to_first_token_ms < 60_000.0 && stats.generation_ms < 60_000.0);
}

#[test]
fn the_engine_reports_embed_as_unsupported() {
    let model = load(0);
    assert!(model.capabilities().generate);
    assert!(!model.capabilities().embed);
    let err = model.embed(&["hello".to_string()]).unwrap_err();
    assert!(matches!(err, InferenceError::Unsupported { what: "embed", .. }), "{err:?}");
    assert_eq!(err.status(), 400);
}

#[test]
fn chat_prompt_without_a_template_is_the_plain_prompt_and_generates() {
    let model = load(0);
    let messages = [ChatMessage::new("system", "be brief"), ChatMessage::new("user", "hi")];
    let prompt = model.chat_prompt(&messages, None).expect("chat prompt");
    assert_eq!(prompt, "system: be brief\nuser: hi\nassistant:");
    let (_, stats) = run(model.as_ref(), &req(&prompt, 4, 0.0, 0));
    assert!(stats.completion_tokens > 0);
}

/// The tiny model with `tokenizer.chat_template` added: the new metadata entry goes first and is
/// padded to a multiple of the file's 32-byte alignment, so the tensor data moves by whole
/// alignment units and every offset in the file stays right.
fn tiny_with_template(dir: &std::path::Path, template: &str) -> ModelFiles {
    let mut model = tiny();
    let bytes = std::fs::read(model.find_suffix(".gguf").expect("gguf")).expect("read gguf");
    let key = b"tokenizer.chat_template";
    let mut value = template.as_bytes().to_vec();
    while !(8 + key.len() + 4 + 8 + value.len()).is_multiple_of(32) {
        value.push(b' ');
    }
    let mut out = bytes[..16].to_vec();
    let kv_count = u64::from_le_bytes(bytes[16..24].try_into().expect("kv count")) + 1;
    out.extend(kv_count.to_le_bytes());
    out.extend((key.len() as u64).to_le_bytes());
    out.extend(key);
    out.extend(8u32.to_le_bytes()); // string
    out.extend((value.len() as u64).to_le_bytes());
    out.extend(&value);
    out.extend(&bytes[24..]);
    let path = dir.join("tiny-llama.gguf");
    std::fs::write(&path, out).expect("write gguf");
    model.files.insert("tiny-llama.gguf".into(), path);
    model
}

#[test]
fn chat_prompt_uses_the_models_own_template() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
                  {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let model = engine().load(&tiny_with_template(dir.path(), chatml), &opts(0)).expect("load");
    let messages = [ChatMessage::new("system", "be brief"), ChatMessage::new("user", "hi")];
    assert_eq!(
        model.chat_prompt(&messages, None).expect("chat prompt"),
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let nul = [ChatMessage::new("user", "a\0b")];
    assert!(matches!(model.chat_prompt(&nul, None), Err(InferenceError::BadRequest(_))));
}

#[test]
fn a_template_llama_cpp_cannot_interpret_falls_back_to_the_plain_prompt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model =
        engine().load(&tiny_with_template(dir.path(), "{{ no_known_format }}"), &opts(0)).expect("load");
    let messages = [ChatMessage::new("user", "hi")];
    assert_eq!(model.chat_prompt(&messages, None).expect("chat prompt"), "user: hi\nassistant:");
}

#[test]
fn the_engine_is_named_llama_and_its_version_is_the_locked_crate() {
    let a = engine();
    let _b = engine(); // the backend is shared, not initialised twice
    assert_eq!(a.name(), "llama");
    let lock =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).expect("Cargo.lock");
    let locked = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"llama-cpp-2\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .expect("llama-cpp-2 in Cargo.lock");
    assert_eq!(a.version(), format!("llama.cpp via llama-cpp-2 {locked}"));
}

#[test]
fn inspect_estimates_weights_plus_a_kv_cache_that_grows_with_the_context() {
    let e = engine();
    let model = tiny();
    let small = e.inspect(&model, &opts(64)).expect("inspect");
    let large = e.inspect(&model, &opts(512)).expect("inspect");
    assert!(small.ram_bytes > model.total_bytes());
    assert!(large.ram_bytes > small.ram_bytes);
    // 4 blocks × K and V × 256 dims × f16 per token.
    assert_eq!(large.ram_bytes - small.ram_bytes, (512 - 64) * 4 * 2 * 256 * 2);
    assert_eq!(small.vram_bytes, 0);
    // Context 0 means the model's own (512 for the tiny model, under the 4096 cap).
    assert_eq!(e.inspect(&model, &opts(0)).expect("inspect"), large);
}

#[test]
fn a_truncated_gguf_is_an_invalid_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut model = tiny();
    let original = model.find_suffix(".gguf").expect("gguf").clone();
    let bytes = std::fs::read(&original).expect("read gguf");
    let truncated = dir.path().join("tiny-llama.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write truncated");
    model.files.insert("tiny-llama.gguf".into(), truncated);
    let e = engine();
    let err = e.inspect(&model, &opts(0)).unwrap_err();
    assert!(matches!(err, InferenceError::InvalidModel { format: "GGUF", .. }), "{err:?}");
    let err = e.load(&model, &opts(0)).err().expect("load refuses it");
    assert!(matches!(err, InferenceError::InvalidModel { .. }), "{err:?}");
}

#[test]
fn a_model_without_a_gguf_file_is_an_invalid_model() {
    let mut model = tiny();
    model.files.clear();
    let err = engine().inspect(&model, &opts(0)).unwrap_err();
    assert!(matches!(err, InferenceError::InvalidModel { .. }), "{err:?}");
}

const TOOLS_TEMPLATE: &str = include_str!("../../models/tools-chat-template.jinja");

fn weather() -> ToolSpec {
    ToolSpec {
        name: "get_weather".into(),
        description: Some("The weather in a city".into()),
        parameters: serde_json::json!({
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": false,
        }),
    }
}

#[test]
fn a_template_that_shows_tools_is_found_and_renders_them_and_the_calls_in_the_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = engine().load(&tiny_with_template(dir.path(), TOOLS_TEMPLATE), &opts(0)).expect("load");
    assert_eq!(model.tool_format(), Some(ToolFormat::Tagged));
    let mut call = ChatMessage::new("assistant", "");
    call.tool_calls.push(ToolCall {
        id: "call_1".into(),
        name: "get_weather".into(),
        arguments: r#"{"city":"Oslo"}"#.into(),
    });
    let mut result = ChatMessage::new("tool", "sunny");
    result.tool_call_id = Some("call_1".into());
    let chat = [ChatMessage::new("user", "weather?"), call, result];
    let prompt = model.chat_prompt(&chat, Some(&[weather()])).expect("prompt");
    assert!(prompt.contains(r#""name":"get_weather""#), "{prompt}");
    assert!(
        prompt.contains(r#"<tool_call>{"name": "get_weather", "arguments": {"city":"Oslo"}}</tool_call>"#),
        "{prompt}"
    );
    assert!(prompt.contains("<|tool|>\nsunny\n") && prompt.ends_with("<|assistant|>\n"), "{prompt}");
    // The same history without tools still renders the call (llama.cpp's own formatter would
    // drop it).
    let prompt = model.chat_prompt(&chat, None).expect("prompt");
    assert!(prompt.contains("<tool_call>") && !prompt.contains("Functions you may call"), "{prompt}");

    // A template without tools, and no template: no tool support, and a clear refusal.
    let chatml =
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}";
    let dir2 = tempfile::tempdir().expect("tempdir");
    let plain = engine().load(&tiny_with_template(dir2.path(), chatml), &opts(0)).expect("load");
    for m in [plain, load(0)] {
        assert_eq!(m.tool_format(), None);
        let err = m.chat_prompt(&chat[..1], Some(&[weather()])).expect_err("no tool support");
        assert!(err.to_string().contains("tool support"), "{err}");
    }
}

/// The generated text of a constrained request.
fn constrained(
    model: &dyn LoadedModel,
    constraint: Constraint,
    temperature: f32,
    seed: u64,
    max_tokens: u32,
) -> (String, GenerateStats) {
    let r =
        GenerateRequest { constraint: Some(constraint), ..req("a person: ", max_tokens, temperature, seed) };
    let (pieces, stats) = run(model, &r);
    (pieces.concat(), stats)
}

#[test]
fn a_json_schema_constraint_gives_valid_json_at_any_temperature() {
    let model = load(0);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "member": {"type": "boolean"},
        },
        "required": ["name", "age", "member"],
        "additionalProperties": false,
    });
    for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.5, 3), (2.0, 4)] {
        let (text, stats) =
            constrained(model.as_ref(), Constraint::JsonSchema(schema.clone()), temperature, seed, 300);
        assert_eq!(stats.finish, FinishReason::Stop, "{text:?}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let o = v.as_object().expect("object");
        assert_eq!(o.len(), 3, "{text}");
        assert!(o["name"].as_str().is_some_and(|n| n.chars().count() <= 10), "{text}");
        assert!(o["age"].as_i64().is_some_and(|a| (0..=120).contains(&a)), "{text}");
        assert!(o["member"].is_boolean(), "{text}");
    }
    let (text, stats) = constrained(model.as_ref(), Constraint::JsonObject, 1.0, 9, 300);
    if stats.finish == FinishReason::Stop {
        assert!(serde_json::from_str::<serde_json::Value>(&text).expect("JSON").is_object(), "{text}");
    }
    // Cut short: finish reason length.
    let (_, stats) = constrained(model.as_ref(), Constraint::JsonSchema(schema), 0.0, 0, 4);
    assert_eq!(stats.finish, FinishReason::Length);
}

#[test]
fn a_forced_tool_call_is_the_whole_answer_in_the_templates_format() {
    let model = load(0);
    let c = Constraint::ToolCall { format: ToolFormat::Tagged, tools: vec![weather()], lazy: false };
    let (text, stats) = constrained(model.as_ref(), c, 1.0, 3, 300);
    assert_eq!(stats.finish, FinishReason::Stop, "{text:?}");
    let inner =
        text.strip_prefix("<tool_call>\n").and_then(|t| t.strip_suffix("\n</tool_call>")).expect("tags");
    let v: serde_json::Value = serde_json::from_str(inner).expect("JSON");
    assert_eq!(v["name"], "get_weather");
    assert!(["c", "f"].contains(&v["arguments"]["unit"].as_str().expect("unit")), "{v}");
}

#[test]
fn a_schema_llama_cpp_cannot_convert_is_a_bad_request() {
    let model = load(0);
    let bad = serde_json::json!({"$ref": "#/$defs/missing"});
    let r = GenerateRequest { constraint: Some(Constraint::JsonSchema(bad)), ..req("x", 4, 0.0, 0) };
    let err = model.generate(&r, &mut |_| ControlFlow::Continue(())).expect_err("bad schema");
    assert_eq!(err.status(), 400, "{err}");
}

#[test]
fn a_lazy_tool_grammar_lets_a_long_answer_run_and_holds_a_call_once_opened() {
    let model = load(0);
    for seed in 0..3 {
        let c = Constraint::ToolCall { format: ToolFormat::Tagged, tools: vec![weather()], lazy: true };
        let (text, stats) = constrained(model.as_ref(), c, 1.0, seed, 480);
        assert!(matches!(stats.finish, FinishReason::Stop | FinishReason::Length), "{stats:?}");
        if let Some(at) = text.find("<tool_call>") {
            // From the tag on, the grammar held it: a whole call, or cut short by max_tokens.
            let call = &text[at..];
            if stats.finish == FinishReason::Stop {
                let inner = call
                    .strip_prefix("<tool_call>\n")
                    .and_then(|t| t.strip_suffix("\n</tool_call>"))
                    .expect("tags");
                serde_json::from_str::<serde_json::Value>(inner).expect("JSON");
            }
        }
    }
}
