//! The contract every `StateStore` adapter keeps, run against each of them.

use outpost_protocol::{
    ApiTokenInfo, ContainerSpec, EventMatch, JobInfo, JobState, NodeInfo, ObjectEvent, Org, Outcome,
    Placement, PublicKey, ResultReport, Role, SignedEnvelope, Timings, Trigger,
};

use super::{
    ApiTokenRecord, CancelOutcome, EventFilter, EventOrder, JobFilter, JobRecord, MemoryStore, OrgRecord,
    ResultOutcome, SeqGap, SledStore, StateStore, StoreError, TokenRecord, TokenRefusal, next_attempt,
};

pub(super) fn org(id: &str) -> OrgRecord {
    OrgRecord {
        org: Org {
            id: id.into(),
            name: id.into(),
            signing_key: PublicKey { key_id: "k".into(), ed25519_hex: "00".repeat(32) },
            created_unix_ms: 1,
        },
        signing_secret_hex: "11".repeat(32),
        settings: Default::default(),
        keys: Default::default(),
    }
}

async fn org_settings_change_one_revision_at_a_time(s: &dyn StateStore) {
    use outpost_protocol::OrgSettings;
    s.insert_org(org("settings-org")).await.unwrap();
    let first = OrgSettings {
        revision: 1,
        default_profile: Some("hybrid".into()),
        features_off: vec!["inference".into()],
        updated_unix_ms: 5,
    };
    assert!(s.put_org_settings("settings-org", first.clone()).await.unwrap());
    assert_eq!(s.get_org("settings-org").await.unwrap().unwrap().settings, first);
    // Another writer that read revision 0 loses; so does a replay of revision 1.
    assert!(!s.put_org_settings("settings-org", first.clone()).await.unwrap());
    let skipped = OrgSettings { revision: 3, ..first.clone() };
    assert!(!s.put_org_settings("settings-org", skipped).await.unwrap());
    let second = OrgSettings { revision: 2, default_profile: None, ..first.clone() };
    assert!(s.put_org_settings("settings-org", second.clone()).await.unwrap());
    assert_eq!(s.get_org("settings-org").await.unwrap().unwrap().settings, second);
    assert!(matches!(s.put_org_settings("no-such-org", first).await, Err(StoreError::NotFound(_))));
}

pub(super) fn node(id: &str, org_id: &str) -> NodeInfo {
    NodeInfo {
        node_id: id.into(),
        org_id: org_id.into(),
        hostname: "h".into(),
        enrolled_unix_ms: 1,
        cert_sha256: "c".into(),
        last_seen_unix_ms: None,
        last_heartbeat: None,
        enrolled_announce: None,
        operator_labels: Default::default(),
        labels: Default::default(),
        online: false,
        revoked_unix_ms: None,
        previous_cert_sha256: None,
    }
}

pub(super) fn job(id: &str, node_id: &str, seq: u64) -> JobRecord {
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
            spec: spec.into(),
            submitted_unix_ms: seq,
            accepted_unix_ms: None,
            result: None,
            group_id: None,
            selector: None,
            placement: None,
            superseded: Vec::new(),
            cancel_requested_unix_ms: None,
            awaiting_site_approval_since_unix_ms: None,
        },
        envelope: SignedEnvelope { payload: "{}".into(), key_id: "k".into(), signature_hex: String::new() },
    }
}

pub(super) fn result(job_id: &str) -> ResultReport {
    attempt_result(job_id, 1)
}

