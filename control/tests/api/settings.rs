//! An organisation's settings: read and changed through the API (one revision at a time),
//! enforced by the control plane (work of a feature turned off is refused), and delivered in
//! poll answers only to agents that take them.

use outpost_control::testing::TestServer;
use outpost_protocol::{
    Announce, PollRequest, PollResponse, PutOrgSettings, SubmitJobRequest, capability, paths,
};
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{
    TestNode, answer, assert_error, https, object_event, org_and_token, spec, trigger_request,
};

async fn put(server: &TestServer, org_id: &str, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
    let resp = https(server.ca_pem(), None)
        .put(format!("{}{}", server.url(), paths::fill(paths::ORG_SETTINGS, "org_id", org_id)))
        .bearer_auth(server.admin_token())
        .json(&body)
        .send()
        .await
        .expect("sent");
    answer(resp).await
}

#[tokio::test]
async fn settings_change_one_revision_at_a_time_and_refuse_what_nodes_could_not_take() {
    let server = TestServer::start().await.expect("server");
    let (org_id, _) = org_and_token(&server).await;
    let op = server.operator().expect("client");
    let fresh = op.org_settings(&org_id).await.expect("read");
    assert_eq!((fresh.revision, fresh.default_profile.as_deref()), (0, None));
    assert!(fresh.features_off.is_empty());

    let set = op
        .put_org_settings(
            &org_id,
            &PutOrgSettings {
                default_profile: Some("hybrid".into()),
                features_off: vec!["services".into(), "inference".into(), "services".into()],
                revision: Some(0),
            },
        )
        .await
        .expect("changed");
    assert_eq!(set.revision, 1);
    assert_eq!(set.features_off, ["inference", "services"], "sorted, once each");
    assert_eq!(op.org_settings(&org_id).await.expect("read"), set);

    // A writer that read revision 0 loses instead of undoing the change it never saw.
    let stale = put(&server, &org_id, json!({"features_off": [], "revision": 0})).await;
    assert_error(&stale, StatusCode::CONFLICT, "settings_changed");
    // What no node could take: an unknown feature; air-gapped as a default; unknown fields.
    let got = put(&server, &org_id, json!({"features_off": ["gpu"]})).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_settings");
    assert!(got.1["message"].as_str().unwrap().contains("\"gpu\""), "{}", got.1);
    let got = put(&server, &org_id, json!({"default_profile": "air-gapped"})).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_settings");
    let got = put(&server, &org_id, json!({"default_profil": "cloud"})).await;
    assert_eq!(got.0, StatusCode::BAD_REQUEST, "{}", got.1);
    assert_eq!(op.org_settings(&org_id).await.expect("read").revision, 1, "nothing refused was stored");
    let missing = put(&server, "org-nope", json!({})).await;
    assert_eq!(missing.0, StatusCode::NOT_FOUND);

    // The change is in the audit trail, with who made it.
    let audit = op.audit(50).await.expect("audit");
    let entry = audit.entries.iter().find(|e| e.action == "org.settings").expect("an org.settings entry");
    assert_eq!(entry.actor, "owner");
    assert!(entry.detail.contains("features off: inference, services"), "{}", entry.detail);
}

#[tokio::test]
async fn work_of_a_feature_turned_off_is_refused_and_nodes_hear_of_it_if_they_take_settings() {
    let server = TestServer::start().await.expect("server");
    let (org_id, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let op = server.operator().expect("client");
    let off = |features: &[&str], revision| PutOrgSettings {
        default_profile: None,
        features_off: features.iter().map(|f| f.to_string()).collect(),
        revision: Some(revision),
    };
    op.put_org_settings(&org_id, &off(&["containers"], 0)).await.expect("changed");

    let err = op.submit(&SubmitJobRequest::for_node(node.id(), spec())).await.expect_err("refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("feature_off") && msg.contains("containers") && msg.contains("--enable"), "{msg}");

    // An agent that takes settings finds them in every answer, even one with nothing else.
    let answer = node.poll(&[], 0).await;
    let got = answer.org_settings.expect("settings in the answer");
    assert_eq!((got.revision, got.features_off.as_slice()), (1, ["containers".to_owned()].as_slice()));
    // An older agent (no such capability) is never sent a field it would refuse.
    let old = Announce {
        capabilities: Announce::this_build()
            .capabilities
            .into_iter()
            .filter(|c| c != capability::ORG_SETTINGS)
            .collect(),
        ..Announce::this_build()
    };
    let req = PollRequest { wait_secs: Some(0), announce: Some(old), ..Default::default() };
    let (status, body) = node.post(paths::NODE_POLL, &req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("org_settings").is_none(), "{body}");
    let _: PollResponse = serde_json::from_value(body).expect("a PollResponse");

    // Turned back on: the same submission goes through.
    op.put_org_settings(&org_id, &off(&[], 1)).await.expect("changed");
    op.submit(&SubmitJobRequest::for_node(node.id(), spec())).await.expect("submitted");
}

#[tokio::test]
async fn a_trigger_of_a_feature_turned_off_skips_its_event_without_refusing_the_batch() {
    let server = TestServer::start().await.expect("server");
    let (org_id, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let op = server.operator().expect("client");
    op.create_trigger(&trigger_request(&org_id, "scans", "in/")).await.expect("trigger");
    let off =
        PutOrgSettings { default_profile: None, features_off: vec!["containers".into()], revision: Some(0) };
    op.put_org_settings(&org_id, &off).await.expect("changed");

    // The batch is stored and acknowledged (a refusal would have the node resend it for ever);
    // no job was made, and the trail says why.
    assert_eq!(node.deliver_ok(&[object_event(1, "in/a.json")]).await, (1, 0, 1));
    let q = outpost_control::client::JobsQuery {
        node_id: Some(node.id().to_owned()),
        limit: 10,
        ..Default::default()
    };
    assert!(op.jobs(&q).await.expect("jobs").jobs.is_empty());
    let audit = op.audit(50).await.expect("audit");
    let skipped =
        audit.entries.iter().find(|e| e.action == "trigger.skipped").expect("a trigger.skipped entry");
    assert!(skipped.detail.contains("containers"), "{}", skipped.detail);
}
