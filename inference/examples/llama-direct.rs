//! The benchmark baseline for the llama adapter: greedy generation straight on llama-cpp-2, with
//! the adapter's context settings, and none of Outpost's code.
//!
//!   llama-direct --model PATH --prompt TEXT --tokens N --threads T --ctx C [--runs R]
//!
//! Prints one JSON line per run: prompt_tokens, completion_tokens, ttft_ms (start of prompt
//! processing to the first token sampled) and tokens_per_s (tokens after the first over the
//! time they took), as `GenerateStats` defines them. Each run gets a fresh context, as each
//! request does in the adapter.

use std::error::Error;
use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;

struct Args {
    model: String,
    prompt: String,
    tokens: usize,
    threads: i32,
    ctx: u32,
    runs: usize,
}

fn args() -> Result<Args, Box<dyn Error>> {
    let mut a =
        Args { model: String::new(), prompt: String::new(), tokens: 128, threads: 2, ctx: 4096, runs: 1 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => a.model = value,
            "--prompt" => a.prompt = value,
            "--tokens" => a.tokens = value.parse()?,
            "--threads" => a.threads = value.parse()?,
            "--ctx" => a.ctx = value.parse()?,
            "--runs" => a.runs = value.parse()?,
            _ => return Err(format!("unknown argument {flag}").into()),
        }
    }
    if a.model.is_empty() {
        return Err(
            "usage: llama-direct --model PATH --prompt TEXT --tokens N --threads T --ctx C [--runs R]".into(),
        );
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn Error>> {
    let a = args()?;
    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model =
        LlamaModel::load_from_file(&backend, &a.model, &LlamaModelParams::default().with_n_gpu_layers(0))?;
    let vocab = model.vocab();
    let n_batch = a.ctx.min(512);
    for _ in 0..a.runs {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(a.ctx))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch)
            .with_n_threads(a.threads)
            .with_n_threads_batch(a.threads)
            .with_no_perf(true);
        let mut ctx = model.new_context(&backend, params)?;
        let prompt = vocab.tokenize(a.prompt.as_bytes(), true, true);
        if prompt.is_empty() || prompt.len() >= a.ctx as usize {
            return Err(
                format!("prompt of {} tokens does not fit a context of {}", prompt.len(), a.ctx).into()
            );
        }
        let mut sampler = LlamaSampler::greedy();
        let mut batch = LlamaBatch::new(n_batch as usize, 1);

        let start = Instant::now();
        for (pos, chunk) in (0..).step_by(n_batch as usize).zip(prompt.chunks(n_batch as usize)) {
            batch.clear();
            for (i, token) in (pos..).zip(chunk) {
                batch.add(*token, i, &[0], i as usize == prompt.len() - 1)?;
            }
            ctx.decode(&mut batch)?;
        }
        let mut logits = batch.n_tokens() - 1;
        let mut n_past = prompt.len();
        let mut piece = Vec::with_capacity(32);
        let mut text = Vec::new();
        let (mut first, mut last, mut completion) = (None, start, 0usize);
        loop {
            let token = sampler.sample(&ctx, logits);
            let now = Instant::now();
            first.get_or_insert(now);
            if vocab.is_eog(token) {
                break;
            }
            last = now;
            completion += 1;
            piece.clear();
            vocab.token_to_piece_into(token, &mut piece, false, None);
            text.extend_from_slice(&piece);
            if completion >= a.tokens || n_past >= a.ctx as usize {
                break;
            }
            batch.clear();
            batch.add(token, i32::try_from(n_past)?, &[0], true)?;
            ctx.decode(&mut batch)?;
            n_past += 1;
            logits = 0;
        }
        let first = first.unwrap_or(start);
        let gen_s = last.duration_since(first).as_secs_f64();
        let tps = if completion > 1 && gen_s > 0.0 { (completion - 1) as f64 / gen_s } else { 0.0 };
        println!(
            "{{\"prompt_tokens\":{},\"completion_tokens\":{completion},\"ttft_ms\":{:.3},\"tokens_per_s\":{tps:.1}}}",
            prompt.len(),
            first.duration_since(start).as_secs_f64() * 1e3,
        );
        std::hint::black_box(&text);
    }
    Ok(())
}
