//! The contract every `StateStore` adapter keeps, run against each of them.

use outpost_protocol::{
    ContainerSpec, JobInfo, JobState, NodeInfo, Org, Outcome, PublicKey, ResultReport, SignedEnvelope,
    Timings,
};

use super::{
    JobFilter, JobRecord, MemoryStore, OrgRecord, ResultOutcome, SledStore, StateStore, TokenRecord,
    TokenRefusal,
};

fn org(id: &str) -> OrgRecord {
    OrgRecord {
        org: Org {
            id: id.into(),
            name: id.into(),
            signing_key: PublicKey { key_id: "k".into(), ed25519_hex: "00".repeat(32) },
            created_unix_ms: 1,
        },
        signing_secret_hex: "11".repeat(32),
    }
}

fn node(id: &str, org_id: &str) -> NodeInfo {
    NodeInfo {
        node_id: id.into(),
        org_id: org_id.into(),
        hostname: "h".into(),
        enrolled_unix_ms: 1,
        cert_sha256: "c".into(),
        last_seen_unix_ms: None,
        last_heartbeat: None,
    }
}

fn job(id: &str, node_id: &str, seq: u64) -> JobRecord {
    let spec: ContainerSpec =
        serde_json::from_value(serde_json::json!({ "image": format!("sha256:{}", "a".repeat(64)) }))
            .expect("spec");
    JobRecord {
        info: JobInfo {
            job_id: id.into(),
            attempt: 1,
            org_id: "o".into(),
            node_id: node_id.into(),
            seq,
            state: JobState::Queued,
            spec,
            submitted_unix_ms: seq,
            accepted_unix_ms: None,
            result: None,
        },
        envelope: SignedEnvelope { payload: "{}".into(), key_id: "k".into(), signature_hex: String::new() },
    }
}

fn result(job_id: &str) -> ResultReport {
    ResultReport {
        job_id: job_id.into(),
        attempt: 1,
        idempotency_key: ResultReport::key_for(job_id, 1),
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        error: None,
        stdout_tail: "out".into(),
        stderr_tail: String::new(),
        output_truncated: false,
        timings: Timings::default(),
        outputs: Vec::new(),
        egress_denied: Vec::new(),
    }
}

async fn tokens_are_one_time_and_expire(s: &dyn StateStore) {
    s.insert_org(org("o")).await.expect("org");
    let t = TokenRecord {
        token_sha256: "t1".into(),
        org_id: "o".into(),
        expires_unix_ms: 100,
        used_unix_ms: None,
        used_by_node: None,
    };
    s.insert_token(t.clone()).await.expect("token");
    s.insert_token(TokenRecord { token_sha256: "t2".into(), ..t }).await.expect("token");
    assert_eq!(s.enroll_node("t1", 50, node("n1", "o")).await.expect("enroll"), Ok(()));
    assert_eq!(s.enroll_node("t1", 60, node("n2", "o")).await.expect("enroll"), Err(TokenRefusal::Used));
    assert_eq!(s.enroll_node("t2", 100, node("n3", "o")).await.expect("enroll"), Err(TokenRefusal::Expired));
    assert_eq!(s.enroll_node("nope", 1, node("n4", "o")).await.expect("enroll"), Err(TokenRefusal::Unknown));
    assert!(s.get_node("n1").await.expect("get").is_some());
    assert!(s.get_node("n2").await.expect("get").is_none(), "a refused enrollment registers nothing");
}

async fn queued_jobs_are_offered_until_acknowledged(s: &dyn StateStore) {
    assert_eq!(s.next_job_seq("n1").await.expect("seq"), 1);
    assert_eq!(s.next_job_seq("n1").await.expect("seq"), 2);
    assert_eq!(s.next_job_seq("n2").await.expect("seq"), 1);
    s.insert_job(job("j1", "n1", 1)).await.expect("insert");
    s.insert_job(job("j2", "n1", 2)).await.expect("insert");
    s.insert_job(job("j3", "n2", 1)).await.expect("insert");
    let q: Vec<String> =
        s.queued_jobs("n1", 10).await.expect("queued").into_iter().map(|j| j.info.job_id).collect();
    assert_eq!(q, ["j1", "j2"], "in sequence order, only this node's");
    s.ack_jobs("n2", vec!["j1".into()], 5).await.expect("ack by the wrong node is ignored");
    assert_eq!(s.queued_jobs("n1", 10).await.expect("queued").len(), 2);
    s.ack_jobs("n1", vec!["j1".into()], 5).await.expect("ack");
    let q = s.queued_jobs("n1", 10).await.expect("queued");
    assert_eq!(q.len(), 1);
    assert_eq!(s.get_job("j1").await.expect("get").expect("j1").info.state, JobState::Accepted);
    let listed =
        s.list_jobs(JobFilter { node_id: Some("n1".into()), state: None, limit: 10 }).await.expect("list");
    assert_eq!(listed.len(), 2);
}

async fn results_are_stored_once(s: &dyn StateStore) {
    s.insert_job(job("r1", "n1", 9)).await.expect("insert");
    assert_eq!(s.store_result("n1", result("r1")).await.expect("store"), ResultOutcome::Stored);
    let mut again = result("r1");
    again.stdout_tail = "different".into();
    assert_eq!(s.store_result("n1", again).await.expect("store"), ResultOutcome::Duplicate);
    let stored = s.get_job("r1").await.expect("get").expect("r1");
    assert_eq!(stored.info.state, JobState::Finished);
    assert_eq!(stored.info.result.expect("result").stdout_tail, "out", "the first report wins");
    assert_eq!(s.store_result("n2", result("r1")).await.expect("store"), ResultOutcome::NotYours);
    assert_eq!(s.store_result("n1", result("missing")).await.expect("store"), ResultOutcome::NotYours);
    assert!(s.queued_jobs("n1", 10).await.expect("queued").iter().all(|j| j.info.job_id != "r1"));
}

async fn audit_is_ordered(s: &dyn StateStore) {
    let a = s.append_audit("operator", "x.one", "1", 1).await.expect("audit");
    let b = s.append_audit("operator", "x.two", "2", 2).await.expect("audit");
    assert_eq!(b.seq, a.seq + 1);
    let list = s.list_audit(2).await.expect("list");
    assert_eq!(list.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["x.one", "x.two"]);
}

async fn contract(s: &dyn StateStore) {
    tokens_are_one_time_and_expire(s).await;
    queued_jobs_are_offered_until_acknowledged(s).await;
    results_are_stored_once(s).await;
    audit_is_ordered(s).await;
}

#[tokio::test]
async fn the_memory_store_keeps_the_contract() {
    contract(&MemoryStore::new()).await;
}

#[tokio::test]
async fn the_sled_store_keeps_the_contract() {
    contract(&SledStore::temporary().expect("sled")).await;
}

#[tokio::test]
async fn the_sled_store_keeps_everything_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = SledStore::open(dir.path()).expect("open");
        contract(&s).await;
    }
    let s = SledStore::open(dir.path()).expect("reopen");
    assert!(s.get_node("n1").await.expect("get").is_some());
    assert_eq!(s.next_job_seq("n1").await.expect("seq"), 3, "sequence numbers never repeat");
    assert_eq!(s.get_job("r1").await.expect("get").expect("r1").info.state, JobState::Finished);
    assert_eq!(s.list_audit(10).await.expect("audit").len(), 2);
}
