//! Embedding throughput of the candle adapter, comparable with `models/embed_reference.py`.
//!
//!     embed-bench --model-dir DIR --sentences FILE [--batch 16] [--threads N] [--runs 3]
//!                 [--out VECTORS.json] [--gpu]
//!
//! FILE is a JSON list of strings or one sentence per line. The sentences go to
//! `LoadedModel::embed` in calls of `--batch` texts, in file order, as clients would send them;
//! the figure is the best of `--runs` warm passes over the whole set. Prints one JSON object
//! with the same keys as the reference script; `--out` writes the vectors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use outpost_inference::candle::CandleEngine;
use outpost_inference::{InferenceEngine, LoadOptions, ModelFiles};

struct Args {
    model_dir: PathBuf,
    sentences: PathBuf,
    batch: usize,
    threads: usize,
    runs: usize,
    out: Option<PathBuf>,
    gpu: bool,
}

fn usage() -> String {
    "usage: embed-bench --model-dir DIR --sentences FILE [--batch 16] [--threads N] [--runs 3] \
     [--out VECTORS.json] [--gpu]"
        .into()
}

fn parse_args() -> Result<Args, String> {
    let mut model_dir = None;
    let mut sentences = None;
    let mut args = Args {
        model_dir: PathBuf::new(),
        sentences: PathBuf::new(),
        batch: 16,
        threads: 0,
        runs: 3,
        out: None,
        gpu: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value\n{}", usage()));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--model-dir" => model_dir = Some(PathBuf::from(value()?)),
            "--sentences" => sentences = Some(PathBuf::from(value()?)),
            "--batch" => args.batch = number(value()?)?.max(1),
            "--threads" => args.threads = number(value()?)?,
            "--runs" => args.runs = number(value()?)?.max(1),
            "--out" => args.out = Some(PathBuf::from(value()?)),
            "--gpu" => args.gpu = true,
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other}\n{}", usage())),
        }
    }
    args.model_dir = model_dir.ok_or_else(usage)?;
    args.sentences = sentences.ok_or_else(usage)?;
    Ok(args)
}

fn read_sentences(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    } else {
        Ok(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect())
    }
}

/// A model directory as the model store would hand it over: relative path → file.
fn model_files(dir: &Path) -> Result<ModelFiles, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else if let Ok(rel) = path.strip_prefix(root) {
                out.insert(rel.to_string_lossy().replace('\\', "/"), path.clone());
            }
        }
        Ok(())
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files).map_err(|e| format!("{}: {e}", dir.display()))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(ModelFiles {
        digest: format!("bench-{name}"),
        label: format!("{name}@local"),
        engine: "candle".into(),
        files,
    })
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let sentences = read_sentences(&args.sentences)?;
    let files = model_files(&args.model_dir)?;
    let engine = CandleEngine::new();
    let opts = LoadOptions { threads: args.threads, context: 0, gpu: args.gpu };
    engine.inspect(&files, &opts).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let model = engine.load(&files, &opts).map_err(|e| e.to_string())?;
    let load_s = started.elapsed().as_secs_f64();

    let pass = || -> Result<(Vec<Vec<f32>>, u64), String> {
        let mut vectors = Vec::with_capacity(sentences.len());
        let mut tokens = 0u64;
        for batch in sentences.chunks(args.batch) {
            let out = model.embed(batch).map_err(|e| e.to_string())?;
            tokens += u64::from(out.tokens);
            vectors.extend(out.vectors);
        }
        Ok((vectors, tokens))
    };
    pass()?; // warm-up
    let mut best = 0f64;
    let mut result = (Vec::new(), 0);
    for _ in 0..args.runs {
        let t = Instant::now();
        result = pass()?;
        let dt = t.elapsed().as_secs_f64();
        if dt > 0.0 {
            best = best.max(sentences.len() as f64 / dt);
        }
    }
    let (vectors, tokens) = result;
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        args.threads
    };
    let summary = serde_json::json!({
        "engine": engine.version(),
        "sentences_per_s": (best * 100.0).round() / 100.0,
        "sentences": sentences.len(),
        "threads": threads,
        "batch": args.batch,
        "runs": args.runs,
        "load_s": (load_s * 1000.0).round() / 1000.0,
        "dim": vectors.first().map_or(0, Vec::len),
        "tokens": tokens,
    });
    if let Some(out) = &args.out {
        let name = args.model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let doc = serde_json::json!({ "model": name, "sentences": sentences, "vectors": vectors });
        std::fs::write(out, doc.to_string()).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    println!("{summary}");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embed-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