fn attempt_result(job_id: &str, attempt: u32) -> ResultReport {
    ResultReport {
        job_id: job_id.into(),
        attempt,
        idempotency_key: ResultReport::key_for(job_id, attempt),
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        error: None,
        stdout_tail: "out".into(),
        stderr_tail: String::new(),
        output_truncated: false,
        timings: Timings::default(),
        outputs: Vec::new(),
        egress_denied: Vec::new(),
        inference: None,
        sealed: None,
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
    let listed = s
        .list_jobs(JobFilter { node_id: Some("n1".into()), limit: 10, ..Default::default() })
        .await
        .expect("list");
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

/// What a job prints or a node reports may hold any character, NUL included: stored and read
/// back as it was.
async fn any_text_is_kept_as_it_was(s: &dyn StateStore) {
    s.insert_job(job("nul1", "n1", 90)).await.expect("insert");
    let mut report = result("nul1");
    report.stdout_tail = "before\0after \u{1}\u{7f} ünï".into();
    assert_eq!(s.store_result("n1", report.clone()).await.expect("store"), ResultOutcome::Stored);
    let kept = s.get_job("nul1").await.expect("get").expect("nul1").info.result.expect("result");
    assert_eq!(kept.stdout_tail, report.stdout_tail);
    let mut labels = outpost_protocol::Labels::new();
    labels.insert("odd".into(), "a\0b".into());
    s.update_node_labels("n1", labels, Vec::new()).await.expect("labels");
    assert_eq!(
        s.get_node("n1").await.expect("get").expect("n1").operator_labels.get("odd").map(String::as_str),
        Some("a\0b")
    );
}

async fn audit_is_ordered(s: &dyn StateStore) {
    let a = s.append_audit("owner", Some("oa"), "x.one", "1", 1).await.expect("audit");
    let b = s.append_audit("owner", None, "x.two", "2", 2).await.expect("audit");
    assert_eq!(b.seq, a.seq + 1);
    let list = s.list_audit(None, 2).await.expect("list");
    assert_eq!(list.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["x.one", "x.two"]);
    s.append_audit("token:t@ob", Some("ob"), "x.three", "3", 3).await.expect("audit");
    let of_a = s.list_audit(Some("oa"), 10).await.expect("list");
    assert_eq!(
        of_a.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["x.one"],
        "one org's entries only"
    );
    assert_eq!(of_a[0].org_id.as_deref(), Some("oa"));
}

fn api_token(id: &str, org_id: &str, name: &str, created: u64) -> ApiTokenRecord {
    ApiTokenRecord {
        info: ApiTokenInfo {
            id: id.into(),
            name: name.into(),
            org_id: org_id.into(),
            role: Role::Operator,
            created_unix_ms: created,
            expires_unix_ms: created + 1000,
            created_by: "owner".into(),
            revoked_unix_ms: None,
        },
        secret_sha256: "ab".repeat(32),
    }
}

async fn api_token_names_are_unique_until_revoked(s: &dyn StateStore) {
    s.insert_api_token(api_token("tok-1", "ta", "ci", 1)).await.expect("insert");
    s.insert_api_token(api_token("tok-2", "tb", "ci", 2)).await.expect("the same name in another org");
    assert!(matches!(
        s.insert_api_token(api_token("tok-3", "ta", "ci", 3)).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.insert_api_token(api_token("tok-1", "ta", "other", 3)).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let revoked = s.revoke_api_token("tok-1", 50).await.expect("revoke").expect("tok-1");
    assert_eq!(revoked.revoked_unix_ms, Some(50));
    let again = s.revoke_api_token("tok-1", 60).await.expect("revoke").expect("tok-1");
    assert_eq!(again.revoked_unix_ms, Some(50), "the first revocation time stays");
    assert!(s.revoke_api_token("tok-none", 60).await.expect("revoke").is_none());
    s.insert_api_token(api_token("tok-3", "ta", "ci", 3)).await.expect("the name is free again");
    let listed = s.list_api_tokens("ta").await.expect("list");
    assert_eq!(listed.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["tok-1", "tok-3"]);
    let stored = s.get_api_token("tok-1").await.expect("get").expect("tok-1");
    assert_eq!(stored.secret_sha256, "ab".repeat(32));
    assert_eq!(stored.info.revoked_unix_ms, Some(50));
}

pub(super) fn event(seq: u64, key: &str) -> ObjectEvent {
    ObjectEvent {
        seq,
        watch: "w".into(),
        bucket: "b".into(),
        key: key.into(),
        size: 1,
        etag: "e".into(),
        sha256: None,
        content_type: None,
        accepted: true,
        reason: None,
        replaces_etag: None,
        observed_unix_ms: 1,
        fields: Default::default(),
        fields_denied: Vec::new(),
    }
}

fn by_seq(node_id: &str, after_seq: u64) -> EventFilter {
    EventFilter {
        org_id: None,
        order: EventOrder::BySeq { node_id: node_id.into(), after_seq },
        newest: false,
        limit: 100,
    }
}

fn by_cursor(node_id: Option<&str>, after_cursor: u64) -> EventFilter {
    EventFilter {
        org_id: None,
        order: EventOrder::ByCursor { node_id: node_id.map(Into::into), after_cursor },
        newest: false,
        limit: 100,
    }
}

fn seqs(events: &[outpost_protocol::StoredEvent]) -> Vec<u64> {
    events.iter().map(|e| e.event.seq).collect()
}

async fn events_are_stored_once_per_node_and_seq(s: &dyn StateStore) {
    let first = s.store_events("n1", "o", vec![event(1, "a"), event(2, "b")], 10).await.expect("store");
    assert_eq!((first.stored, first.duplicates, first.up_to_seq), (2, 0, 2));
    assert!(first.gaps.is_empty());
    let again = s.store_events("n1", "o", vec![event(2, "changed"), event(3, "c")], 11).await.expect("store");
    assert_eq!((again.stored, again.duplicates, again.up_to_seq), (1, 1, 3));
    // Another node's seq 1 is its own.
    let other = s.store_events("n2", "o2", vec![event(1, "x")], 12).await.expect("store");
    assert_eq!((other.stored, other.duplicates), (1, 0));
    // A gap is reported and still stored; filling it later is not a duplicate.
    let gap = s.store_events("n1", "o", vec![event(6, "f")], 13).await.expect("store");
    assert_eq!(gap.gaps, [SeqGap { after: 3, seq: 6 }]);
    let fill = s.store_events("n1", "o", vec![event(4, "d"), event(5, "e")], 14).await.expect("store");
    assert_eq!((fill.stored, fill.duplicates, fill.up_to_seq), (2, 0, 5));
    assert!(fill.gaps.is_empty());

    let n1 = s.list_events(by_seq("n1", 0)).await.expect("list");
    assert_eq!(seqs(&n1), [1, 2, 3, 4, 5, 6], "per node in seq order");
    assert_eq!(n1[1].event.key, "b", "a resent event does not replace the stored one");
    assert_eq!(n1[1].received_unix_ms, 10);
    assert_eq!(seqs(&s.list_events(by_seq("n1", 4)).await.expect("list")), [5, 6]);

    let all = s.list_events(by_cursor(None, 0)).await.expect("list");
    let arrival: Vec<(&str, u64)> = all.iter().map(|e| (e.node_id.as_str(), e.event.seq)).collect();
    assert_eq!(arrival, [("n1", 1), ("n1", 2), ("n1", 3), ("n2", 1), ("n1", 6), ("n1", 4), ("n1", 5)]);
    let cursors: Vec<u64> = all.iter().map(|e| e.cursor).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "cursors increase: {cursors:?}");
    let after = s.list_events(by_cursor(None, all[3].cursor)).await.expect("list");
    assert_eq!(seqs(&after), [6, 4, 5]);
    let only_n2 = s.list_events(by_cursor(Some("n2"), 0)).await.expect("list");
    assert_eq!(only_n2.len(), 1);
    assert_eq!(only_n2[0].org_id, "o2");
    let mut org = by_cursor(None, 0);
    org.org_id = Some("o2".into());
    assert_eq!(s.list_events(org).await.expect("list").len(), 1);

    let mut limited = by_seq("n1", 0);
    limited.limit = 2;
    assert_eq!(seqs(&s.list_events(limited.clone()).await.expect("list")), [1, 2]);
    limited.newest = true;
    assert_eq!(seqs(&s.list_events(limited).await.expect("list")), [5, 6], "the newest, in order");
    let mut newest = by_cursor(None, 0);
    newest.newest = true;
    newest.limit = 1;
    assert_eq!(seqs(&s.list_events(newest).await.expect("list")), [5]);
}

async fn triggered_jobs_are_recorded_once(s: &dyn StateStore) {
    s.add_triggered_job("n1", 2, "trg-1").await.expect("add");
    s.add_triggered_job("n1", 2, "trg-1").await.expect("add again");
    s.add_triggered_job("n1", 2, "trg-2").await.expect("add");
    let listed = s.list_events(by_seq("n1", 1)).await.expect("list");
    assert_eq!(listed[0].triggered_jobs, ["trg-1", "trg-2"]);
    assert!(listed[1].triggered_jobs.is_empty());
    assert!(matches!(s.add_triggered_job("n1", 99, "trg-3").await, Err(StoreError::NotFound(_))));
}

fn trigger(id: &str, org_id: &str, name: &str, created: u64) -> Trigger {
    Trigger {
        trigger_id: id.into(),
        org_id: org_id.into(),
        name: name.into(),
        on: EventMatch { key_prefix: "in/".into(), ..EventMatch::default() },
        job: job("t", "n1", 1).info.spec.container().cloned().expect("a container job"),
        expires_in_secs: None,
        created_unix_ms: created,
    }
}

async fn trigger_names_are_unique_per_org(s: &dyn StateStore) {
    s.insert_trigger(trigger("t1", "o", "resize", 1)).await.expect("insert");
    s.insert_trigger(trigger("t2", "o2", "resize", 2)).await.expect("same name, other org");
    s.insert_trigger(trigger("t3", "o", "thumbs", 3)).await.expect("insert");
    let dup = s.insert_trigger(trigger("t4", "o", "resize", 4)).await;
    assert!(matches!(dup, Err(StoreError::AlreadyExists(_))), "{dup:?}");
    let dup_id = s.insert_trigger(trigger("t1", "o", "other", 4)).await;
    assert!(matches!(dup_id, Err(StoreError::AlreadyExists(_))), "{dup_id:?}");

    let ids = |ts: Vec<Trigger>| ts.into_iter().map(|t| t.trigger_id).collect::<Vec<_>>();
    assert_eq!(ids(s.list_triggers(Some("o")).await.expect("list")), ["t1", "t3"]);
    assert_eq!(ids(s.list_triggers(None).await.expect("list")), ["t1", "t2", "t3"]);
    assert_eq!(s.get_trigger("t2").await.expect("get").expect("t2").org_id, "o2");
    assert!(s.delete_trigger("t1").await.expect("delete"));
    assert!(!s.delete_trigger("t1").await.expect("delete again"));
    assert!(s.get_trigger("t1").await.expect("get").is_none());
    s.insert_trigger(trigger("t5", "o", "resize", 5)).await.expect("the name is free again");
}

async fn operator_labels_are_set_and_removed(s: &dyn StateStore) {
    s.insert_token(TokenRecord {
        token_sha256: "t-labels".into(),
        org_id: "o".into(),
        expires_unix_ms: u64::MAX,
        used_unix_ms: None,
        used_by_node: None,
    })
    .await
    .expect("token");
    s.enroll_node("t-labels", 1, node("nl", "o")).await.expect("enroll").expect("enrolled");
    let set = [("site".to_owned(), "icu".to_owned()), ("rack".to_owned(), "2".to_owned())].into();
    let n = s.update_node_labels("nl", set, vec![]).await.expect("label");
    assert_eq!(n.operator_labels.len(), 2);
    let n = s.update_node_labels("nl", Default::default(), vec!["rack".into()]).await.expect("unlabel");
    assert_eq!(n.operator_labels.keys().collect::<Vec<_>>(), ["site"]);
    assert_eq!(s.get_node("nl").await.expect("get").expect("nl").operator_labels, n.operator_labels);
    assert!(matches!(
        s.update_node_labels("nobody", Default::default(), vec![]).await,
        Err(StoreError::NotFound(_))
    ));
}

pub(super) fn any_job(id: &str, node_id: &str, seq: u64) -> JobRecord {
    let mut j = job(id, node_id, seq);
    j.info.placement = Some(Placement::Any);
    j.info.selector = Some("site=icu".into());
    j
}

async fn a_reassigned_job_fences_its_old_attempt(s: &dyn StateStore) {
    s.insert_job(any_job("h1", "na", 1)).await.expect("insert");
    s.ack_jobs("na", vec!["h1".into()], 2).await.expect("ack");
    assert_eq!(s.open_any_jobs().await.expect("open").len(), 1);
    let old = s.get_job("h1").await.expect("get").expect("h1");
    let next = next_attempt(&old, old.envelope.clone(), "nb", 1, 3, "node na silent");
    assert!(s.reassign_job("h1", 1, next.clone()).await.expect("reassign"));
    assert!(!s.reassign_job("h1", 1, next).await.expect("reassign again"), "the attempt moved on already");
    let moved = s.get_job("h1").await.expect("get").expect("h1");
    assert_eq!(
        (moved.info.attempt, moved.info.node_id.as_str(), moved.info.state),
        (2, "nb", JobState::Queued)
    );
    assert_eq!(s.queued_jobs("nb", 10).await.expect("queued").len(), 1, "offered to the new node");
    let stops = s.pending_cancels("na", 10).await.expect("cancels");
    assert_eq!((stops.len(), stops[0].attempt), (1, 1), "the old node is asked to stop attempt 1");
    // The old node's late result is kept with its attempt, never counted.
    assert_eq!(s.store_result("na", attempt_result("h1", 1)).await.expect("late"), ResultOutcome::Superseded);
    assert_eq!(s.store_result("na", attempt_result("h1", 1)).await.expect("late"), ResultOutcome::Duplicate);
    assert!(s.pending_cancels("na", 10).await.expect("cancels").is_empty(), "answered");
    let job = s.get_job("h1").await.expect("get").expect("h1");
    assert_eq!(job.info.state, JobState::Queued);
    assert!(job.info.result.is_none());
    assert!(job.info.superseded[0].late_result.is_some());
    assert_eq!(s.store_result("na", attempt_result("h1", 2)).await.expect("store"), ResultOutcome::NotYours);
    assert_eq!(s.store_result("nb", attempt_result("h1", 2)).await.expect("store"), ResultOutcome::Stored);
    assert_eq!(s.get_job("h1").await.expect("get").expect("h1").info.state, JobState::Finished);
    assert!(s.open_any_jobs().await.expect("open").is_empty(), "a finished job is no longer swept");
    assert!(s.queued_jobs("nb", 10).await.expect("queued").is_empty());
}

async fn cancels_end_queued_jobs_and_ask_nodes_for_the_rest(s: &dyn StateStore) {
    s.insert_job(any_job("c1", "nc", 1)).await.expect("insert");
    s.insert_job(job("c2", "nc", 2)).await.expect("insert");
    s.ack_jobs("nc", vec!["c2".into()], 3).await.expect("ack");
    assert_eq!(s.cancel_job("c1", 4).await.expect("cancel"), CancelOutcome::Cancelled);
    assert_eq!(s.get_job("c1").await.expect("get").expect("c1").info.state, JobState::Cancelled);
    assert!(s.queued_jobs("nc", 10).await.expect("queued").is_empty(), "never offered again");
    assert!(s.open_any_jobs().await.expect("open").is_empty());
    assert_eq!(s.cancel_job("c2", 5).await.expect("cancel"), CancelOutcome::Requested);
    assert_eq!(
        s.cancel_job("c2", 6).await.expect("cancel"),
        CancelOutcome::Requested,
        "asking twice is harmless"
    );
    let stops = s.pending_cancels("nc", 10).await.expect("cancels");
    assert_eq!(stops.len(), 2, "the node may have taken c1 without acknowledging it yet: {stops:?}");
    let mut cancelled = result("c2");
    cancelled.outcome = Outcome::Cancelled;
    assert_eq!(s.store_result("nc", cancelled).await.expect("store"), ResultOutcome::Stored);
    let c2 = s.get_job("c2").await.expect("get").expect("c2");
    assert_eq!((c2.info.state, c2.info.cancel_requested_unix_ms), (JobState::Cancelled, Some(5)));
    assert_eq!(s.pending_cancels("nc", 10).await.expect("cancels").len(), 1);
    assert_eq!(
        s.cancel_job("c2", 7).await.expect("cancel"),
        CancelOutcome::AlreadyEnded(JobState::Cancelled)
    );
    assert_eq!(s.cancel_job("missing", 7).await.expect("cancel"), CancelOutcome::NotFound);
    // A cancelled `any` job its node holds is never re-placed, even if its node goes silent.
    s.insert_job(any_job("c3", "nc", 3)).await.expect("insert");
    s.ack_jobs("nc", vec!["c3".into()], 8).await.expect("ack");
    assert_eq!(s.open_any_jobs().await.expect("open").len(), 1);
    assert_eq!(s.cancel_job("c3", 9).await.expect("cancel"), CancelOutcome::Requested);
    assert!(s.open_any_jobs().await.expect("open").is_empty(), "out of the placement sweep");
    let old = s.get_job("c3").await.expect("get").expect("c3");
    let next = next_attempt(&old, old.envelope.clone(), "nd", 1, 10, "silent");
    assert!(!s.reassign_job("c3", 1, next).await.expect("reassign"), "a cancelled job is not moved");
}

pub(super) fn audit_chain(n: u64) -> Vec<outpost_protocol::AuditRecord> {
    let mut out: Vec<outpost_protocol::AuditRecord> = Vec::new();
    for i in 0..n {
        out.push(outpost_protocol::AuditRecord::following(
            out.last(),
            100 + i,
            "job.accepted",
            &format!("job {i}"),
        ));
    }
    out
}

async fn node_audit_logs_only_grow_link_by_link(s: &dyn StateStore) {
    let chain = audit_chain(6);
    let got = s.append_node_audit("na", chain[..3].to_vec()).await.expect("append");
    assert_eq!((got.stored, got.up_to_seq, got.refused), (3, 3, None));
    // Overlapping (entries 2..=4): only entry 4 is new.
    let got = s.append_node_audit("na", chain[1..4].to_vec()).await.expect("append");
    assert_eq!((got.stored, got.up_to_seq, got.refused), (1, 4, None));
    // A gap (entry 6 without 5) stores nothing and says which are missing.
    let got = s.append_node_audit("na", chain[5..].to_vec()).await.expect("append");
    assert_eq!((got.stored, got.up_to_seq), (0, 4));
    assert!(got.refused.as_deref().is_some_and(|w| w.contains("5..5 are missing")), "{got:?}");
    // An edited entry 5 stores nothing either.
    let mut edited = chain[4..].to_vec();
    edited[0].detail = "something else".into();
    let got = s.append_node_audit("na", edited).await.expect("append");
    assert_eq!(got.stored, 0);
    assert!(got.refused.as_deref().is_some_and(|w| w.contains("entry 5 was modified")), "{got:?}");
    // A rewritten copy of a stored entry is found too.
    let mut rewritten = chain[3..5].to_vec();
    rewritten[0].sha256 = "f".repeat(64);
    let got = s.append_node_audit("na", rewritten).await.expect("append");
    assert!(got.refused.as_deref().is_some_and(|w| w.contains("was rewritten")), "{got:?}");
    let got = s.append_node_audit("na", chain[4..].to_vec()).await.expect("append");
    assert_eq!((got.stored, got.up_to_seq, got.refused), (2, 6, None));
    let stored = s.node_audit("na", 0, 100).await.expect("list");
    assert_eq!(stored, chain);
    assert_eq!(s.node_audit("na", 4, 1).await.expect("list"), chain[4..5].to_vec());
    assert!(s.node_audit("other", 0, 100).await.expect("list").is_empty(), "per node");
}

fn listed(org_id: &str, id: &str, node_id: &str, at: u64) -> JobRecord {
    let mut j = job(id, node_id, at);
    j.info.org_id = org_id.into();
    j
}

fn failed_result(job_id: &str) -> ResultReport {
    ResultReport { outcome: Outcome::Failed, exit_code: Some(3), ..result(job_id) }
}

fn ids(jobs: &[JobInfo]) -> Vec<&str> {
    jobs.iter().map(|j| j.job_id.as_str()).collect()
}

fn listing(org_id: Option<&str>, limit: usize) -> JobFilter {
    JobFilter { org_id: org_id.map(str::to_owned), limit, ..Default::default() }
}

/// Pages and counts follow every change of a job (submit, take, result, cancel, a move to
/// another node) and every node enrolled, in two organisations.
async fn listings_follow_every_change(s: &dyn StateStore) {
    for (org_id, token) in [("lo-a", "lt-1"), ("lo-a", "lt-2"), ("lo-b", "lt-3")] {
        if s.get_org(org_id).await.expect("get").is_none() {
            s.insert_org(org(org_id)).await.expect("org");
        }
        let t = TokenRecord {
            token_sha256: token.into(),
            org_id: org_id.into(),
            expires_unix_ms: u64::MAX,
            used_unix_ms: None,
            used_by_node: None,
        };
        s.insert_token(t).await.expect("token");
    }
    let seen = NodeInfo { last_seen_unix_ms: Some(500), ..node("la1", "lo-a") };
    assert_eq!(s.enroll_node("lt-1", 1, seen).await.expect("enroll"), Ok(()));
    assert_eq!(s.enroll_node("lt-2", 1, node("la2", "lo-a")).await.expect("enroll"), Ok(()));
    assert_eq!(s.enroll_node("lt-3", 1, node("lb1", "lo-b")).await.expect("enroll"), Ok(()));

    for (org_id, id, node_id, at) in [
        ("lo-a", "a1", "la1", 1010),
        ("lo-a", "a2", "la1", 1020),
        ("lo-a", "a3", "la2", 1030),
        ("lo-a", "a4", "la2", 1040),
        ("lo-a", "a5", "la1", 1050),
    ] {
        s.insert_job(listed(org_id, id, node_id, at)).await.expect("insert");
    }
    for (id, at) in [("b1", 1025), ("b2", 1035)] {
        let mut j = listed("lo-b", id, "lb1", at);
        j.info.group_id = Some("grp".into());
        s.insert_job(j).await.expect("insert");
    }
    let mut moving = listed("lo-a", "a6", "la1", 1060);
    moving.info.placement = Some(Placement::Any);
    s.insert_job(moving).await.expect("insert");

    s.ack_jobs("la1", vec!["a2".into()], 2000).await.expect("ack");
    s.ack_jobs("la2", vec!["a3".into()], 2000).await.expect("ack");
    assert_eq!(s.store_result("la2", failed_result("a3")).await.expect("store"), ResultOutcome::Stored);
    assert_eq!(s.store_result("la2", result("a4")).await.expect("store"), ResultOutcome::Stored);
    assert_eq!(s.store_result("lb1", failed_result("b2")).await.expect("store"), ResultOutcome::Stored);
    assert_eq!(s.cancel_job("a5", 2100).await.expect("cancel"), CancelOutcome::Cancelled);
    let old = s.get_job("a6").await.expect("get").expect("a6");
    let next = next_attempt(&old, old.envelope.clone(), "la2", 1, 2200, "la1 silent");
    assert!(s.reassign_job("a6", 1, next).await.expect("reassign"));

    let list = |f: JobFilter| async move { s.list_jobs(f).await.expect("list") };
    assert_eq!(
        ids(&list(listing(Some("lo-a"), 10)).await),
        ["a6", "a5", "a4", "a3", "a2", "a1"],
        "newest first"
    );
    assert_eq!(ids(&list(listing(Some("lo-a"), 2)).await), ["a6", "a5"]);
    let by_node = |n: &str| JobFilter { node_id: Some(n.into()), ..listing(None, 10) };
    assert_eq!(ids(&list(by_node("la1")).await), ["a5", "a2", "a1"], "a6 moved away");
    assert_eq!(ids(&list(by_node("la2")).await), ["a6", "a4", "a3"]);
    let in_org = |org: &str, n: &str| JobFilter { org_id: Some(org.into()), ..by_node(n) };
    assert!(list(in_org("lo-b", "la1")).await.is_empty(), "a node's jobs stay in its organisation");
    let by_state = |org: Option<&str>, st: JobState| JobFilter { state: Some(st), ..listing(org, 10) };
    assert_eq!(ids(&list(by_state(Some("lo-a"), JobState::Finished)).await), ["a4", "a3"]);
    assert_eq!(ids(&list(by_state(Some("lo-a"), JobState::Queued)).await), ["a6", "a1"]);
    assert_eq!(ids(&list(by_state(Some("lo-a"), JobState::Accepted)).await), ["a2"]);
    assert_eq!(ids(&list(by_state(Some("lo-b"), JobState::Cancelled)).await), Vec::<&str>::new());
    let everywhere = list(by_state(None, JobState::Cancelled)).await;
    assert!(ids(&everywhere).contains(&"a5"));
    assert!(everywhere.iter().all(|j| j.state == JobState::Cancelled));
    let failed = |org: Option<&str>| JobFilter { failed: true, ..listing(org, 10) };
    assert_eq!(ids(&list(failed(Some("lo-a"))).await), ["a3"], "a success is not a failure");
    let all_failed = list(failed(None)).await;
    let mine: Vec<&str> = ids(&all_failed).into_iter().filter(|id| ["a3", "b2"].contains(id)).collect();
    assert_eq!(mine, ["b2", "a3"]);
    let group = JobFilter { group_id: Some("grp".into()), ..listing(None, 10) };
    assert_eq!(ids(&list(group).await), ["b2", "b1"]);

    let counts = s.job_counts(Some("lo-a")).await.expect("counts");
    assert_eq!(
        (counts.queued, counts.accepted, counts.finished, counts.cancelled),
        (2, 1, 2, 1),
        "a1 and a6 queued, a2 running, a3 and a4 finished, a5 cancelled"
    );
    let counts = s.job_counts(Some("lo-b")).await.expect("counts");
    assert_eq!((counts.queued, counts.finished, counts.total()), (1, 1, 2));
    let all = s.job_counts(None).await.expect("counts");
    assert_eq!(all.total() as usize, list(listing(None, usize::MAX)).await.len(), "every job counted once");
    for st in [JobState::Queued, JobState::Accepted, JobState::Finished, JobState::Cancelled] {
        let every = JobFilter { state: Some(st), ..listing(None, usize::MAX) };
        assert_eq!(all.of(st) as usize, list(every).await.len(), "{st:?} counted as listed");
    }

    let page = |org: Option<&'static str>, offset: usize, limit: usize| async move {
        let nodes = s.page_nodes(org, offset, limit).await.expect("page");
        nodes.into_iter().map(|n| n.node_id).collect::<Vec<_>>()
    };
    assert_eq!(page(Some("lo-a"), 0, 1).await, ["la1"]);
    assert_eq!(page(Some("lo-a"), 1, 5).await, ["la2"]);
    assert!(page(Some("lo-a"), 2, 5).await.is_empty());
    assert_eq!(page(Some("lo-b"), 0, 5).await, ["lb1"]);
    assert!(page(Some("lo"), 0, 5).await.is_empty(), "an org id is not a prefix of another");
    let everyone: Vec<String> = s.list_nodes().await.expect("nodes").into_iter().map(|n| n.node_id).collect();
    assert_eq!(page(None, 0, usize::MAX).await, everyone);
    assert_eq!(page(None, 1, 2).await, everyone[1..3]);
    let presence = s.node_presence(Some("lo-a")).await.expect("presence");
    let presence: Vec<_> = presence.into_iter().map(|p| (p.node_id, p.last_seen_unix_ms)).collect();
    assert_eq!(presence, [("la1".to_owned(), Some(500)), ("la2".to_owned(), None)]);
    s.update_node_labels("la2", [("k".to_owned(), "v".to_owned())].into(), vec![]).await.expect("label");
    // The node's own labels come with its heartbeat, behind a large inventory the filter skips.
    let beat = outpost_protocol::Heartbeat {
        agent_version: "0.1.0".into(),
        inventory: outpost_protocol::Inventory {
            hostname: "h".repeat(4096),
            cpu_count: 2,
            ..outpost_protocol::Inventory::default()
        },
        running_jobs: 0,
        outbox_depth: 0,
        relay: None,
        models: Vec::new(),
        labels: [("k".to_owned(), "own".to_owned()), ("site".to_owned(), "x".to_owned())].into(),
        announce: None,
        awaiting_approval: Vec::new(),
    };
    s.record_heartbeat("la1", beat, Some(600)).await.expect("heartbeat");
    let find = |org: Option<&'static str>, after: Option<String>, k: Option<&'static str>, limit: usize| async move {
        let keep = move || -> crate::store::NodeFilter {
            Box::new(move |_, labels| k.is_none_or(|v| labels.get("k").map(String::as_str) == Some(v)))
        };
        let found = s.find_nodes(org, after.as_deref(), None, keep(), limit).await.expect("find");
        let found: Vec<String> = found.into_iter().map(|n| n.node_id).collect();
        // Told the label every match carries, a store may read only those: the same answer.
        let label = k.map(|v| ("k".to_owned(), v.to_owned()));
        let hinted = s.find_nodes(org, after.as_deref(), label, keep(), limit).await.expect("find");
        let hinted: Vec<String> = hinted.into_iter().map(|n| n.node_id).collect();
        assert_eq!(hinted, found, "with the label k={k:?}");
        found
    };
    assert_eq!(find(Some("lo-a"), None, Some("v"), 10).await, ["la2"], "operator labels are matched");
    assert_eq!(
        find(Some("lo-a"), None, Some("own"), 10).await,
        ["la1"],
        "the heartbeat's labels are matched"
    );
    assert_eq!(find(None, None, Some("own"), 10).await, ["la1"]);
    assert_eq!(find(Some("lo-a"), None, None, 10).await, ["la1", "la2"]);
    assert_eq!(find(Some("lo-a"), Some("la1".into()), None, 10).await, ["la2"], "after is exclusive");
    assert_eq!(find(Some("lo-a"), Some("la0".into()), None, 1).await, ["la1"], "after need not be a node");
    assert!(find(Some("lo-a"), Some("la2".into()), None, 10).await.is_empty());
    assert!(find(Some("lo"), None, None, 10).await.is_empty(), "an org id is not a prefix of another");
    assert!(find(None, None, None, 0).await.is_empty());
    assert_eq!(find(None, None, None, usize::MAX).await, everyone, "unfiltered: every node in id order");
    assert_eq!(find(None, Some(everyone[0].clone()), None, 2).await, everyone[1..3]);
    // The operator's label wins over the node's own, in the index too; removed, the own is back.
    s.update_node_labels("la1", [("k".to_owned(), "over".to_owned())].into(), vec![]).await.expect("label");
    assert!(find(None, None, Some("own"), 10).await.is_empty(), "overridden");
    assert_eq!(find(None, None, Some("over"), 10).await, ["la1"]);
    s.update_node_labels("la1", Default::default(), vec!["k".to_owned()]).await.expect("unlabel");
    assert_eq!(find(None, None, Some("own"), 10).await, ["la1"]);
    assert!(find(None, None, Some("over"), 10).await.is_empty(), "no stale index entry");
    // A new heartbeat with other labels replaces the old ones.
    let mut moved = s.get_node("la1").await.expect("get").expect("la1").last_heartbeat.expect("beat");
    moved.labels = [("k".to_owned(), "moved".to_owned())].into();
    s.record_heartbeat("la1", moved.clone(), None).await.expect("heartbeat");
    assert!(find(None, None, Some("own"), 10).await.is_empty(), "the old heartbeat's label is gone");
    assert_eq!(find(None, None, Some("moved"), 10).await, ["la1"]);
    moved.labels = [("k".to_owned(), "own".to_owned()), ("site".to_owned(), "x".to_owned())].into();
    s.record_heartbeat("la1", moved, None).await.expect("heartbeat");
    assert_eq!(find(None, None, Some("own"), 10).await, ["la1"]);
    let by_org: crate::store::NodeFilter = Box::new(|org, _| org == "lo-b");
    let lo_b: Vec<String> = s
        .find_nodes(None, None, None, by_org, 10)
        .await
        .expect("find")
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    assert_eq!(lo_b, ["lb1"], "the filter sees the organisation");
    let whole = s.find_nodes(Some("lo-a"), None, None, Box::new(|_, _| true), 1).await.expect("find");
    assert_eq!(
        whole[0].last_heartbeat.as_ref().map(|h| h.inventory.hostname.len()),
        Some(4096),
        "kept: whole"
    );
    assert_eq!(s.revoke_node("la2", 3000).await.expect("revoke").revoked_unix_ms, Some(3000));
    assert_eq!(
        s.revoke_node("la2", 4000).await.expect("again").revoked_unix_ms,
        Some(3000),
        "the first time stays"
    );
    assert_eq!(s.get_node("la2").await.expect("get").expect("la2").revoked_unix_ms, Some(3000));
    assert!(matches!(s.revoke_node("nobody", 1).await, Err(StoreError::NotFound(_))));
    let renewed = s.renew_node_cert("la1", "c", "c2").await.expect("renew");
    assert_eq!((renewed.cert_sha256.as_str(), renewed.previous_cert_sha256.as_deref()), ("c2", Some("c")));
    let renewed = s.renew_node_cert("la1", "c", "c3").await.expect("renewed again from the old one");
    assert_eq!((renewed.cert_sha256.as_str(), renewed.previous_cert_sha256.as_deref()), ("c3", Some("c")));
    let settled = s.forget_previous_cert("la1").await.expect("forget");
    assert_eq!((settled.cert_sha256.as_str(), settled.previous_cert_sha256), ("c3", None));
    assert_eq!(s.get_node("la1").await.expect("get").expect("la1").cert_sha256, "c3");
    assert_eq!(s.node_presence(None).await.expect("presence").len(), everyone.len());
}

/// What the listings answer, in one comparable value.
async fn listing_snapshot(s: &dyn StateStore) -> String {
    let mut out = Vec::new();
    for org in [None, Some("lo-a"), Some("lo-b"), Some("o")] {
        for state in [None, Some(JobState::Queued), Some(JobState::Finished)] {
            for failed in [false, true] {
                let f = JobFilter { state, failed, ..listing(org, 1000) };
                out.push(format!(
                    "{org:?} {state:?} {failed}: {:?}",
                    ids(&s.list_jobs(f).await.expect("list"))
                ));
            }
        }
        out.push(format!("{org:?} counts: {:?}", s.job_counts(org).await.expect("counts")));
        let nodes = s.page_nodes(org, 0, 1000).await.expect("page");
        out.push(format!("{org:?} nodes: {:?}", nodes.iter().map(|n| &n.node_id).collect::<Vec<_>>()));
        out.push(format!("{org:?} presence: {:?}", s.node_presence(org).await.expect("presence")));
    }
    for node in ["n1", "na", "nb", "la1", "la2", "lb1"] {
        let f = JobFilter { node_id: Some(node.into()), ..listing(None, 1000) };
        out.push(format!("{node}: {:?}", ids(&s.list_jobs(f).await.expect("list"))));
    }
    out.join("\n")
}

fn deployment(org_id: &str, name: &str, revision: u64) -> super::DeploymentRecord {
    let spec: outpost_protocol::ServiceSpec =
        serde_json::from_value(serde_json::json!({ "image": format!("sha256:{}", "c".repeat(64)) }))
            .expect("spec");
    let rollout: outpost_protocol::RolloutPolicy =
        serde_json::from_value(serde_json::json!({})).expect("policy");
    super::DeploymentRecord {
        info: outpost_protocol::DeploymentInfo {
            name: name.into(),
            org_id: org_id.into(),
            service: "web".into(),
            selector: "site=icu".into(),
            priority: 0,
            rollout,
            revision,
            stable_revision: None,
            status: outpost_protocol::RolloutStatus::InProgress,
            reason: None,
            updated: Vec::new(),
            spec: spec.clone(),
            created_unix_ms: 1,
            updated_unix_ms: revision,
            nodes: Vec::new(),
        },
        revisions: vec![(revision, spec)],
        completed: Vec::new(),
        batch_started: Default::default(),
    }
}

pub(super) fn desired(seq: u64) -> super::DesiredService {
    super::DesiredService {
        deployment: "web".into(),
        revision: 1,
        removal: false,
        rollback: false,
        seq,
        envelope: SignedEnvelope { payload: "{}".into(), key_id: "k".into(), signature_hex: String::new() },
        since_unix_ms: seq,
    }
}

fn service_report(seq: u64, service: &str) -> outpost_protocol::ServiceReport {
    serde_json::from_value(serde_json::json!({
        "seq": seq, "service": service, "deployment": "web", "revision": 1, "state": "healthy",
        "restarts": 0, "unix_ms": seq,
    }))
    .expect("report")
}

async fn deployments_and_node_services_are_kept_per_key(s: &dyn StateStore) {
    // Names that sort differently by bytes than by a locale, and that prefix one another.
    for (org_id, name) in [("od", "web"), ("od", "Web"), ("od-2", "a"), ("od", "web-2")] {
        s.put_deployment(deployment(org_id, name, 1)).await.expect("put");
    }
    s.put_deployment(deployment("od", "web", 2)).await.expect("replace");
    assert_eq!(s.get_deployment("od", "web").await.expect("get").expect("web").info.revision, 2);
    assert!(s.get_deployment("od-2", "web").await.expect("get").is_none());
    let listed: Vec<(String, String)> = s
        .list_deployments()
        .await
        .expect("list")
        .into_iter()
        .filter(|d| d.info.org_id.starts_with("od"))
        .map(|d| (d.info.org_id, d.info.name))
        .collect();
    let want = [("od", "Web"), ("od", "web"), ("od", "web-2"), ("od-2", "a")];
    assert_eq!(listed, want.map(|(o, n)| (o.to_string(), n.to_string())), "org, then name, by bytes");

    s.set_service_desired("ns1", "web", desired(4)).await.expect("desired");
    s.set_service_desired("ns1", "Web", desired(5)).await.expect("desired");
    s.set_service_desired("ns10", "web", desired(1)).await.expect("desired");
    s.ack_node_services("ns1", vec![outpost_protocol::ServiceAck { service: "web".into(), seq: 4 }])
        .await
        .expect("ack");
    assert_eq!(
        s.store_service_reports("ns1", vec![service_report(1, "web"), service_report(2, "web")])
            .await
            .expect("reports"),
        2
    );
    assert_eq!(s.store_service_reports("ns1", vec![service_report(2, "web")]).await.expect("again"), 2);
    let of_ns1 = s.list_node_services(Some("ns1")).await.expect("list");
    let keys: Vec<(&str, &str)> = of_ns1.iter().map(|r| (r.node_id.as_str(), r.service.as_str())).collect();
    assert_eq!(keys, [("ns1", "Web"), ("ns1", "web")]);
    let web = &of_ns1[1];
    assert_eq!((web.acked_seq, web.desired.as_ref().map(|d| d.seq)), (4, Some(4)));
    assert!(!web.unacknowledged());
    assert_eq!(web.report.as_ref().map(|r| r.seq), Some(2), "the newest report");
    assert!(of_ns1[0].unacknowledged());
    assert_eq!(
        s.list_node_services(None).await.expect("all").iter().filter(|r| r.node_id.starts_with("ns")).count(),
        3
    );
    // A new desired state keeps what the node acknowledged and reported.
    s.set_service_desired("ns1", "web", desired(6)).await.expect("desired");
    let web = s.list_node_services(Some("ns1")).await.expect("list").remove(1);
    assert_eq!((web.acked_seq, web.report.as_ref().map(|r| r.seq)), (4, Some(2)));
    assert!(web.unacknowledged());
}

async fn pending_work_names_what_held_polls_wait_for(s: &dyn StateStore) {
    use super::PendingWork;
    let nodes = || ["pw-jobs", "pw-stop", "pw-service", "pw-idle", "pw-unknown"].map(String::from).to_vec();
    s.insert_job(job("pwj1", "pw-jobs", 1)).await.expect("insert");
    s.insert_job(job("pwj2", "pw-jobs", 2)).await.expect("insert");
    s.insert_job(job("pws1", "pw-stop", 1)).await.expect("insert");
    s.ack_jobs("pw-stop", vec!["pws1".into()], 2).await.expect("ack");
    assert_eq!(s.cancel_job("pws1", 3).await.expect("cancel"), CancelOutcome::Requested);
    s.set_service_desired("pw-service", "web", desired(7)).await.expect("desired");
    s.set_service_desired("pw-service", "db", desired(8)).await.expect("desired");
    s.ack_node_services("pw-service", vec![outpost_protocol::ServiceAck { service: "db".into(), seq: 8 }])
        .await
        .expect("ack");
    s.insert_job(job("pwi1", "pw-idle", 1)).await.expect("insert");
    s.ack_jobs("pw-idle", vec!["pwi1".into()], 2).await.expect("ack");
    let mut found = s.pending_work(nodes()).await.expect("pending work");
    found.sort();
    let want = [
        ("pw-jobs", PendingWork::Jobs),
        ("pw-service", PendingWork::Sent("s:7".into())),
        ("pw-stop", PendingWork::Sent("c:pws1/1".into())),
    ]
    .map(|(n, w)| (n.to_string(), w));
    assert_eq!(found, want, "one entry per node with queued jobs, one per stop and unsent service");
    // Taken and answered, nothing is left.
    s.ack_jobs("pw-jobs", vec!["pwj1".into(), "pwj2".into()], 4).await.expect("ack");
    let mut stopped = result("pws1");
    stopped.outcome = Outcome::Cancelled;
    s.store_result("pw-stop", stopped).await.expect("store");
    s.ack_node_services("pw-service", vec![outpost_protocol::ServiceAck { service: "web".into(), seq: 7 }])
        .await
        .expect("ack");
    assert_eq!(s.pending_work(nodes()).await.expect("pending work"), []);
    assert_eq!(s.pending_work(Vec::new()).await.expect("nobody"), []);
}

pub(super) async fn contract(s: &dyn StateStore) {
    tokens_are_one_time_and_expire(s).await;
    queued_jobs_are_offered_until_acknowledged(s).await;
    results_are_stored_once(s).await;
    audit_is_ordered(s).await;
    api_token_names_are_unique_until_revoked(s).await;
    events_are_stored_once_per_node_and_seq(s).await;
    triggered_jobs_are_recorded_once(s).await;
    trigger_names_are_unique_per_org(s).await;
    operator_labels_are_set_and_removed(s).await;
    a_reassigned_job_fences_its_old_attempt(s).await;
    cancels_end_queued_jobs_and_ask_nodes_for_the_rest(s).await;
    node_audit_logs_only_grow_link_by_link(s).await;
    org_settings_change_one_revision_at_a_time(s).await;
    listings_follow_every_change(s).await;
    deployments_and_node_services_are_kept_per_key(s).await;
    any_text_is_kept_as_it_was(s).await;
    pending_work_names_what_held_polls_wait_for(s).await;
}

#[tokio::test]
async fn the_memory_store_keeps_the_contract() {
    contract(&MemoryStore::new()).await;
}

/// Many writers at once, each waiting for its write to be durable: all finish. (sled's own
/// `flush_async` deadlocked here with eight; the bound only tells a hang from a slow disk.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_durable_writes_all_finish() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
    store.insert_org(org("busy")).await.unwrap();
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let store = std::sync::Arc::clone(&store);
        writers.spawn(async move {
            for j in 0..8u64 {
                let token = TokenRecord {
                    token_sha256: format!("{i:04}-{j:04}"),
                    org_id: "busy".into(),
                    expires_unix_ms: u64::MAX,
                    used_unix_ms: None,
                    used_by_node: None,
                };
                store.insert_token(token).await.unwrap();
            }
        });
    }
    let all = async {
        while let Some(done) = writers.join_next().await {
            done.unwrap();
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), all)
        .await
        .expect("64 concurrent writers deadlocked the store");
    assert!(store.get_token("0063-0007").await.unwrap().is_some());
}

