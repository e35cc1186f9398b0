//! `outpost models …`: import signed models (from a USB disk, say) into the model store, list,
//! re-verify and remove them. The store is plain files with its own lock, so these commands
//! work while the agent runs.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use outpost_node::config::Config;
use outpost_node::identity::Identity;
use outpost_node::models::{InstalledModel, ModelStore, Progress, Publishers};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Verify and copy a model (a directory with manifest.json, or a plain .tar) into the store.
    Import {
        path: PathBuf,
        /// Print the imported model as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the models in the store.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every file of every model (or of one: NAME, NAME@VERSION or DIGEST); fails when
    /// any is damaged.
    Verify { model: Option<String> },
    /// Remove a model (NAME, NAME@VERSION or DIGEST) and the files no other model uses.
    Remove { model: String },
}

pub fn run(cfg: &Config, cmd: ModelsCommand) -> anyhow::Result<ExitCode> {
    let store = ModelStore::new(cfg.models_dir());
    match cmd {
        ModelsCommand::Import { path, json } => {
            let trust = publishers(cfg)?;
            let writer = store.writer()?;
            let mut bar = Bar::new();
            let model = writer
                .import(&path, &trust, &mut |p| bar.update(p))
                .with_context(|| format!("cannot import {}", path.display()));
            bar.finish();
            let model = model?;
            if json {
                println!("{}", serde_json::to_string(&describe(&model))?);
            } else {
                println!(
                    "imported {}@{} ({}, {} files, {} bytes) as {}",
                    model.manifest.name,
                    model.manifest.version,
                    model.manifest.format.as_str(),
                    model.manifest.files.len(),
                    model.total_bytes(),
                    model.digest
                );
            }
        }
        ModelsCommand::List { json } => {
            for m in store.list()? {
                if json {
                    println!("{}", serde_json::to_string(&describe(&m))?);
                } else {
                    println!(
                        "{}  {:<24} {:<12} {:<12} {:<7} {:>12}",
                        &m.digest[..12.min(m.digest.len())],
                        m.manifest.name,
                        m.manifest.version,
                        m.manifest.format.as_str(),
                        m.manifest.engine,
                        m.total_bytes()
                    );
                }
            }
        }
        ModelsCommand::Verify { model } => {
            let trust = publishers(cfg)?;
            let (checks, broken) = store.verify(model.as_deref(), &trust)?;
            let mut bad = broken.len();
            for e in &broken {
                println!("DAMAGED {e}");
            }
            for c in &checks {
                let name =
                    format!("{}@{} {}", c.model.manifest.name, c.model.manifest.version, c.model.digest);
                if c.damage.is_empty() {
                    println!("ok      {name}");
                } else {
                    bad += 1;
                    println!("DAMAGED {name}");
                    for d in &c.damage {
                        println!("        {}: {}", d.path, d.problem);
                    }
                }
            }
            if bad > 0 {
                println!("{bad} model(s) damaged; import them again to repair");
                return Ok(ExitCode::FAILURE);
            }
        }
        ModelsCommand::Remove { model } => {
            let removed = store.writer()?.remove(&model)?;
            println!("removed {}@{} {}", removed.manifest.name, removed.manifest.version, removed.digest);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The org key pinned at enrollment (when enrolled) and the configured publisher keys.
fn publishers(cfg: &Config) -> anyhow::Result<Publishers> {
    let org = Identity::load(&cfg.identity_dir()).ok().map(|i| i.node.org_signing_key);
    Publishers::new(org.as_ref(), &cfg.models.trusted_publishers).map_err(anyhow::Error::msg)
}

fn describe(m: &InstalledModel) -> serde_json::Value {
    serde_json::json!({
        "digest": m.digest,
        "name": m.manifest.name,
        "version": m.manifest.version,
        "format": m.manifest.format,
        "engine": m.manifest.engine,
        "license": m.manifest.license,
        "files": m.manifest.files,
        "bytes": m.total_bytes(),
    })
}

/// Progress on stderr: one rewritten line at most four times a second on a terminal, a plain
/// line every ten seconds otherwise (logs stay readable).
struct Bar {
    tty: bool,
    last: Option<Instant>,
    drawn: bool,
}

impl Bar {
    fn new() -> Self {
        Self { tty: std::io::stderr().is_terminal(), last: None, drawn: false }
    }

    fn update(&mut self, p: &Progress) {
        let every = if self.tty { Duration::from_millis(250) } else { Duration::from_secs(10) };
        let due = self.last.is_none_or(|t| t.elapsed() >= every) || p.done_bytes == p.total_bytes;
        if !due {
            return;
        }
        self.last = Some(Instant::now());
        let pct = p.done_bytes.saturating_mul(100).checked_div(p.total_bytes).unwrap_or(100);
        let line = format!(
            "importing {}: {} / {} MiB ({pct}%)",
            p.file,
            p.done_bytes / (1024 * 1024),
            p.total_bytes.div_ceil(1024 * 1024)
        );
        let mut err = std::io::stderr();
        let _ = if self.tty { write!(err, "\r\x1b[2K{line}") } else { writeln!(err, "{line}") };
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.tty && self.drawn {
            let _ = writeln!(std::io::stderr());
        }
    }
}
