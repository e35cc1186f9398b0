//! Org-level triggers: "an event matching this → run this job on the node that saw it, with the
//! object as its input". Operator routes to create, list, read and delete them, and the firing
//! that event delivery runs. A trigger fires at most once per (trigger, node, seq): the job id
//! is derived from the three, so a resent batch finds the job and creates nothing.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outpost_protocol::{
    CreateTriggerRequest, ErrorBody, EventMatch, NodeInfo, ObjectEvent, Role, Trigger, TriggerList, paths,
};
use serde::Deserialize;

use super::jobs::{
    JobOrigin, MAX_KEY_BYTES, MAX_SPEC_KEYS, check_expiry, check_object_key, check_spec, create_job,
};
use super::{ApiError, ApiResult, AppState, Body, Caller, Params, Shared};
use crate::store::StoreError;

#[utoipa::path(post, path = paths::TRIGGERS, tag = "triggers", request_body = CreateTriggerRequest,
    description = "Create a trigger: every event of the organisation's nodes that matches `on` starts \
                   `job` on the node that saw it, with the object's key appended to `inputs` and \
                   OUTPOST_EVENT_KEY, OUTPOST_EVENT_SEQ and OUTPOST_EVENT_SHA256 in its environment. \
                   Fires once per event, even when the node resends it.",
    responses((status = 201, body = Trigger), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "no such organisation", body = ErrorBody),
        (status = 409, description = "the organisation has a trigger of that name", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn create_trigger(
    caller: Caller,
    State(st): State<Shared>,
    Body(req): Body<CreateTriggerRequest>,
) -> ApiResult<(StatusCode, Json<Trigger>)> {
    caller.at_least(Role::Operator)?;
    check_name(&req.name)?;
    super::access::org_exists(&st, &caller, &req.org_id, Role::Operator).await?;
    check_spec(&req.job)?;
    if req.job.inputs.len() >= MAX_SPEC_KEYS {
        return Err(ApiError::bad_request(
            "bad_object_key",
            format!("a trigger's job has at most {} inputs: the event's key is added", MAX_SPEC_KEYS - 1),
        ));
    }
    check_expiry(req.expires_in_secs)?;
    check_match(&st, &req.org_id, &req.on).await?;
    let trigger = Trigger {
        trigger_id: format!("trigger-{}", uuid::Uuid::new_v4().simple()),
        org_id: req.org_id,
        name: req.name,
        on: req.on,
        job: req.job,
        expires_in_secs: req.expires_in_secs,
        created_unix_ms: st.clock.now_ms(),
    };
    match st.store.insert_trigger(trigger.clone()).await {
        Ok(()) => {}
        Err(StoreError::AlreadyExists(what)) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("{what} already exists; pick another name or delete it first"),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let detail = format!(
        "{} ({}) in org {}, image {}",
        trigger.trigger_id, trigger.name, trigger.org_id, trigger.job.image
    );
    st.audit(&caller.actor, Some(&trigger.org_id), "trigger.created", &detail).await;
    Ok((StatusCode::CREATED, Json(trigger)))
}

fn check_name(name: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "bad_name",
            format!("trigger name {name:?} must be 1 to 64 of A-Z a-z 0-9 _ . -"),
        ))
    }
}

