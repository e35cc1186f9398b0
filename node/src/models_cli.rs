//! `outpost models …`: import signed models (from a USB disk, say) into the model store, list,
//! re-verify and remove them. The store is plain files with its own lock, so these commands
//! work while the agent runs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use outpost_node::config::Config;
use outpost_node::identity::Identity;
use outpost_node::models::{InstalledModel, ModelStore, Publishers};
use outpost_protocol::progress::Bar;

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Verify and copy a model (a directory with manifest.json, or a plain .tar) into the store.
    Import {
        path: PathBuf,
        /// Print the imported model as JSON (no progress bar).
        #[arg(long)]
        json: bool,
        /// No progress bar (there is none either when standard error is not a terminal).
        #[arg(long, short)]
        quiet: bool,
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
        ModelsCommand::Import { path, json, quiet } => {
            let trust = publishers(cfg)?;
            let writer = store.writer()?;
            let bar = Bar::bytes("importing", 0, quiet || json);
            let mut file = String::new();
            let model = writer
                .import(&path, &trust, &mut |p| {
                    if p.file != file {
                        file.clone_from(&p.file);
                        bar.set_total(p.total_bytes);
                        bar.set_message(&format!("importing {file}"));
                    }
                    bar.set(p.done_bytes);
                })
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
    let org = Identity::load(&cfg.identity_dir()).map(|i| i.org_keys).unwrap_or_default();
    Publishers::new(&org, &cfg.models.trusted_publishers).map_err(anyhow::Error::msg)
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
