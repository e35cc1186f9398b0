//! Inference end to end: `outpost-control` and `outpost` as real processes, real models from
//! the signed model store, llama.cpp and candle in the agent. Generate and embed jobs report
//! stamped results while their outputs stay in the local store; the local OpenAI-compatible
//! endpoint is driven by the real `openai` Python client.

#![allow(clippy::expect_used)]

mod common;
mod harness;
#[path = "../../inference/tests/support/mod.rs"]
mod models;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::Control;
use harness::Node;
use outpost_protocol::{InferenceKind, InferenceSpec, JobSpec, Outcome, ResultReport, SubmitJobRequest};

const RESULT_WAIT: Duration = Duration::from_secs(180);

/// The test publisher's key (the one models/make-test-models signs with).
fn publisher_key() -> ed25519_dalek::SigningKey {
    let seed =
        std::fs::read_to_string(models::test_models().join("test-publisher.key")).expect("publisher key");
    let seed: [u8; 32] = hex::decode(seed.trim()).expect("hex seed").try_into().expect("32 bytes");
    ed25519_dalek::SigningKey::from_bytes(&seed)
}

/// The public half of the test publisher's key, for `[models] trusted_publishers`.
fn test_publisher() -> String {
    hex::encode(publisher_key().verifying_key().to_bytes())
}

/// all-MiniLM-L6-v2's files under a manifest that declares truncated sizes (64 and 128), signed
/// by the test publisher: a fixture for `dimensions`. What it tests is how the declaration is
/// handled, not how good this model's vectors are at those sizes (it was not trained for it).
fn truncatable_minilm(dir: &Path) -> PathBuf {
    use ed25519_dalek::Signer;
    use outpost_protocol::{ModelManifest, SignedModelManifest};
    let src = models::test_models().join("all-minilm-l6-v2");
    let signed: SignedModelManifest =
        serde_json::from_slice(&std::fs::read(src.join("manifest.json")).expect("manifest")).expect("JSON");
    let mut m: ModelManifest = serde_json::from_str(&signed.payload).expect("payload");
    m.name = "all-minilm-l6-v2-mrl".into();
    m.embedding_dimensions = vec![64, 128];
    let out = dir.join("all-minilm-l6-v2-mrl");
    for f in &m.files {
        let to = out.join(&f.path);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(src.join(&f.path), &to).expect("copy");
    }
    let key = publisher_key();
    let payload = serde_json::to_string(&m).expect("encode");
    let signed = SignedModelManifest {
        key_id: outpost_node::models::key_id_of(&key.verifying_key()),
        signature_hex: hex::encode(key.sign(payload.as_bytes()).to_bytes()),
        payload,
    };
    std::fs::write(out.join("manifest.json"), serde_json::to_string(&signed).expect("JSON")).expect("write");
    out
}

struct Site {
    _tmp: tempfile::TempDir,
    control: Control,
    node: Node,
    llm: String,
    embedder: String,
}

/// A control plane and an enrolled node with both test models imported; `extra` is appended
/// to the node's config. The node is started.
async fn site(extra: &str) -> Site {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("inference").await;
    let config = format!(
        "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 2\n[models]\ntrusted_publishers = [\"{}\"]\n{extra}\n",
        test_publisher()
    );
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, &config).await;
    let mut digests = Vec::new();
    for name in ["tiny-llama-tools", "tiny-llama", "all-minilm-l6-v2"] {
        let tar = models::test_models().join(format!("{name}.tar"));
        let out = node.cli(&["models", "import", tar.to_str().expect("utf-8"), "--json"]);
        assert!(out.status.success(), "import {name}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("import JSON");
        digests.push(v["digest"].as_str().expect("digest").to_string());
    }
    node.start();
    let embedder = digests.pop().expect("embedder");
    let llm = digests.pop().expect("llm");
    Site { _tmp: tmp, control, node, llm, embedder }
}

fn spec(v: serde_json::Value) -> InferenceSpec {
    serde_json::from_value(v).expect("inference spec")
}

