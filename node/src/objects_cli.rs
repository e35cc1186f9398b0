//! `outpost objects …`: the local object store (`[storage]`) from the command line, for site
//! staff putting data where the relay and jobs see it, and for checking what jobs wrote. The
//! same port the agent uses, so keys follow the same rules and bodies are streamed both ways.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use outpost_node::config::Config;
use outpost_node::objstore::{AnyStore, MAX_LIST_PAGE, ObjectStore, key};
use tokio::io::AsyncWriteExt;

#[derive(Debug, Subcommand)]
pub enum ObjectsCommand {
    /// Store FILE (or stdin with `-`) under KEY, replacing any object there; prints size and SHA-256.
    Put {
        key: String,
        /// The file to upload; `-` reads stdin.
        file: PathBuf,
    },
    /// Write the object's body to FILE, or to stdout when FILE is absent or `-`.
    Get { key: String, file: Option<PathBuf> },
    /// Show size, ETag and modification time of one object.
    Head { key: String },
    /// List objects under PREFIX (all when absent), in key order.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        /// Stop after this many objects (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove the object (succeeds when it is already gone).
    Rm { key: String },
}

pub async fn run(cfg: &Config, cmd: ObjectsCommand) -> anyhow::Result<ExitCode> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let store = AnyStore::open(cfg, &env).await.context("cannot open the local object store ([storage])")?;
    match cmd {
        ObjectsCommand::Put { key, file } => {
            let put = if file.as_os_str() == "-" {
                store.put(&key, tokio::io::stdin()).await?
            } else {
                let f = tokio::fs::File::open(&file)
                    .await
                    .with_context(|| format!("cannot open {}", file.display()))?;
                store.put(&key, f).await?
            };
            println!("{}\t{} bytes\tsha256 {}", key::display(&key), put.size, put.sha256);
        }
        ObjectsCommand::Get { key, file } => {
            let mut body = store.get(&key).await?;
            match file.filter(|f| f.as_os_str() != "-") {
                Some(path) => {
                    // Write beside the target and rename, so a failed read leaves no partial file.
                    let tmp = path.with_extension("outpost-partial");
                    let mut out = tokio::fs::File::create(&tmp)
                        .await
                        .with_context(|| format!("cannot create {}", tmp.display()))?;
                    let copied = tokio::io::copy(&mut body, &mut out).await;
                    let done = match copied {
                        Ok(_) => out.sync_all().await.map_err(anyhow::Error::from),
                        Err(e) => Err(e.into()),
                    };
                    if let Err(e) = done {
                        let _ = tokio::fs::remove_file(&tmp).await;
                        return Err(e.context(format!("cannot read {}", key::display(&key))));
                    }
                    tokio::fs::rename(&tmp, &path)
                        .await
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                None => {
                    let mut out = tokio::io::stdout();
                    tokio::io::copy(&mut body, &mut out).await?;
                    out.flush().await?;
                }
            }
        }
        ObjectsCommand::Head { key } => {
            let m = store.head(&key).await?;
            println!("key:      {}", key::display(&m.key));
            println!("size:     {}", m.size);
            println!("etag:     {}", m.etag);
            if let Some(t) = m.last_modified_unix_ms {
                println!("modified: {t} (unix ms)");
            }
        }
        ObjectsCommand::Ls { prefix, limit, json } => {
            let mut after: Option<String> = None;
            let mut shown = 0usize;
            loop {
                let page = store.list(&prefix, after.as_deref(), MAX_LIST_PAGE).await?;
                for m in &page.objects {
                    if limit > 0 && shown >= limit {
                        return Ok(ExitCode::SUCCESS);
                    }
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({ "key": m.key, "size": m.size, "etag": m.etag,
                                "last_modified_unix_ms": m.last_modified_unix_ms })
                        );
                    } else {
                        println!("{:>12}  {}", m.size, key::display(&m.key));
                    }
                    shown += 1;
                }
                match page.next_start_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        ObjectsCommand::Rm { key } => {
            store.delete(&key).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
