//! `generate` and `embed` jobs: read the prompt or texts (inline, or from the local store),
//! run them through the manager, and write the full output to the local store. What leaves the
//! site is the stamp (model digest, engine, token counts) and, for an inline prompt only, the
//! generated text: output derived from site data stays on site.

use outpost_inference::{FinishReason, GenerateRequest, InferenceError, Manager, ModelFiles, Prompt};
use outpost_protocol::{InferenceKind, InferenceSpec, InferenceStamp, OutputObject};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::objstore::{AnyStore, ObjectStore, ObjectStoreError};

/// Most bytes of a prompt read from the store.
pub const MAX_PROMPT_BYTES: u64 = 1 << 20;
/// Most bytes of a texts file (JSON lines) read from the store, and most texts in it.
pub const MAX_TEXTS_BYTES: u64 = 64 << 20;
pub const MAX_TEXTS: usize = 100_000;
/// Texts per request to the manager.
const EMBED_CHUNK: usize = 256;

/// What a job reads, resolved to text.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Prompt(String),
    Texts(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{field} {key:?}: {source}")]
    Store { field: &'static str, key: String, source: ObjectStoreError },
    #[error("{0}")]
    Invalid(String),
}

impl InputError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Store { source, .. } if source.is_retryable())
    }
}

/// The job's input: inline, or read (bounded) from the local store.
pub async fn load_input(store: &AnyStore, spec: &InferenceSpec) -> Result<Input, InputError> {
    match spec.kind {
        InferenceKind::Generate => match (&spec.prompt, &spec.prompt_key) {
            (Some(p), _) => Ok(Input::Prompt(p.clone())),
            (None, Some(key)) => {
                let bytes = read_bounded(store, "prompt_key", key, MAX_PROMPT_BYTES).await?;
                String::from_utf8(bytes)
                    .map(Input::Prompt)
                    .map_err(|_| InputError::Invalid(format!("prompt_key {key:?} is not UTF-8 text")))
            }
            (None, None) => Err(InputError::Invalid("a generate job needs a prompt".into())),
        },
        InferenceKind::Embed => match &spec.texts_key {
            None => Ok(Input::Texts(spec.texts.clone())),
            Some(key) => {
                let bytes = read_bounded(store, "texts_key", key, MAX_TEXTS_BYTES).await?;
                parse_json_lines(&bytes)
                    .map(Input::Texts)
                    .map_err(|e| InputError::Invalid(format!("texts_key {key:?}: {e}")))
            }
        },
    }
}

async fn read_bounded(
    store: &AnyStore,
    field: &'static str,
    key: &str,
    max: u64,
) -> Result<Vec<u8>, InputError> {
    let err = |source| InputError::Store { field, key: key.to_string(), source };
    let mut reader = store.get(key).await.map_err(err)?;
    let mut buf = Vec::new();
    (&mut reader)
        .take(max + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| err(ObjectStoreError::io(format!("reading {field} {key:?}"), e)))?;
    if buf.len() as u64 > max {
        return Err(InputError::Invalid(format!("{field} {key:?} is larger than {max} bytes")));
    }
    Ok(buf)
}

/// One JSON string per line; blank lines are skipped.
pub fn parse_json_lines(bytes: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let mut texts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let s: String = serde_json::from_str(line)
            .map_err(|_| format!("line {} is not a JSON string (one string per line)", n + 1))?;
        texts.push(s);
        if texts.len() > MAX_TEXTS {
            return Err(format!("more than {MAX_TEXTS} texts"));
        }
    }
    if texts.is_empty() {
        return Err("holds no texts".into());
    }
    Ok(texts)
}

/// What a job produced, before it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Produced {
    pub stamp: InferenceStamp,
    /// The output object: its key suffix and body.
    pub file: &'static str,
    pub body: Vec<u8>,
    /// Text that may ride in the result (generate with an inline prompt).
    pub inline_text: Option<String>,
}