#[tokio::test]
async fn the_sled_store_keeps_the_contract() {
    let sled = SledStore::temporary().expect("sled");
    contract(&sled).await;
    sled.check_indexes().expect("no stale or missing listing key");
    let twin = MemoryStore::new();
    contract(&twin).await;
    assert_eq!(
        listing_snapshot(&sled).await,
        listing_snapshot(&twin).await,
        "the sled store's indexed listings answer what the twin's full scans do"
    );
}

#[tokio::test]
async fn a_database_without_listing_indexes_is_indexed_when_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = {
        let s = SledStore::open(dir.path()).expect("open");
        contract(&s).await;
        let before = listing_snapshot(&s).await;
        s.forget_indexes().expect("forget");
        assert_eq!(s.job_counts(None).await.expect("counts").total(), 0, "the indexes are gone");
        before
    };
    let s = SledStore::open(dir.path()).expect("reopen");
    s.check_indexes().expect("rebuilt exactly");
    assert_eq!(listing_snapshot(&s).await, before);
    s.insert_job(listed("lo-b", "b3", "lb1", 5000)).await.expect("insert");
    assert_eq!(
        s.job_counts(Some("lo-b")).await.expect("counts").queued,
        2,
        "counting goes on from the rebuilt"
    );
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
    assert_eq!(s.list_audit(None, 10).await.expect("audit").len(), 3);
    let token = s.get_api_token("tok-1").await.expect("get").expect("API tokens survive");
    assert_eq!(token.info.revoked_unix_ms, Some(50), "and so does their revocation");
    let events = s.list_events(by_cursor(None, 0)).await.expect("events");
    assert_eq!(events.len(), 7);
    assert_eq!(events[1].triggered_jobs, ["trg-1", "trg-2"]);
    let next = s.store_events("n1", "o", vec![event(7, "g")], 20).await.expect("store");
    assert_eq!((next.stored, next.gaps.len()), (1, 0), "the node's last seq survives a reopen");
    let last = s.list_events(by_cursor(None, events[6].cursor)).await.expect("events");
    assert_eq!(last.len(), 1, "cursors continue after a reopen");
    assert!(last[0].cursor > events[6].cursor);
    assert_eq!(s.store_events("n1", "o", vec![event(3, "c")], 21).await.expect("store").duplicates, 1);
    assert_eq!(s.list_triggers(None).await.expect("triggers").len(), 3);
    assert_eq!(s.get_node("nl").await.expect("get").expect("nl").operator_labels.len(), 1);
    assert_eq!(s.get_job("h1").await.expect("get").expect("h1").info.superseded.len(), 1);
    assert_eq!(s.pending_cancels("nc", 10).await.expect("cancels").len(), 2, "pending cancels survive");
    assert_eq!(s.node_audit("na", 0, 100).await.expect("audit").len(), 6, "a node's audit log survives");
    let more = audit_chain(7).pop().expect("entry 7");
    assert_eq!(s.append_node_audit("na", vec![more]).await.expect("append").up_to_seq, 7, "its head too");
}