async fn check_match(st: &AppState, org_id: &str, on: &EventMatch) -> ApiResult<()> {
    let fields = [("key_prefix", Some(&on.key_prefix)), ("key_suffix", on.key_suffix.as_ref())];
    for (field, value) in fields {
        if value.is_some_and(|v| v.len() > MAX_KEY_BYTES) {
            return Err(ApiError::bad_request(
                "bad_match",
                format!("on.{field} is over {MAX_KEY_BYTES} bytes"),
            ));
        }
    }
    if let Some(node_id) = &on.node_id {
        let node = st.store.get_node(node_id).await?;
        if node.is_none_or(|n| n.org_id != org_id) {
            return Err(ApiError::bad_request(
                "bad_match",
                format!(
                    "on.node_id: node {node_id} is not enrolled in organisation {org_id}; see `node list`"
                ),
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TriggerQuery {
    /// Only triggers of this organisation.
    pub org_id: Option<String>,
}

#[utoipa::path(get, path = paths::TRIGGERS, tag = "triggers", params(TriggerQuery),
    description = "Triggers, oldest first.",
    responses((status = 200, body = TriggerList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_triggers(
    caller: Caller,
    State(st): State<Shared>,
    Params(q): Params<TriggerQuery>,
) -> ApiResult<Json<TriggerList>> {
    if q.org_id.as_deref().is_some_and(|o| !caller.sees(o)) {
        return Ok(Json(TriggerList::default()));
    }
    let org_id = q.org_id.as_deref().or(caller.org_filter());
    Ok(Json(TriggerList { triggers: st.store.list_triggers(org_id).await? }))
}

#[utoipa::path(get, path = paths::TRIGGER, tag = "triggers",
    params(("trigger_id" = String, Path, description = "trigger id")),
    responses((status = 200, body = Trigger), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_trigger(
    caller: Caller,
    State(st): State<Shared>,
    Path(trigger_id): Path<String>,
) -> ApiResult<Json<Trigger>> {
    let missing = || ApiError::not_found(format!("trigger {trigger_id} does not exist"));
    let trigger = st.store.get_trigger(&trigger_id).await?.ok_or_else(missing)?;
    caller.may(&trigger.org_id, Role::Viewer, missing)?;
    Ok(Json(trigger))
}

#[utoipa::path(delete, path = paths::TRIGGER, tag = "triggers",
    params(("trigger_id" = String, Path, description = "trigger id")),
    description = "Remove a trigger; events stored afterwards no longer fire it. Jobs it started stay. \
                   Answers with the removed trigger.",
    responses((status = 200, body = Trigger), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn delete_trigger(
    caller: Caller,
    State(st): State<Shared>,
    Path(trigger_id): Path<String>,
) -> ApiResult<Json<Trigger>> {
    let missing = || ApiError::not_found(format!("trigger {trigger_id} does not exist"));
    let trigger = st.store.get_trigger(&trigger_id).await?.ok_or_else(missing)?;
    caller.may(&trigger.org_id, Role::Operator, missing)?;
    if !st.store.delete_trigger(&trigger_id).await? {
        return Err(missing());
    }
    let detail = format!("{} ({}) in org {}", trigger.trigger_id, trigger.name, trigger.org_id);
    st.audit(&caller.actor, Some(&trigger.org_id), "trigger.deleted", &detail).await;
    Ok(Json(trigger))
}

/// Whether `event`, seen by `node_id`, matches: every set field must.
pub fn matches(on: &EventMatch, node_id: &str, event: &ObjectEvent) -> bool {
    (event.accepted || on.include_rejected)
        && on.node_id.as_deref().is_none_or(|n| n == node_id)
        && on.bucket.as_deref().is_none_or(|b| b == event.bucket)
        && on.watch.as_deref().is_none_or(|w| w == event.watch)
        && event.key.starts_with(&on.key_prefix)
        && on.key_suffix.as_deref().is_none_or(|s| event.key.ends_with(s))
}

/// The id of the job `trigger_id` starts for event `seq` of `node_id`: the same on every resend.
pub fn triggered_job_id(trigger_id: &str, node_id: &str, seq: u64) -> String {
    let digest = crate::pki::sha256_hex(format!("{trigger_id}\n{node_id}\n{seq}").as_bytes());
    format!("trg-{}", digest.get(..24).unwrap_or(&digest))
}

/// Fires the org's triggers for every event of a delivered batch (duplicates included, so a
/// crash between storing and firing is repaired by the node's resend). Idempotent.
pub(super) async fn fire(st: &AppState, node: &NodeInfo, events: &[ObjectEvent]) -> ApiResult<()> {
    let triggers = st.store.list_triggers(Some(&node.org_id)).await?;
    if triggers.is_empty() {
        return Ok(());
    }
    for event in events {
        for trigger in triggers.iter().filter(|t| matches(&t.on, &node.node_id, event)) {
            fire_one(st, node, trigger, event).await?;
        }
    }
    Ok(())
}

async fn fire_one(st: &AppState, node: &NodeInfo, trigger: &Trigger, event: &ObjectEvent) -> ApiResult<()> {
    let actor = format!("trigger:{}", trigger.trigger_id);
    if let Err(why) = check_object_key(&event.key) {
        // The node's job runner would refuse such an input; say so rather than fail the batch.
        tracing::warn!(trigger = %trigger.trigger_id, node = %node.node_id, seq = event.seq, %why,
            "event key cannot be a job input; trigger not fired");
        return Ok(());
    }
    let job_id = triggered_job_id(&trigger.trigger_id, &node.node_id, event.seq);
    let mut spec = trigger.job.clone();
    spec.inputs.push(event.key.clone());
    spec.env.insert("OUTPOST_EVENT_KEY".into(), event.key.clone());
    spec.env.insert("OUTPOST_EVENT_SEQ".into(), event.seq.to_string());
    spec.env.insert("OUTPOST_EVENT_SHA256".into(), event.sha256.clone().unwrap_or_default());
    let expiry = check_expiry(trigger.expires_in_secs)?;
    let created = create_job(
        st,
        node,
        spec.into(),
        expiry,
        Some(job_id.clone()),
        JobOrigin { trigger: Some(trigger.name.clone()), ..JobOrigin::default() },
    )
    .await;
    let created = match created {
        // The organisation turned this kind of work off: the event stays stored and acknowledged
        // (a refusal here would have the node resend the batch for ever); the trail says why.
        Err(e) if e.body.code == "feature_off" => {
            let detail = format!(
                "{} ({}) did not fire on node {} for event {} ({}): {}",
                trigger.trigger_id, trigger.name, node.node_id, event.seq, event.key, e.body.message
            );
            tracing::warn!("{detail}");
            st.audit(&actor, Some(&node.org_id), "trigger.skipped", &detail).await;
            return Ok(());
        }
        other => other?,
    };
    if let Some(info) = created {
        let detail = format!(
            "{} ({}) started job {} (seq {}) on node {} for event {} ({})",
            trigger.trigger_id, trigger.name, info.job_id, info.seq, node.node_id, event.seq, event.key
        );
        st.audit(&actor, Some(&node.org_id), "trigger.fired", &detail).await;
    }
    st.store.add_triggered_job(&node.node_id, event.seq, &job_id).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: &str, accepted: bool) -> ObjectEvent {
        ObjectEvent {
            seq: 1,
            watch: "inbox".into(),
            bucket: "local".into(),
            key: key.into(),
            size: 0,
            etag: "e".into(),
            sha256: None,
            content_type: None,
            accepted,
            reason: None,
            replaces_etag: None,
            observed_unix_ms: 0,
            fields: Default::default(),
            fields_denied: Vec::new(),
        }
    }

    #[test]
    fn every_set_field_of_a_match_must_hold() {
        let on = EventMatch {
            node_id: Some("n1".into()),
            bucket: Some("local".into()),
            watch: Some("inbox".into()),
            key_prefix: "in/".into(),
            key_suffix: Some(".jpg".into()),
            include_rejected: false,
        };
        assert!(matches(&on, "n1", &event("in/a.jpg", true)));
        assert!(!matches(&on, "n2", &event("in/a.jpg", true)));
        assert!(!matches(&on, "n1", &event("out/a.jpg", true)));
        assert!(!matches(&on, "n1", &event("in/a.png", true)));
        assert!(!matches(&on, "n1", &event("in/a.jpg", false)), "rejected objects are skipped");
        assert!(matches(
            &EventMatch { include_rejected: true, ..on.clone() },
            "n1",
            &event("in/a.jpg", false)
        ));
        assert!(!matches(&EventMatch { watch: Some("other".into()), ..on }, "n1", &event("in/a.jpg", true)));
        assert!(matches(&EventMatch::default(), "any", &event("x", true)));
    }

    #[test]
    fn a_triggered_job_id_depends_on_trigger_node_and_seq_only() {
        let a = triggered_job_id("t", "n", 1);
        assert_eq!(a, triggered_job_id("t", "n", 1));
        assert_eq!(a.len(), 4 + 24);
        assert!(a.starts_with("trg-"));
        assert_ne!(a, triggered_job_id("t", "n", 2));
        assert_ne!(a, triggered_job_id("t", "m", 1));
        assert_ne!(a, triggered_job_id("u", "n", 1));
    }

    #[test]
    fn trigger_names_are_short_and_plain() {
        assert!(check_name("resize-photos_v1.2").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"a".repeat(65)).is_err());
        assert!(check_name("has space").is_err());
        assert!(check_name("slash/no").is_err());
    }
}
