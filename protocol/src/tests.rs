use super::*;

fn spec() -> ContainerSpec {
    serde_json::from_str(r#"{"image":"sha256:00","command":["echo","hi"]}"#).expect("minimal spec parses")
}

#[test]
fn a_minimal_spec_gets_hardened_defaults() {
    let s = spec();
    assert!(!s.network);
    assert_eq!(s.timeout_secs, 600);
    assert_eq!(s.resources, Resources::default());
    assert_eq!(s.security, SecurityOverrides::default());
}

#[test]
fn unknown_fields_are_refused_everywhere() {
    let e = serde_json::from_str::<ContainerSpec>(r#"{"image":"sha256:00","privileged":true}"#)
        .expect_err("unknown field must fail");
    assert!(e.to_string().contains("privileged"), "{e}");
    assert!(serde_json::from_str::<PollRequest>(r#"{"ack":[]}"#).is_err());
    assert!(
        serde_json::from_str::<EnrollRequest>(
            r#"{"token":"t","csr_pem":"c","hostname":"h","agent_version":"1","x":1}"#
        )
        .is_err()
    );
}

#[test]
fn envelope_round_trips_byte_for_byte() {
    let env = JobEnvelope {
        job_id: "j".into(),
        attempt: 1,
        org_id: "o".into(),
        node_id: "n".into(),
        seq: 7,
        issued_unix_ms: 1,
        expires_unix_ms: 2,
        spec: spec().into(),
        submitter: None,
        recipients: Vec::new(),
    };
    let bytes = serde_json::to_string(&env).expect("serialises");
    assert!(!bytes.contains("submitter"), "an envelope without a submitter is the older form: {bytes}");
    let back: JobEnvelope = serde_json::from_str(&bytes).expect("parses");
    assert_eq!(back, env);
    assert_eq!(serde_json::to_string(&back).expect("serialises"), bytes, "canonical form is stable");
}

#[test]
fn result_report_round_trips() {
    let r = ResultReport {
        job_id: "j".into(),
        attempt: 2,
        idempotency_key: ResultReport::key_for("j", 2),
        outcome: Outcome::TimedOut,
        exit_code: Some(137),
        error: None,
        stdout_tail: "out".into(),
        stderr_tail: String::new(),
        output_truncated: false,
        timings: Timings { received_unix_ms: 1, started_unix_ms: Some(2), finished_unix_ms: Some(3) },
        outputs: Vec::new(),
        egress_denied: Vec::new(),
        inference: None,
        sealed: None,
    };
    let json = serde_json::to_string(&r).expect("serialises");
    assert!(json.contains(r#""outcome":"timed_out""#));
    assert_eq!(serde_json::from_str::<ResultReport>(&json).expect("parses"), r);
    assert_eq!(r.idempotency_key, "j/2");
}

#[test]
fn heartbeat_and_job_info_round_trip() {
    let hb = Heartbeat {
        agent_version: "0.1.0".into(),
        inventory: Inventory { hostname: "h".into(), cpu_count: 2, ..Inventory::default() },
        running_jobs: 1,
        outbox_depth: 3,
        relay: None,
        models: Vec::new(),
        labels: Labels::new(),
        announce: None,
        awaiting_approval: Vec::new(),
    };
    let json = serde_json::to_string(&hb).expect("ser");
    assert!(!json.contains("awaiting_approval"), "left out when empty, for older control planes: {json}");
    assert!(!json.contains("models"), "an empty model list is left out for older peers: {json}");
    let back: Heartbeat = serde_json::from_str(&json).expect("de");
    assert_eq!(back, hb);
    let with_model = Heartbeat {
        models: vec![ModelSummary {
            digest: "d".repeat(64),
            name: "tiny".into(),
            version: "1".into(),
            format: ModelFormat::Gguf,
            engine: "llama".into(),
        }],
        ..hb
    };
    let json = serde_json::to_string(&with_model).expect("ser");
    assert!(json.contains(r#""format":"gguf""#), "{json}");
    assert_eq!(serde_json::from_str::<Heartbeat>(&json).expect("de"), with_model);
    let info = JobInfo {
        job_id: "j".into(),
        attempt: 1,
        org_id: "o".into(),
        node_id: "n".into(),
        seq: 1,
        state: JobState::Queued,
        spec: spec().into(),
        submitted_unix_ms: 5,
        accepted_unix_ms: None,
        result: None,
        group_id: None,
        selector: None,
        placement: None,
        superseded: Vec::new(),
        cancel_requested_unix_ms: None,
        awaiting_site_approval_since_unix_ms: None,
    };
    let back: JobInfo = serde_json::from_str(&serde_json::to_string(&info).expect("ser")).expect("de");
    assert_eq!(back, info);
}

#[test]
fn path_templates_fill_their_parameter() {
    assert_eq!(paths::fill(paths::JOB, "job_id", "abc"), "/v1/jobs/abc");
    assert_eq!(paths::fill(paths::ORG_TOKENS, "org_id", "o1"), "/v1/orgs/o1/tokens");
}

#[test]
fn a_model_manifest_refuses_unknown_fields_and_formats() {
    let ok = r#"{"name":"m","version":"1","format":"safetensors","engine":"candle","license":"Apache-2.0",
        "files":[{"path":"model.safetensors","size":3,"sha256":"00"}]}"#;
    let m: ModelManifest = serde_json::from_str(ok).expect("parses");
    assert_eq!(m.format, ModelFormat::Safetensors);
    assert!(
        serde_json::from_str::<ModelManifest>(&ok.replace(r#""format":"safetensors""#, r#""format":"onnx""#))
            .is_err()
    );
    assert!(
        serde_json::from_str::<ModelManifest>(&ok.replace(r#""license""#, r#""extra":1,"license""#)).is_err()
    );
    let signed = r#"{"payload":"{}","key_id":"k","signature_hex":"00","by":"x"}"#;
    assert!(serde_json::from_str::<SignedModelManifest>(signed).is_err());
}

#[test]
fn a_job_spec_without_kind_is_a_container_spec_and_reads_as_before() {
    let json = format!(r#"{{"image":"sha256:{}","command":["true"]}}"#, "a".repeat(64));
    let spec: JobSpec = serde_json::from_str(&json).unwrap();
    let JobSpec::Container(c) = &spec else { panic!("not a container spec") };
    assert_eq!(c.command, ["true"]);
    // Serialised back, it is the container object itself: signatures over old manifests hold.
    let again: ContainerSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(&again, c);
    assert_eq!(spec.kind_name(), "container");
}

#[test]
fn a_job_spec_with_kind_is_an_inference_spec_with_defaults() {
    let json = format!(r#"{{"kind":"generate","model":"{}","prompt":"hi"}}"#, "b".repeat(64));
    let spec: JobSpec = serde_json::from_str(&json).unwrap();
    let i = spec.inference().unwrap();
    assert_eq!(
        (i.kind, i.max_tokens, i.temperature, i.timeout_secs),
        (InferenceKind::Generate, 128, 0.0, 600)
    );
    assert_eq!(spec.kind_name(), "generate");
    let back: JobSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);
}

#[test]
fn a_bad_kind_or_an_unknown_field_is_an_error_that_names_it() {
    let err = serde_json::from_str::<JobSpec>(r#"{"kind":"train","model":"x"}"#).unwrap_err();
    assert!(err.to_string().contains("train"), "{err}");
    let err = serde_json::from_str::<JobSpec>(&format!(
        r#"{{"kind":"embed","model":"{}","texts":["a"],"colour":1}}"#,
        "c".repeat(64)
    ))
    .unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
    let err = serde_json::from_str::<JobSpec>(r#"{"image":"x","colour":1}"#).unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
}

/// Version skew: a control plane is upgraded before its nodes, so what it sends an agent that
/// announced nothing must read as it did for protocol revision 1, and what such an agent sends
/// must still parse.
#[test]
fn messages_without_the_new_fields_read_and_write_as_revision_1() {
    let old_poll = r#"{"ack_job_ids":["a"],"wait_secs":25,"max_jobs":4}"#;
    let poll: PollRequest = serde_json::from_str(old_poll).expect("a revision-1 poll parses");
    assert_eq!(poll.announce, None);
    let answer = PollResponse::default();
    assert_eq!(
        serde_json::to_string(&answer).expect("ser"),
        r#"{"jobs":[]}"#,
        "no field an old agent refuses"
    );
    let old_hb = r#"{"agent_version":"0.1.0","inventory":{"hostname":"h","os":"","kernel":"","cpu_model":"",
        "cpu_count":1,"memory_total_bytes":1,"memory_available_bytes":1},"running_jobs":0,"outbox_depth":0}"#;
    let hb: Heartbeat = serde_json::from_str(old_hb).expect("a revision-1 heartbeat parses");
    assert!(hb.labels.is_empty() && hb.announce.is_none());
    let old_submit = r#"{"node_id":"n","spec":{"image":"sha256:00"}}"#;
    let submit: SubmitJobRequest = serde_json::from_str(old_submit).expect("a revision-1 submission parses");
    assert_eq!((submit.node_id.as_str(), submit.selector, submit.placement), ("n", None, None));
    let json = serde_json::to_string(&SubmitJobRequest::for_node("n", spec())).expect("ser");
    assert!(!json.contains("selector") && !json.contains("placement"), "{json}");
    // The signed envelope is unchanged by placement: an old agent verifies and runs re-placed
    // attempts as it always did, and still refuses a field it does not know.
    assert!(serde_json::from_str::<JobEnvelope>(
        r#"{"job_id":"j","attempt":2,"org_id":"o","node_id":"n","seq":1,"issued_unix_ms":1,"expires_unix_ms":2,
            "spec":{"image":"sha256:00"},"placement":"any"}"#
    )
    .is_err());
    let info = Announce::this_build();
    assert!(info.has(capability::CANCEL) && info.protocol >= 2);
}

#[test]
fn wire_names_are_the_json_names() {
    assert_eq!(wire_name(&Outcome::TimedOut), "timed_out");
    assert_eq!(wire_name(&ServiceState::RolledBack), "rolled_back");
    assert_eq!(wire_name(&NodePhase::AgentTooOld), "agent_too_old");
    assert_eq!(wire_name(&7u32), "", "not a string on the wire");
}

#[test]
fn outcome_all_lists_every_outcome_once() {
    // A new outcome breaks this match, and so comes here to be added to `Outcome::ALL`.
    let index = |o: Outcome| match o {
        Outcome::Succeeded => 0,
        Outcome::Failed => 1,
        Outcome::TimedOut => 2,
        Outcome::Rejected => 3,
        Outcome::Error => 4,
        Outcome::Cancelled => 5,
        Outcome::Refused => 6,
        Outcome::NotApproved => 7,
    };
    for (i, o) in Outcome::ALL.into_iter().enumerate() {
        assert_eq!(index(o), i, "{o:?}");
    }
}