/// Runs the job's inference. A full queue is not a failure for a job: it waits its turn.
pub async fn run(
    manager: &Manager,
    model: &ModelFiles,
    spec: &InferenceSpec,
    input: Input,
) -> Result<Produced, InferenceError> {
    match input {
        Input::Prompt(prompt) => {
            let req = GenerateRequest {
                prompt: String::new(),
                max_tokens: spec.max_tokens,
                temperature: spec.temperature,
                seed: spec.seed,
                stop: spec.stop.clone(),
                // A job stops at the end of the context (finish reason `length`).
                whole_completion: false,
                ..GenerateRequest::default()
            };
            let out = wait_turn(|| manager.generate(model, Prompt::Text(prompt.clone()), req.clone(), None))
                .await?;
            let s = out.stats;
            let stamp = InferenceStamp {
                kind: InferenceKind::Generate,
                model_digest: out.model_digest,
                engine: out.engine,
                engine_version: out.engine_version,
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
                finish: Some(finish_name(s.finish).into()),
                time_to_first_token_us: (s.time_to_first_token_ms * 1000.0) as u64,
                generation_us: (s.generation_ms * 1000.0) as u64,
                vectors: 0,
                dimensions: 0,
            };
            let inline_text = spec.prompt.is_some().then(|| out.text.clone());
            Ok(Produced { stamp, file: "completion.txt", body: out.text.into_bytes(), inline_text })
        }
        Input::Texts(texts) => {
            let mut body = Vec::new();
            let (mut tokens, mut vectors, mut dims) = (0u32, 0u32, 0u32);
            let mut last = None;
            for chunk in texts.chunks(EMBED_CHUNK) {
                let out = wait_turn(|| manager.embed(model, chunk.to_vec())).await?;
                tokens = tokens.saturating_add(out.tokens);
                for v in &out.vectors {
                    dims = v.len() as u32;
                    vectors += 1;
                    serde_json::to_writer(&mut body, v).map_err(|e| InferenceError::engine("json", e))?;
                    body.push(b'\n');
                }
                last = Some(out);
            }
            let out = last.ok_or_else(|| InferenceError::BadRequest("no texts to embed".into()))?;
            let stamp = InferenceStamp {
                kind: InferenceKind::Embed,
                model_digest: out.model_digest,
                engine: out.engine,
                engine_version: out.engine_version,
                prompt_tokens: tokens,
                completion_tokens: 0,
                finish: None,
                time_to_first_token_us: 0,
                generation_us: 0,
                vectors,
                dimensions: dims,
            };
            Ok(Produced { stamp, file: "embeddings.jsonl", body, inline_text: None })
        }
    }
}

/// Retries while the queue is full: a job waits for its turn rather than fail.
async fn wait_turn<T, F, Fut>(mut call: F) -> Result<T, InferenceError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, InferenceError>>,
{
    loop {
        match call().await {
            Err(InferenceError::QueueFull { .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await
            }
            other => return other,
        }
    }
}

pub fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
        FinishReason::ToolCalls => "tool_calls",
    }
}

/// Where a job's output goes: its `output_prefix`, or `outpost-results/<job>/`.
pub fn output_key(spec: &InferenceSpec, job_id: &str, file: &str) -> String {
    match &spec.output_prefix {
        Some(p) => format!("{p}{file}"),
        None => format!("outpost-results/{job_id}/{file}"),
    }
}

/// Stores the output; uploads overwrite, so storing again after a crash is safe.
pub async fn store_output(
    store: &AnyStore,
    key: &str,
    body: &[u8],
) -> Result<OutputObject, ObjectStoreError> {
    let put = store.put(key, body).await?;
    Ok(OutputObject {
        key: key.to_string(),
        size: put.size,
        sha256: hex::encode(Sha256::digest(body)),
        body: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_files_are_json_strings_one_per_line() {
        assert_eq!(parse_json_lines(b"\"a\"\n\n\"b c\"\n").unwrap(), ["a", "b c"]);
        assert!(parse_json_lines(b"\"a\"\nplain\n").unwrap_err().contains("line 2"));
        assert!(parse_json_lines(b"\n\n").unwrap_err().contains("no texts"));
        assert!(parse_json_lines(b"\xff").unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn outputs_go_under_the_prefix_or_the_job_results() {
        let mut spec: InferenceSpec = serde_json::from_value(serde_json::json!({
            "kind": "embed", "model": "a".repeat(64), "texts": ["x"]
        }))
        .unwrap();
        assert_eq!(output_key(&spec, "j1", "embeddings.jsonl"), "outpost-results/j1/embeddings.jsonl");
        spec.output_prefix = Some("vec/".into());
        assert_eq!(output_key(&spec, "j1", "embeddings.jsonl"), "vec/embeddings.jsonl");
    }
}
