//! Load driver for `scripts/bench-relay`: drops small JSON objects into the node's configured
//! object store (the same adapter and client the agent uses), or lists a prefix the way a bare
//! polling loop would, and prints what it did as JSON.
//!
//! ```text
//! relay-load --config node.toml put PREFIX COUNT [CONCURRENCY]   one JSON line per object:
//!                                                                {"key":…,"landed_unix_ms":…}
//! relay-load --config node.toml list PREFIX                      {"objects":…,"list_calls":…,"ms":…}
//! ```

#![allow(clippy::expect_used, clippy::panic, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use futures_util::StreamExt;
use outpost_node::config::Config;
use outpost_node::objstore::{AnyStore, MAX_LIST_PAGE, ObjectStore};

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn usage() -> ! {
    eprintln!("usage: relay-load --config FILE put PREFIX COUNT [CONCURRENCY] | list PREFIX");
    std::process::exit(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 || args[0] != "--config" {
        usage();
    }
    let cfg = Config::load(Some(&PathBuf::from(&args[1]))).expect("node config").config;
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let store = AnyStore::open(&cfg, &env).await.expect("open the object store");
    match args[2].as_str() {
        "put" if args.len() >= 5 => {
            let prefix = args[3].clone();
            let count: usize = args[4].parse().unwrap_or_else(|_| usage());
            let concurrency: usize = args.get(5).map_or(16, |c| c.parse().unwrap_or_else(|_| usage()));
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut landed = futures_util::stream::iter((0..count).map(|i| {
                let store = store.clone();
                let key = format!("{prefix}obj-{i:06}.json");
                async move {
                    let body = format!("{{\"resourceType\":\"Observation\",\"n\":{i}}}");
                    // Retry what the store says is worth retrying (Garage on sqlite answers 503
                    // "database is locked" under many puts in flight), as the agent's callers do.
                    let mut delay = std::time::Duration::from_millis(20);
                    for attempt in 1.. {
                        match store.put(&key, body.as_bytes()).await {
                            Ok(_) => break,
                            Err(e) if e.is_retryable() && attempt < 20 => {
                                tokio::time::sleep(delay).await;
                                delay = (delay * 2).min(std::time::Duration::from_secs(1));
                            }
                            Err(e) => panic!("put {key}: {e}"),
                        }
                    }
                    (key, now_ms())
                }
            }))
            .buffer_unordered(concurrency);
            while let Some((key, at)) = landed.next().await {
                writeln!(out, "{}", serde_json::json!({ "key": key, "landed_unix_ms": at })).expect("stdout");
            }
            out.flush().expect("stdout");
        }
        "list" if args.len() >= 4 => {
            let prefix = &args[3];
            let t0 = Instant::now();
            let (mut objects, mut calls, mut after) = (0usize, 0u64, None::<String>);
            loop {
                let page = store.list(prefix, after.as_deref(), MAX_LIST_PAGE).await.expect("list");
                calls += 1;
                objects += page.objects.len();
                match page.next_start_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            println!("{}", serde_json::json!({ "objects": objects, "list_calls": calls, "ms": ms }));
        }
        _ => usage(),
    }
}
