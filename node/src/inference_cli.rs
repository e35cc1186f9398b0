//! `outpost inference …`: engines built in, one-off generation and embeddings on this machine,
//! and the local OpenAI-compatible endpoint on its own (the agent starts the same endpoint when
//! `[inference.api] enabled`). Models come from the signed model store.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use outpost_inference::{GenerateRequest, Prompt};
use outpost_node::config::Config;
use outpost_node::inference::job::finish_name;
use outpost_node::inference::{Inference, api};
use outpost_node::models::ModelStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Subcommand)]
pub enum InferenceCommand {
    /// List the inference engines built into this agent (cargo features llama, candle).
    Engines,
    /// Generate text with a model of the store (NAME, NAME@VERSION or DIGEST), streaming it.
    Generate {
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        /// 0 is greedy (deterministic).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop at this string (repeatable).
        #[arg(long = "stop", value_name = "TEXT")]
        stop: Vec<String>,
        /// Print one JSON object (text and figures) instead of streaming the text.
        #[arg(long)]
        json: bool,
    },
    /// Embed texts with a model of the store; prints one JSON array per text.
    Embed {
        model: String,
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Serve the local OpenAI-compatible endpoint ([inference.api]) until interrupted.
    Serve {
        /// Listen here instead of inference.api.listen (127.0.0.1:PORT or unix:/path.sock).
        #[arg(long)]
        listen: Option<String>,
    },
}

pub async fn run(cfg: &Config, cmd: InferenceCommand) -> anyhow::Result<ExitCode> {
    let inference = Arc::new(Inference::new(&cfg.inference, ModelStore::new(cfg.models_dir())));
    match cmd {
        InferenceCommand::Engines => {
            let engines = inference.manager.engines();
            if engines.is_empty() {
                println!("no engines built in: build with `--features llama,candle` (or `engines`)");
            }
            for e in engines {
                println!("{:<8} {}", e.name, e.version);
            }
            Ok(ExitCode::SUCCESS)
        }
        InferenceCommand::Generate { model, prompt, max_tokens, temperature, seed, stop, json } => {
            let (_, files) = inference.resolve(&model)?;
            let req = GenerateRequest {
                prompt: String::new(),
                max_tokens,
                temperature,
                seed,
                stop,
                whole_completion: false,
                ..GenerateRequest::default()
            };
            let (tx, mut rx) = mpsc::channel::<String>(256);
            let printer = tokio::spawn(async move {
                let mut out = std::io::stdout();
                while let Some(piece) = rx.recv().await {
                    if !json {
                        let _ = out.write_all(piece.as_bytes());
                        let _ = out.flush();
                    }
                }
            });
            let out = inference.manager.generate(&files, Prompt::Text(prompt), req, Some(tx)).await?;
            let _ = printer.await;
            let s = out.stats;
            if json {
                let v = serde_json::json!({
                    "text": out.text, "model_digest": out.model_digest, "engine": out.engine,
                    "engine_version": out.engine_version, "prompt_tokens": s.prompt_tokens,
                    "completion_tokens": s.completion_tokens, "finish": finish_name(s.finish),
                    "time_to_first_token_ms": s.time_to_first_token_ms, "generation_ms": s.generation_ms,
                    "tokens_per_s": s.tokens_per_s(),
                });
                println!("{v}");
            } else {
                println!();
                eprintln!(
                    "{} prompt tokens, {} generated ({}), first token {:.1} ms, {:.1} tokens/s",
                    s.prompt_tokens,
                    s.completion_tokens,
                    finish_name(s.finish),
                    s.time_to_first_token_ms,
                    s.tokens_per_s()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        InferenceCommand::Embed { model, texts } => {
            let (_, files) = inference.resolve(&model)?;
            let out = inference.manager.embed(&files, texts).await?;
            for v in out.vectors {
                println!("{}", serde_json::to_string(&v)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        InferenceCommand::Serve { listen } => {
            let mut api_cfg = cfg.inference.api.clone();
            if let Some(l) = listen {
                api_cfg.listen = l;
            }
            api_cfg.listen_addr().map_err(anyhow::Error::msg)?;
            let endpoint = api::bind(inference, &api_cfg).await?;
            eprintln!("inference endpoint on {}", endpoint.address);
            let shutdown = CancellationToken::new();
            let token = shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                token.cancel();
            });
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot watch SIGTERM")?;
            let token = shutdown.clone();
            tokio::spawn(async move {
                term.recv().await;
                token.cancel();
            });
            endpoint.serve(shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