impl Site {
    async fn run(&self, spec: InferenceSpec) -> ResultReport {
        let req = SubmitJobRequest::for_node(self.node.node_id.clone(), JobSpec::Inference(spec));
        let job = self.control.submit_request(&req).await;
        self.control.wait_result(&job.job_id, RESULT_WAIT).await
    }

    fn object(&self, key: &str) -> Vec<u8> {
        let out = self.node.cli(&["objects", "get", key, "-"]);
        assert!(out.status.success(), "objects get {key}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_and_embed_jobs_report_stamped_results_and_keep_outputs_on_site() {
    let s = site("").await;

    let generate =
        spec(serde_json::json!({"kind": "generate", "model": s.llm, "prompt": "Hello", "max_tokens": 16}));
    let r = s.run(generate.clone()).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    let stamp = r.inference.clone().expect("an inference stamp");
    assert_eq!(
        (stamp.kind, stamp.model_digest.as_str(), stamp.engine.as_str()),
        (InferenceKind::Generate, s.llm.as_str(), "llama")
    );
    assert!(stamp.engine_version.contains("llama.cpp"), "{}", stamp.engine_version);
    assert!(stamp.prompt_tokens >= 1 && (1..=16).contains(&stamp.completion_tokens), "{stamp:?}");
    assert!(stamp.time_to_first_token_us > 0, "{stamp:?}");
    assert_eq!(r.outputs.len(), 1);
    let key = format!("outpost-results/{}/completion.txt", r.job_id);
    assert_eq!(r.outputs[0].key, key);
    assert_eq!(r.outputs[0].body, None, "bodies never leave without an egress policy");
    assert_eq!(s.object(&key), r.stdout_tail.as_bytes(), "the inline prompt's text rides in the result");

    // Greedy decoding is deterministic: the same job gives the same text.
    let again = s.run(generate).await;
    assert_eq!(again.stdout_tail, r.stdout_tail);

    // Embeddings of texts read from the local store stay in the local store.
    let texts = "\"a cat sits on the mat\"\n\"a kitten rests on a rug\"\n\"quarterly revenue grew\"\n";
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("texts.jsonl");
    std::fs::write(&file, texts).expect("write texts");
    let out = s.node.cli(&["objects", "put", "notes/texts.jsonl", file.to_str().expect("utf-8")]);
    assert!(out.status.success(), "objects put: {}", String::from_utf8_lossy(&out.stderr));
    let embed = spec(serde_json::json!({
        "kind": "embed", "model": s.embedder, "texts_key": "notes/texts.jsonl", "output_prefix": "vectors/notes-"
    }));
    let r = s.run(embed).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    let stamp = r.inference.clone().expect("an inference stamp");
    assert_eq!((stamp.vectors, stamp.dimensions, stamp.engine.as_str()), (3, 384, "candle"));
    assert_eq!(r.stdout_tail, "", "vectors of site data never ride in the result");
    assert_eq!(r.outputs[0].key, "vectors/notes-embeddings.jsonl");
    let body = String::from_utf8(s.object("vectors/notes-embeddings.jsonl")).expect("utf-8");
    let vectors: Vec<Vec<f32>> =
        body.lines().map(|l| serde_json::from_str(l).expect("a JSON array")).collect();
    assert_eq!(vectors.len(), 3);
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(
        cos(&vectors[0], &vectors[1]) > cos(&vectors[0], &vectors[2]),
        "a paraphrase is closer than an unrelated text"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inference_jobs_fail_with_a_clear_error() {
    let s = site("").await;
    let absent = "0".repeat(64);
    let r = s.run(spec(serde_json::json!({"kind": "generate", "model": absent, "prompt": "hi"}))).await;
    assert_eq!(r.outcome, Outcome::Error, "{r:?}");
    assert!(r.error.as_deref().unwrap_or("").contains("not in the model store"), "{r:?}");

    let long = "x".repeat(3000);
    let r = s.run(spec(serde_json::json!({"kind": "generate", "model": s.llm, "prompt": long}))).await;
    assert_eq!(r.outcome, Outcome::Error, "{r:?}");
    assert!(r.error.as_deref().unwrap_or("").contains("context"), "{r:?}");

    let r = s.run(spec(serde_json::json!({"kind": "embed", "model": s.llm, "texts": ["a"]}))).await;
    assert_eq!(r.outcome, Outcome::Error, "{r:?}");
    assert!(r.error.as_deref().unwrap_or("").contains("cannot embed"), "{r:?}");

    let r = s
        .run(spec(serde_json::json!({"kind": "embed", "model": s.embedder, "texts_key": "absent.jsonl"})))
        .await;
    assert_eq!(r.outcome, Outcome::Error, "{r:?}");
    assert!(r.error.as_deref().unwrap_or("").contains("absent.jsonl"), "{r:?}");
}

/// A site whose agent serves the local endpoint with `key` on a free loopback port; `inference`
/// is more of the `[inference]` table. The key file lives in the returned directory.
async fn endpoint_site(key: &str, inference: &str) -> (Site, String, tempfile::TempDir) {
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
    let keydir = tempfile::tempdir().expect("tempdir");
    let key_file = keydir.path().join("api.key");
    std::fs::write(&key_file, format!("{key}\n")).expect("key file");
    let s = site(&format!(
        "[inference]\n{inference}[inference.api]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\napi_key_file = \"{}\"\n",
        key_file.display()
    ))
    .await;
    (s, format!("http://127.0.0.1:{port}"), keydir)
}

/// Runs a Python client script of tests/ with `args`; it must print "ALL OK".
fn run_client(script: &str, args: &[&str]) {
    let out = Command::new(openai_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script))
        .args(args)
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "{script} checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_local_endpoint_serves_the_openai_python_client() {
    let key = "e2e-inference-key-0123456789";
    let (s, base, keydir) = endpoint_site(key, "queue_bound = 1\nconcurrency = 1\n").await;
    let llm = model_id(&s, "tiny-llama");
    let emb = model_id(&s, "all-minilm-l6-v2");
    let mrl = truncatable_minilm(keydir.path());
    let out = s.node.cli(&["models", "import", mrl.to_str().expect("utf-8"), "--json"]);
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    let mrl = model_id(&s, "all-minilm-l6-v2-mrl");
    run_client("openai_client.py", &[&base, key, &llm, &emb, &mrl]);
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_and_structured_outputs_serve_the_openai_sdk_and_langchain() {
    let key = "e2e-inference-tools-key-0123456789";
    let (s, base, _keydir) = endpoint_site(key, "").await;
    let tools = model_id(&s, "tiny-llama-tools");
    let plain = model_id(&s, "tiny-llama");
    run_client("openai_tools.py", &[&base, key, &tools, &plain]);
}

/// `name@version` as `/v1/models` lists it.
fn model_id(s: &Site, name: &str) -> String {
    let out = s.node.cli(&["models", "list", "--json"]);
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&format!("\"{name}\"")))
        .map(str::to_string)
        .expect("model listed");
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    format!("{}@{}", v["name"].as_str().expect("name"), v["version"].as_str().expect("version"))
}

/// A Python with the `openai` client, LangChain's `langchain-openai` and `jsonschema`:
/// `OUTPOST_OPENAI_PYTHON`, or a venv made once under the cargo target's tmp dir (PyPI only).
fn openai_python() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTPOST_OPENAI_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv-2");
    let python = venv.join("bin/python");
    if !python.exists() {
        // Built beside it and renamed into place: tests that run at once each get a whole one.
        let building = venv.with_extension(format!("building-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&building);
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&building)
            .status()
            .expect("python3 -m venv")
            .success();
        assert!(ok, "cannot make a venv");
        let ok = Command::new(building.join("bin/python"))
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(["openai==3.54.0", "langchain-openai==1.8.1", "jsonschema==4.26.0"])
            .status()
            .expect("pip install")
            .success();
        assert!(ok, "pip install of the Python clients failed");
        if std::fs::rename(&building, &venv).is_err() {
            // Another test got there first.
            let _ = std::fs::remove_dir_all(&building);
        }
    }
    python
}
