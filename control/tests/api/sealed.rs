//! Results sealed for their requesters: recipients checked at submission, sent only to agents
//! that can seal, the sealed part stored and returned byte for byte.

use outpost_control::testing::TestServer;
use outpost_protocol::{JobEnvelope, Outcome, SubmitJobRequest, paths};
use reqwest::StatusCode;

use crate::support::{TestNode, assert_error, op_post, org_and_token, report_for, spec};

use crate::support::AGE_RECIPIENT as RECIPIENT;

#[tokio::test]
async fn a_sealed_job_goes_only_to_an_agent_that_seals_and_its_result_is_kept_as_sealed() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org_id, token) = org_and_token(&server).await;
    let sealing = TestNode::enroll_current(&server, server.ca_pem(), &token).await;
    let older = TestNode::enroll(&server, &op.create_token(&org_id, None).await.expect("token").token).await;

    // Malformed recipients: refused before anything is queued.
    for (bad, says) in [
        ("age1notakey", "not an age X25519 public key"),
        (&RECIPIENT[..RECIPIENT.len() - 1], "not an age X25519 public key"),
    ] {
        let req = SubmitJobRequest {
            recipients: vec![bad.to_owned()],
            ..SubmitJobRequest::for_node(sealing.id(), spec())
        };
        let got = op_post(&server, paths::JOBS, &req).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_recipient");
        assert!(got.1["message"].as_str().unwrap_or_default().contains(says), "{}", got.1);
    }
    // An agent that does not announce sealed-results is not sent a sealed job.
    let req = SubmitJobRequest {
        recipients: vec![RECIPIENT.into()],
        ..SubmitJobRequest::for_node(older.id(), spec())
    };
    let got = op_post(&server, paths::JOBS, &req).await;
    assert_error(&got, StatusCode::CONFLICT, "cannot_seal");
    // A group is every matching node, so one that cannot seal refuses the whole group.
    let each = SubmitJobRequest {
        recipients: vec![RECIPIENT.into()],
        ..SubmitJobRequest::for_selector(&org_id, "!maintenance", outpost_protocol::Placement::Each, spec())
    };
    let got = op_post(&server, paths::JOB_GROUPS, &each).await;
    assert_error(&got, StatusCode::CONFLICT, "cannot_seal");
    assert!(got.1["message"].as_str().unwrap_or_default().contains(older.id()), "{}", got.1);
    // One node of a selector: only agents that seal are candidates.
    let any = SubmitJobRequest {
        recipients: vec![RECIPIENT.into()],
        ..SubmitJobRequest::for_selector(&org_id, "!maintenance", outpost_protocol::Placement::Any, spec())
    };
    let placed = op.submit(&any).await.expect("placed");
    assert_eq!(placed.node_id, sealing.id());
    assert!(older.poll(&[], 0).await.jobs.is_empty(), "nothing for the agent that cannot seal");

    // The signed envelope carries the recipients.
    let offered = sealing.poll(&[], 0).await;
    let a = &offered.jobs[0];
    let env: JobEnvelope = serde_json::from_str(&a.envelope.payload).expect("envelope");
    assert_eq!(env.recipients, [RECIPIENT]);

    // A report whose sealed part is not an age file is refused; a real one is stored as sent.
    let mut report = report_for(a, Outcome::Succeeded);
    report.sealed = Some("patient 42: benign".into());
    let got = sealing.post(paths::NODE_RESULTS, &report).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_sealed_result");
    report.sealed = None;
    report.stdout_tail = "patient 42: benign\n".into();
    outpost_protocol::seal::seal_report(&mut report, &[RECIPIENT.into()]).expect("sealed");
    let (status, body) = sealing.report(&report).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stored = op.job(&a.job_id).await.expect("job").result.expect("a result");
    assert_eq!(stored.sealed, report.sealed, "the age file byte for byte");
    assert!(stored.stdout_tail.is_empty(), "nothing in clear");
}
