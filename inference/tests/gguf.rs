//! The GGUF checks accept the real test model and refuse its damaged copies.

mod support;

use outpost_inference::{InferenceError, gguf};

#[test]
fn the_tiny_llama_test_model_passes_the_checks() {
    let files = support::model_files("tiny-llama", "llama");
    let info = gguf::check(files.find_suffix(".gguf").unwrap()).unwrap();
    assert_eq!(info.architecture, "llama");
    assert!(info.block_count.unwrap() >= 1);
    assert!(info.embedding_length.unwrap() >= 64);
    assert!(info.tensor_bytes > 1_000_000 && info.tensor_bytes <= info.file_bytes);
}

#[test]
fn a_truncated_copy_of_the_real_model_is_refused_by_name() {
    let files = support::model_files("tiny-llama", "llama");
    let bytes = std::fs::read(files.find_suffix(".gguf").unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    match gguf::check(&cut) {
        Err(e @ InferenceError::InvalidModel { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("cut.gguf") && msg.contains("truncated"), "{msg}");
        }
        other => panic!("expected InvalidModel, got {other:?}"),
    }
}