/// The agent's chaos seed 11 found sled 0.34 unable to open a database whose directory holds
/// an unfinished `snap.*.generating` (left by a snapshot cut short by a full disk or a kill -9):
/// "Read corrupted data", for good. The control plane's store is sled too: it opens anyway.
#[tokio::test]
async fn an_unfinished_snapshot_does_not_keep_the_sled_store_from_opening() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = SledStore::open(dir.path()).expect("open");
        contract(&s).await;
    }
    let leftover = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&leftover, b"").expect("an empty snapshot in the making");
    let s = SledStore::open(dir.path()).expect("the store opens");
    assert!(s.get_node("n1").await.expect("get").is_some(), "with what it held");
    assert!(!leftover.exists(), "the unfinished snapshot is gone");
}

/// The PostgreSQL adapter against a real PostgreSQL server (initdb in a temporary directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_the_contract() {
    let Some(pg) =
        crate::testing::postgres::start_or_skip("the_postgres_store_keeps_the_contract").await.unwrap()
    else {
        return;
    };
    let mut options = pg.database().await.unwrap();
    options.secret_key = Some([3; 32]);
    let migrated = super::PgStore::migrate(options.clone()).await.unwrap();
    assert_eq!((migrated.from, migrated.to), (0, super::SCHEMA_VERSION));
    let s = super::PgStore::connect(options).await.unwrap();
    contract(&s).await;
    let twin = MemoryStore::new();
    contract(&twin).await;
    assert_eq!(
        listing_snapshot(&s).await,
        listing_snapshot(&twin).await,
        "the database's listings answer what the twin's full scans do"
    );
}
