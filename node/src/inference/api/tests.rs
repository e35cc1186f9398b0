//! The endpoint's HTTP surface without an engine: keys, errors, metrics. Generation and
//! embeddings through real engines and the `openai` client are in tests/inference_api.rs.

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

use super::*;
use crate::models::ModelStore;

const KEY: &str = "0123456789abcdef0123";

fn app() -> (Router, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let inference =
        Arc::new(Inference::new(&super::super::InferenceSettings::default(), ModelStore::new(dir.path())));
    (router(inference, vec![KEY.into()]), dir)
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = match body {
        Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn every_route_needs_the_api_key() {
    let (app, _d) = app();
    for (method, path) in
        [("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics"), ("GET", "/nope")]
    {
        let (status, body) = call(&app, method, path, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(body.contains("invalid_api_key"), "{body}");
        let (status, _) = call(&app, method, path, Some("0123456789abcdef0124"), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, body) = call(&app, "GET", "/v1/models", Some(KEY), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"object": "list", "data": []}));
}

#[tokio::test]
async fn a_model_not_in_the_store_is_a_404_in_openai_shape() {
    let (app, _d) = app();
    let body = json!({"model": "nothing-here", "prompt": "hi"});
    let (status, text) = call(&app, "POST", "/v1/completions", Some(KEY), Some(body)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains("outpost models import"), "{text}");
    let body = json!({"model": "nothing-here", "input": ["a"]});
    let (status, _) = call(&app, "POST", "/v1/embeddings", Some(KEY), Some(body)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn malformed_and_unsupported_requests_are_400s_that_say_why() {
    let (app, _d) = app();
    for (path, body, want) in [
        ("/v1/completions", json!({"prompt": "x"}), "model"),
        ("/v1/completions", json!({"model": "m", "prompt": ["a", "b"]}), "one string"),
        ("/v1/completions", json!({"model": "m", "prompt": "a", "n": 2}), "n must be 1"),
        ("/v1/completions", json!({"model": "m", "prompt": "a", "temperature": 7}), "temperature"),
        ("/v1/completions", json!({"model": "m", "prompt": "a", "max_tokens": 0}), "max_tokens"),
        ("/v1/chat/completions", json!({"model": "m", "messages": []}), "must not be empty"),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
            "role",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "only text parts",
        ),
        ("/v1/embeddings", json!({"model": "m", "input": [[1, 2, 3]]}), "token arrays"),
        ("/v1/embeddings", json!({"model": "m", "input": "a", "encoding_format": "hex"}), "encoding_format"),
    ] {
        let (status, text) = call(&app, "POST", path, Some(KEY), Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        assert!(text.contains(want), "{body}: {text}");
    }
}

#[tokio::test]
async fn health_answers_without_a_key_and_one_model_is_looked_up_by_id() {
    let (app, _d) = app();
    let (status, body) = call(&app, "GET", "/health", None, None).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let (status, _) = call(&app, "GET", "/v1/models/tiny@1", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a model's details need the key");
    let (status, body) = call(&app, "GET", "/v1/models/tiny@1", Some(KEY), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["error"]["code"].as_str(), v["error"]["type"].as_str()),
        (Some("model_not_found"), Some("not_found_error"))
    );
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let (app, _d) = app();
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let req = Request::builder()
            .uri("/v1/models")
            .header("authorization", format!("{scheme} {KEY}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::OK, "{scheme}");
    }
    let req = Request::builder()
        .uri("/v1/models")
        .header("authorization", format!("Basic {KEY}"))
        .body(Body::empty());
    assert_eq!(app.clone().oneshot(req.unwrap()).await.unwrap().status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413() {
    let (app, _d) = app();
    let body = json!({"model": "m", "prompt": "x".repeat(MAX_BODY_BYTES + 1)});
    let (status, text) = call(&app, "POST", "/v1/completions", Some(KEY), Some(body)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(text.contains("request_too_large"), "{text}");
}

#[tokio::test]
async fn every_field_is_honoured_or_refused_by_name() {
    let (app, _d) = app();
    let chat = |extra: Value| {
        let mut body = json!({"model": "absent", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    // Refused, naming the field (param) and why.
    for (extra, param, says) in [
        (
            json!({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}),
            "tools[0].type",
            "not a tool type",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f g"}}]}),
            "tools[0].function.name",
            "letters",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "patternProperties": {}}}}]}),
            "tools[0].function.parameters",
            "\"patternProperties\" is not supported",
        ),
        (json!({"tool_choice": "required"}), "tool_choice", "no tools"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice",
            "not in tools",
        ),
        (json!({"functions": [{"name": "f"}]}), "functions", "legacy"),
        (json!({"response_format": {"type": "xml"}}), "response_format.type", "json_schema"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}),
            "response_format.json_schema.schema",
            "#: the JSON schema keyword \"not\"",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "y"}]}),
            "messages[1].tool_call_id",
            "answers no call",
        ),
        (json!({"logprobs": true, "stream": true}), "logprobs", "not with stream"),
        (json!({"top_logprobs": 3}), "top_logprobs", "needs logprobs"),
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs", "at most 20"),
        (json!({"logit_bias": {"50256": -100}}), "logit_bias", "logit_bias"),
        (json!({"stream_options": {"include_usage": true}}), "stream_options", "only allowed when stream"),
        (json!({"frobnicate": 1}), "frobnicate", "unrecognized"),
        (
            json!({"stream": true, "stream_options": {"include_usage": true, "x": 1}}),
            "stream_options",
            "unknown field",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]}]}),
            "messages",
            "function",
        ),
    ] {
        let (status, text) =
            call(&app, "POST", "/v1/chat/completions", Some(KEY), Some(chat(extra.clone()))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], param, "{extra}: {text}");
        assert!(v["error"]["message"].as_str().unwrap().contains(says), "{extra}: {text}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{text}");
    }
    // Accepted: nulls, values that ask for what the endpoint does anyway, bookkeeping. They
    // pass every check and reach the model lookup (absent: 404).
    for extra in [
        json!({"stream": null, "temperature": null, "stop": null, "max_tokens": null, "seed": null}),
        json!({"tools": [], "tool_choice": "none", "parallel_tool_calls": false, "user": "ward-3"}),
        json!({"response_format": {"type": "text"}, "logprobs": false, "top_logprobs": null}),
        json!({"top_p": 0.5, "presence_penalty": -1, "frequency_penalty": 0.4, "logit_bias": {}}),
        json!({"tools": [{"type": "function", "function": {"name": "f", "strict": true}}], "tool_choice": "required"}),
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": true, "schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}}}}}),
        json!({"messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "refusal": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "y"},
        ]}),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
        json!({"metadata": {"app": "x"}, "store": false, "max_completion_tokens": 5}),
        json!({"logprobs": true, "top_logprobs": 5}),
        json!({"messages": [{"role": "user", "content": "hi", "name": "nurse-station-2"}]}),
    ] {
        let (status, text) =
            call(&app, "POST", "/v1/chat/completions", Some(KEY), Some(chat(extra.clone()))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{extra}: {text}");
    }
    let body = json!({"model": "absent", "prompt": "x", "echo": true});
    let (status, text) = call(&app, "POST", "/v1/completions", Some(KEY), Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("\"param\":\"echo\""), "{text}");
    // Embeddings: dimensions is checked against the model's manifest (e2e_inference), after
    // its type.
    let body = json!({"model": "absent", "input": "x", "dimensions": -64});
    let (status, text) = call(&app, "POST", "/v1/embeddings", Some(KEY), Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("\"param\":\"dimensions\""), "{text}");
    let body = json!({"model": "absent", "input": "x", "dimensions": 64});
    let (status, _) = call(&app, "POST", "/v1/embeddings", Some(KEY), Some(body)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let body = json!({"model": "absent", "input": "x", "dimensions": null, "user": "u"});
    let (status, _) = call(&app, "POST", "/v1/embeddings", Some(KEY), Some(body)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_malformed_field_is_named_in_the_error() {
    let (app, _d) = app();
    for (body, field) in [
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (json!({"model": "m", "messages": [{"role": "user", "content": 5}]}), "messages"),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
            "max_tokens",
        ),
    ] {
        let (status, text) = call(&app, "POST", "/v1/chat/completions", Some(KEY), Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], field, "{body}: {text}");
        assert!(v["error"]["message"].as_str().unwrap().starts_with(&format!("{field}: ")), "{text}");
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let (app, _d) = app();
    let (status, text) = call(&app, "GET", "/metrics", Some(KEY), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("# TYPE outpost_inference_queue_depth gauge"), "{text}");
    assert!(text.contains("outpost_inference_queue_bound 16"), "{text}");
}

#[test]
fn key_files_skip_comments_and_refuse_short_or_missing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("keys");
    std::fs::write(&p, format!("# site apps\n\n{KEY}\n")).unwrap();
    assert_eq!(read_keys(&p).unwrap(), [KEY]);
    std::fs::write(&p, "short\n").unwrap();
    assert!(read_keys(&p).unwrap_err().to_string().contains("at least 16"));
    std::fs::write(&p, "# nothing\n").unwrap();
    assert!(read_keys(&p).unwrap_err().to_string().contains("holds no key"));
    assert!(read_keys(&dir.path().join("absent")).is_err());
}

#[test]
fn base64_embeddings_are_little_endian_f32() {
    assert_eq!(wire::f32_base64(&[1.0]), "AACAPw==");
}

#[test]
fn a_streamed_piece_is_the_chunk_the_json_tree_would_be() {
    for shape in [
        Shape::Completion { id: "cmpl-1".into(), model: "m\"x".into() },
        Shape::Chat { id: "chatcmpl-1".into(), model: "tiny@1".into() },
    ] {
        let frames = PieceFrames::new(&shape);
        for (text, first) in [("plain", true), ("quote \" and \\ and \n and \u{1}", false), ("€", false)] {
            let mut fast: Value = serde_json::from_str(&frames.chunk(text, first)).expect("JSON");
            let mut tree = shape.chunk(Some(text), None, first);
            fast["created"] = Value::Null;
            tree["created"] = Value::Null;
            assert_eq!(fast, tree, "{text:?}");
        }
    }
}

/// Reads a streamed answer's text events, noting the (paused, virtual) clock at each.
async fn sse_events(resp: Response) -> Vec<(Duration, String)> {
    use futures_util::StreamExt as _;
    let start = Instant::now();
    let mut body = resp.into_body().into_data_stream();
    let mut events = Vec::new();
    let mut rest = String::new();
    while let Some(bytes) = body.next().await {
        rest.push_str(std::str::from_utf8(&bytes.unwrap()).unwrap());
        while let Some(end) = rest.find("\n\n") {
            let event: String = rest.drain(..end + 2).collect();
            let data = event.trim().strip_prefix("data: ").expect("a data event").to_owned();
            events.push((start.elapsed(), data));
        }
    }
    events
}

fn outcome(text: &str, tokens: u32) -> GenerateOutcome {
    GenerateOutcome {
        text: text.into(),
        tool_calls: Vec::new(),
        logprobs: None,
        stats: outpost_inference::GenerateStats {
            prompt_tokens: 3,
            completion_tokens: tokens,
            time_to_first_token_ms: 1.0,
            generation_ms: 10.0,
            finish: outpost_inference::FinishReason::Length,
        },
        model_digest: "sha256:00".into(),
        engine: "test".into(),
        engine_version: "0".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn fast_pieces_share_events_without_delaying_the_first_or_the_end() {
    let (tx, rx) = mpsc::channel::<String>(256);
    let (done_tx, done_rx) = oneshot::channel();
    // Two pieces every millisecond (2,000 tokens/s; the paused clock ticks in milliseconds),
    // then the outcome at once.
    tokio::spawn(async move {
        for i in 0..40 {
            tx.send(format!("p{i} ")).await.unwrap();
            if i % 2 == 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        drop(tx);
        let text: String = (0..40).map(|i| format!("p{i} ")).collect();
        done_tx.send(Ok(outcome(&text, 40))).unwrap();
    });
    let shape = Shape::Completion { id: "cmpl-1".into(), model: "tiny@1".into() };
    let events = sse_events(sse(shape, Some("first ".into()), rx, None, Some(done_rx), false)).await;
    let (last, tail) = events.split_last().unwrap();
    assert_eq!(last.1, "[DONE]");
    let finish: Value = serde_json::from_str(&tail.last().unwrap().1).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let texts: Vec<(Duration, String)> = tail[..tail.len() - 1]
        .iter()
        .map(|(at, d)| {
            let v: Value = serde_json::from_str(d).unwrap();
            (*at, v["choices"][0]["text"].as_str().unwrap().to_owned())
        })
        .collect();
    // Every piece, in order, once.
    let all: String = texts.iter().map(|(_, t)| t.as_str()).collect();
    let want: String =
        std::iter::once("first ".to_owned()).chain((0..40).map(|i| format!("p{i} "))).collect();
    assert_eq!(all, want);
    // The first event carries the first piece alone and leaves at once.
    assert_eq!(texts[0], (Duration::ZERO, "first ".to_owned()));
    // 20 ms of pieces at 2,000/s go out in about one event per 5 ms frame, not 41.
    assert!((4..=7).contains(&texts.len()), "{} text events: {texts:?}", texts.len());
    for pair in texts.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= FRAME, "events closer than a frame: {texts:?}");
    }
    // The end of the generation (at 20 ms) cuts the last frame's wait short.
    assert!(last.0 <= Duration::from_millis(21), "the end waited for a frame: {:?}", last.0);
}

#[tokio::test(start_paused = true)]
async fn a_slow_model_gets_one_event_per_piece_without_waiting() {
    let (tx, rx) = mpsc::channel::<String>(256);
    let (done_tx, done_rx) = oneshot::channel();
    // One piece every 8 ms: slower than a frame, so none waits.
    tokio::spawn(async move {
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(8)).await;
            tx.send(format!("p{i}")).await.unwrap();
        }
        drop(tx);
        done_tx.send(Ok(outcome("p0p1p2p3p4", 5))).unwrap();
    });
    let shape = Shape::Chat { id: "chatcmpl-1".into(), model: "tiny@1".into() };
    let events = sse_events(sse(shape, Some("p".into()), rx, None, Some(done_rx), false)).await;
    let texts: Vec<Duration> =
        events.iter().filter(|(_, d)| d.contains("\"content\"")).map(|(at, _)| *at).collect();
    assert_eq!(texts, (0..6).map(|i| Duration::from_millis(8 * i)).collect::<Vec<_>>(), "{events:?}");
}
