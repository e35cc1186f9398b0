//! What a node listing filtered by a selector costs in the sled store, three ways: as
//! `GET /v1/nodes` first did it (decode every record whole, then filter), by a scan
//! (`StateStore::find_nodes` without a label: judge each record by its organisation and labels,
//! decode only the kept ones whole), and as it does now for a selector with a `key=value` term
//! (`find_nodes` given that label: only the nodes the label index lists are read). One process,
//! one store, the ways interleaved round by round, so all see the same machine.
//!
//!   cargo run --release -p outpost-control --example bench-node-scan -- [NODES] [ROUNDS]
//!
//! Prints a table: median and best milliseconds per listing, for a selector that matches no
//! node and one that matches a tenth of them.

use std::time::Instant;

use outpost_control::store::{NodeFilter, OrgRecord, SledStore, StateStore, TokenRecord};
use outpost_protocol::{Announce, Heartbeat, Inventory, Labels, NodeInfo, Org, PublicKey, Selector};

fn node(i: usize) -> NodeInfo {
    NodeInfo {
        node_id: format!("node-{i:08}"),
        org_id: "org-bench".into(),
        hostname: format!("host-{i}"),
        enrolled_unix_ms: 1,
        cert_sha256: "c".repeat(64),
        last_seen_unix_ms: Some(1),
        last_heartbeat: None,
        enrolled_announce: Some(Announce::this_build()),
        operator_labels: Labels::new(),
        labels: Labels::new(),
        online: false,
        revoked_unix_ms: None,
        previous_cert_sha256: None,
    }
}

fn heartbeat(i: usize) -> Heartbeat {
    let mut labels = Labels::new();
    labels.insert("site".into(), if i.is_multiple_of(10) { "icu".into() } else { "lab".into() });
    Heartbeat {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        inventory: Inventory { hostname: format!("host-{i}"), cpu_count: 16, ..Inventory::default() },
        running_jobs: 0,
        outbox_depth: 0,
        relay: None,
        models: Vec::new(),
        labels,
        announce: Some(Announce::this_build()),
        awaiting_approval: Vec::new(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let nodes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(15);
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    store
        .insert_org(OrgRecord {
            org: Org {
                id: "org-bench".into(),
                name: "bench".into(),
                signing_key: PublicKey { key_id: "k".into(), ed25519_hex: "00".repeat(32) },
                created_unix_ms: 1,
            },
            signing_secret_hex: "11".repeat(32),
            settings: Default::default(),
            keys: Default::default(),
        })
        .await?;
    let t0 = Instant::now();
    for i in 0..nodes {
        let token = format!("t{i}");
        store
            .insert_token(TokenRecord {
                token_sha256: token.clone(),
                org_id: "org-bench".into(),
                expires_unix_ms: u64::MAX,
                used_unix_ms: None,
                used_by_node: None,
            })
            .await?;
        if let Err(refused) = store.enroll_node(&token, 2, node(i)).await? {
            anyhow::bail!("token {token} refused: {refused:?}");
        }
        store.record_heartbeat(&format!("node-{i:08}"), heartbeat(i), Some(3)).await?;
    }
    eprintln!("bench-node-scan: {nodes} nodes stored in {:.1} s", t0.elapsed().as_secs_f64());

    println!(
        "| selector | matches | decode all, filter (median / best ms) | scan: find_nodes (median / best ms) | label index: find_nodes (median / best ms) |"
    );
    println!("|---|---|---|---|---|");
    for text in ["bench=none", "site=icu"] {
        let selector = Selector::parse(text)?;
        let (mut before, mut now, mut indexed) = (Vec::new(), Vec::new(), Vec::new());
        let mut counts = (0, 0, 0);
        let (key, value) = text.split_once('=').unwrap_or_default();
        let label = Some((key.to_owned(), value.to_owned()));
        for _ in 0..rounds {
            let t = Instant::now();
            let found: Vec<NodeInfo> = store
                .list_nodes()
                .await?
                .into_iter()
                .filter(|n| selector.matches(&n.effective_labels()))
                .collect();
            before.push(t.elapsed().as_secs_f64() * 1e3);
            counts.0 = found.len();

            let s = selector.clone();
            let keep: NodeFilter = Box::new(move |_, labels| s.matches(labels));
            let t = Instant::now();
            let found = store.find_nodes(None, None, None, keep, usize::MAX).await?;
            now.push(t.elapsed().as_secs_f64() * 1e3);
            counts.1 = found.len();

            let s = selector.clone();
            let keep: NodeFilter = Box::new(move |_, labels| s.matches(labels));
            let t = Instant::now();
            let found = store.find_nodes(None, None, label.clone(), keep, usize::MAX).await?;
            indexed.push(t.elapsed().as_secs_f64() * 1e3);
            counts.2 = found.len();
        }
        anyhow::ensure!(
            counts.0 == counts.1 && counts.1 == counts.2,
            "every way must find the same nodes: {counts:?}"
        );
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "| `{text}` | {} of {nodes} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} / {:.2} |",
            counts.0,
            median(before.clone()),
            best(&before),
            median(now.clone()),
            best(&now),
            median(indexed.clone()),
            best(&indexed)
        );
    }
    Ok(())
}
