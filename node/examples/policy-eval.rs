//! Times the site policy's gate on its own: `Policy::evaluate` of a job against a policy with an
//! image allowlist, per-image rules, input prefixes, submitters and ceilings, many times over.
//! `scripts/bench-dispatch` prints the figure beside the dispatch latency it adds to.
//!
//! Usage: cargo run --release --example policy-eval [-- ITERATIONS]

#![allow(clippy::expect_used)]

use std::time::Instant;

use outpost_node::policy::{Policy, Work};

fn main() {
    let n: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let digest = format!("sha256:{}", "a".repeat(64));
    let mut images = String::new();
    for i in 0..50 {
        images.push_str(&format!("{{ digest = \"sha256:{:064x}\", name = \"tool {i}\" }}, ", i + 1));
    }
    let text = format!(
        "images = [ {images}{{ digest = \"{digest}\", name = \"bench\", kinds = [\"container\"], input_prefixes = [\"scans/\"] }} ]\n\
         kinds = [\"container\", \"generate\", \"embed\", \"service\"]\nrelaxations = []\n\
         input_prefixes = [\"scans/\", \"notes/\"]\nsubmitters = [\"role:owner\", \"role:operator\"]\n\
         max_memory_mb = 16384\nmax_cpu_millis = 8000\nmax_timeout_secs = 86400\n"
    );
    let policy: Policy = toml::from_str(&text).expect("a valid policy");
    policy.validate().expect("a valid policy");
    let spec: outpost_protocol::JobSpec = serde_json::from_value(serde_json::json!({
        "image": digest, "command": ["sh", "-c", "echo bench"], "inputs": ["scans/2026/a.dcm", "scans/2026/b.dcm"],
    }))
    .expect("spec");
    let submitter = outpost_protocol::Submitter {
        org_id: "org".into(),
        name: Some("admin".into()),
        role: Some("owner".into()),
        deployment: None,
        trigger: None,
        local_trigger: None,
    };
    let started = Instant::now();
    let mut allowed = 0u32;
    for _ in 0..n {
        // As the intake does for every job: describe it, then ask the policy.
        let work = Work::job(std::hint::black_box(&spec), Some(submitter.clone()));
        if policy.evaluate(&work, false) == outpost_node::policy::Decision::Allow {
            allowed += 1;
        }
    }
    let ns = started.elapsed().as_nanos() as f64 / f64::from(n);
    assert_eq!(allowed, n, "the bench job is allowed");
    println!("{{\"policy_eval_ns\": {ns:.1}, \"iterations\": {n}}}");
}
