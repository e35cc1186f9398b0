//! The console's pages (maud escapes every value it renders).

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use outpost_protocol::{
    ApiTokenInfo, AuditEntry, DeploymentInfo, EnrollmentToken, JobInfo, JobSpec, JobState, NodeInfo, Org,
    OrgSettings, Role, StoredEvent,
};

use super::{PAGE, Visitor};
use crate::store::JobCounts;

pub const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{background:#1d2330;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center}\
header a{color:#cfe3ff;text-decoration:none}header .who{margin-left:auto;font-size:.85rem}\
header form{display:inline}main{padding:1rem 1.2rem}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #e3e6ea;font-size:.9rem}\
th{background:#eef1f5}.cards{display:flex;gap:1rem;margin-bottom:1rem}.card{background:#fff;padding:.8rem 1rem;border:1px solid #e3e6ea;min-width:8rem}\
.card b{font-size:1.6rem;display:block}.ok{color:#17803d}.bad{color:#b42318}.muted{color:#667085}\
pre{background:#fff;border:1px solid #e3e6ea;padding:.6rem;overflow:auto}form.inline{display:inline}\
fieldset{border:1px solid #e3e6ea;background:#fff;margin:1rem 0}label{display:block;margin:.3rem 0}\
input[type=text],input[type=password]{width:28rem;max-width:100%}.error{background:#fee4e2;border:1px solid #b42318;padding:.6rem}";

fn when(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "never".into() };
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64) else { return ms.to_string() };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn state_name(s: JobState) -> String {
    outpost_protocol::wire_name(&s)
}

fn outcome(j: &JobInfo) -> String {
    j.result.as_ref().map(|r| outpost_protocol::wire_name(&r.outcome)).unwrap_or_default()
}

fn may_operate(v: &Visitor) -> bool {
    v.caller.at_least(Role::Operator).is_ok()
}

fn layout(title: &str, v: Option<&Visitor>, body: Markup) -> Html<String> {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · Outpost" }
                link rel="stylesheet" href="/console/style.css";
            }
            body {
                header {
                    strong { "Outpost" }
                    @if let Some(v) = v {
                        a href="/console" { "Overview" }
                        a href="/console/nodes" { "Nodes" }
                        a href="/console/jobs" { "Jobs" }
                        a href="/console/deployments" { "Deployments" }
                        a href="/console/events" { "Events" }
                        a href="/console/audit" { "Audit" }
                        a href="/console/settings" { "Settings" }
                        span.who {
                            (v.caller.actor) " · "
                            form.inline method="post" action="/console/logout" {
                                input type="hidden" name="csrf" value=(v.csrf);
                                button type="submit" id="logout" { "Log out" }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    };
    Html(page.into_string())
}

pub fn error(status: StatusCode, message: &str, v: Option<&Visitor>) -> Response {
    let body = html! { p.error { (message) } p { a href="/console" { "Back to the overview" } } };
    (status, layout(&format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")), v, body))
        .into_response()
}

pub fn login(nonce: &str, problem: Option<&str>) -> Html<String> {
    layout(
        "Log in",
        None,
        html! {
            @if let Some(p) = problem { p.error id="login-error" { (p) } }
            form method="post" action="/console/login" {
                input type="hidden" name="nonce" value=(nonce);
                label { "API token " input type="password" name="token" id="token" autocomplete="off" required; }
                button type="submit" id="login" { "Log in" }
            }
            p.muted { "An API token (" code { "outpost-control api-token create" } ") or the admin token. \
                       The session ends after 8 hours, at logout, or when the token is revoked." }
        },
    )
}

fn job_rows(jobs: &[JobInfo]) -> Markup {
    html! {
        table {
            tr { th { "Job" } th { "Node" } th { "State" } th { "Outcome" } th { "Submitted" } }
            @for j in jobs {
                tr {
                    td { a href={ "/console/jobs/" (j.job_id) } { (j.job_id) } }
                    td { a href={ "/console/nodes/" (j.node_id) } { (j.node_id) } }
                    td { (state_name(j.state)) }
                    td { (outcome(j)) }
                    td { (when(Some(j.submitted_unix_ms))) }
                }
            }
        }
    }
}

pub fn overview(
    v: &Visitor,
    (online, offline): (u64, u64),
    counts: &JobCounts,
    failures: &[JobInfo],
) -> Html<String> {
    layout(
        "Overview",
        Some(v),
        html! {
            div.cards {
                div.card id="nodes-online" { b.ok { (online) } "nodes online" }
                div.card id="nodes-offline" { b.bad { (offline) } "nodes offline" }
                div.card id="jobs-queued" { b { (counts.of(JobState::Queued)) } "jobs queued" }
                div.card id="jobs-running" { b { (counts.of(JobState::Accepted)) } "jobs running" }
                div.card id="jobs-finished" { b { (counts.of(JobState::Finished)) } "jobs finished" }
                div.card id="jobs-cancelled" { b { (counts.of(JobState::Cancelled)) } "jobs cancelled" }
            }
            h2 { "Recent failures" }
            @if failures.is_empty() { p { "None." } } @else { (job_rows(failures)) }
        },
    )
}

pub fn nodes(v: &Visitor, nodes: &[NodeInfo], page: usize, more: bool) -> Html<String> {
    layout(
        "Nodes",
        Some(v),
        html! {
            table id="node-table" {
                tr { th { "Node" } th { "Host" } th { "State" } th { "Last seen" } th { "Agent" } th { "Labels" } }
                @for n in nodes {
                    tr {
                        td { a href={ "/console/nodes/" (n.node_id) } { (n.node_id) } }
                        td { (n.hostname) }
                        td {
                            @if n.revoked_unix_ms.is_some() { span.bad { "revoked" } }
                            @else if n.online { span.ok { "online" } } @else { span.bad { "offline" } }
                        }
                        td { (when(n.last_seen_unix_ms)) }
                        td { (n.last_heartbeat.as_ref().map(|h| h.agent_version.clone()).unwrap_or_default()) }
                        td { (n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")) }
                    }
                }
            }
            (pager("/console/nodes", page, more, ""))
        },
    )
}

/// `s` percent-encoded for a query string.
fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn pager(base: &str, page: usize, more: bool, extra: &str) -> Markup {
    html! {
        p {
            @if page > 0 { a href={ (base) "?page=" (page - 1) (extra) } { "← newer" } " " }
            @if more { a href={ (base) "?page=" (page.saturating_add(1)) (extra) } { "older →" } }
        }
    }
}

pub fn node(v: &Visitor, n: &NodeInfo, chain: &super::ChainCheck, recent: &[JobInfo]) -> Html<String> {
    let hb = n.last_heartbeat.as_ref();
    layout(
        &format!("Node {}", n.node_id),
        Some(v),
        html! {
            table {
                tr { th { "Organisation" } td { (n.org_id) } }
                tr { th { "Host" } td { (n.hostname) } }
                tr { th { "State" } td { @if n.online { "online" } @else { "offline" } } }
                tr { th { "Enrolled" } td { (when(Some(n.enrolled_unix_ms))) } }
                tr { th { "Last seen" } td { (when(n.last_seen_unix_ms)) } }
                tr { th { "Certificate (SHA-256)" } td { code { (n.cert_sha256) } } }
                @if let Some(at) = n.revoked_unix_ms {
                    tr { th { "Revoked" } td { span.bad { (when(Some(at))) " — its certificate is refused" } } }
                }
                tr { th { "Agent" } td { (hb.map(|h| h.agent_version.clone()).unwrap_or_default()) } }
                tr { th { "Running jobs" } td { (hb.map_or(0, |h| h.running_jobs)) } }
                tr { th { "Outbox" } td { (hb.map_or(0, |h| h.outbox_depth)) } }
                tr { th { "Labels" } td { (n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")) } }
                tr {
                    th { "Audit log" }
                    td id="audit-chain" {
                        @if let Some(why) = &chain.broken {
                            span.error { "✘ broken after entry " (chain.whole) ": " (why) }
                        } @else if chain.whole == 0 {
                            "no entries stored yet (they arrive with the node's results bundles)"
                        } @else {
                            "✔ " (chain.whole) " entries, each following the one before from the first"
                            @if chain.more { " (verified up to here; " code { "outpost-control audit verify --node" } " checks the rest)" }
                        }
                    }
                }
            }
            @if may_operate(v) {
                fieldset id="label-node" {
                    legend { "Operator labels" }
                    form method="post" action={ "/console/nodes/" (n.node_id) "/labels" } {
                        input type="hidden" name="csrf" value=(v.csrf);
                        label { "Set (key=value, …) " input type="text" name="set" id="label-set"; }
                        label { "Remove (key, …) " input type="text" name="remove" id="label-remove"; }
                        button type="submit" id="label" { "Apply" }
                    }
                }
            }
            h2 { "Recent jobs" }
            (job_rows(recent))
        },
    )
}

pub fn deployments(v: &Visitor, list: &[DeploymentInfo]) -> Html<String> {
    layout(
        "Deployments",
        Some(v),
        html! {
            @if list.is_empty() { p { "No deployments (" code { "outpost-control deploy create" } ")." } }
            @else {
                table {
                    tr { th { "Deployment" } th { "Organisation" } th { "Service" } th { "Revision" } th { "Rollout" } th { "Selector" } th { "Updated" } }
                    @for d in list {
                        tr {
                            td { a href={ "/console/deployments/" (d.org_id) "/" (d.name) } { (d.name) } }
                            td { (d.org_id) }
                            td { (d.service) }
                            td { (d.revision) }
                            td { (outpost_protocol::wire_name(&d.status)) }
                            td { code { (d.selector) } }
                            td { (when(Some(d.updated_unix_ms))) }
                        }
                    }
                }
            }
        },
    )
}

pub fn deployment(v: &Visitor, d: &DeploymentInfo) -> Html<String> {
    layout(
        &format!("Deployment {}", d.name),
        Some(v),
        html! {
            table {
                tr { th { "Organisation" } td { (d.org_id) } }
                tr { th { "Service" } td { (d.service) } }
                tr { th { "Image" } td { code { (d.spec.image) } } }
                tr { th { "Revision" } td { (d.revision) @if let Some(s) = d.stable_revision { " (last completed: " (s) ")" } } }
                tr { th { "Rollout" } td id="rollout" { (outpost_protocol::wire_name(&d.status)) @if let Some(r) = &d.reason { " — " (r) } } }
                tr { th { "Selector" } td { code { (d.selector) } } }
            }
            h2 { "Nodes" }
            table id="deployment-nodes" {
                tr { th { "Node" } th { "Phase" } th { "Desired revision" } th { "Why" } }
                @for n in &d.nodes {
                    tr {
                        td { a href={ "/console/nodes/" (n.node_id) } { (n.node_id) } }
                        td { (outpost_protocol::wire_name(&n.phase)) }
                        td { (n.desired_revision.map(|r| r.to_string()).unwrap_or_default()) }
                        td { (n.reason.clone().unwrap_or_default()) }
                    }
                }
            }
        },
    )
}

pub fn events(v: &Visitor, events: &[StoredEvent]) -> Html<String> {
    layout(
        "Relay events",
        Some(v),
        html! {
            p.muted { "The " (events.len()) " most recent events the nodes' relays delivered." }
            table {
                tr { th { "Received" } th { "Node" } th { "Watch" } th { "Key" } th { "Size" } th { "Accepted" } th { "Jobs started" } }
                @for e in events {
                    tr {
                        td { (when(Some(e.received_unix_ms))) }
                        td { a href={ "/console/nodes/" (e.node_id) } { (e.node_id) } }
                        td { (e.event.watch) }
                        td { code { (e.event.key) } }
                        td { (e.event.size) }
                        td { @if e.event.accepted { "yes" } @else { span.bad { "no" } " " (e.event.reason.clone().unwrap_or_default()) } }
                        td { (e.triggered_jobs.join(", ")) }
                    }
                }
            }
        },
    )
}

pub fn settings(
    v: &Visitor,
    orgs: &[Org],
    org: Option<(&str, &OrgSettings)>,
    tokens: &[ApiTokenInfo],
    created: Option<&EnrollmentToken>,
) -> Html<String> {
    let admin = v.caller.at_least(Role::Admin).is_ok();
    layout(
        "Settings",
        Some(v),
        html! {
            @if v.caller.org_filter().is_none() {
                form method="get" action="/console/settings" {
                    label { "Organisation "
                        select name="org" {
                            @for o in orgs { option value=(o.id) selected[Some(o.id.as_str()) == org.map(|o| o.0)] { (o.name) " (" (o.id) ")" } }
                        }
                    }
                    button type="submit" { "Show" }
                }
            }
            @if let Some((org, s)) = org {
                h2 { "Organisation settings" }
                p.muted {
                    "Revision " (s.revision) @if s.updated_unix_ms > 0 { ", changed " (when(Some(s.updated_unix_ms))) }
                    ". Nodes hear of a change in their next poll; a new default profile applies at a node's next start."
                }
                table id="org-settings" {
                    tr { th { "Default profile" } td { (s.default_profile.as_deref().unwrap_or("none (each node's own)")) } }
                    @for f in outpost_protocol::feature::ALL {
                        tr { th { (f) } td { @if s.enabled(f) { "on" } @else { "off" } } }
                    }
                }
                @if admin {
                    fieldset {
                        legend { "Change the settings" }
                        form method="post" action="/console/settings/org" {
                            input type="hidden" name="csrf" value=(v.csrf);
                            input type="hidden" name="org_id" value=(org);
                            input type="hidden" name="revision" value=(s.revision);
                            label { "Default profile "
                                select name="default_profile" {
                                    option value="" selected[s.default_profile.is_none()] { "none" }
                                    @for p in outpost_protocol::ORG_DEFAULT_PROFILES {
                                        option value=(p) selected[s.default_profile.as_deref() == Some(*p)] { (p) }
                                    }
                                }
                            }
                            @for f in outpost_protocol::feature::ALL {
                                label.inline { input type="checkbox" id=(format!("off-{f}")) name=(format!("off_{f}")) value="on" checked[!s.enabled(f)]; " " (f) " off" }
                            }
                            button type="submit" id="save-org-settings" { "Save" }
                        }
                    }
                }
                @if let Some(t) = created {
                    p.error id="enrollment-token" { "Enrollment token (shown only now): " code { (t.token) } }
                }
                fieldset {
                    legend { "New enrollment token" }
                    form method="post" action="/console/settings/enrollment-token" {
                        input type="hidden" name="csrf" value=(v.csrf);
                        input type="hidden" name="org_id" value=(org);
                        label { "Valid for (hours, at most 168) " input type="text" name="hours" value="1"; }
                        button type="submit" id="create-enrollment-token" { "Create" }
                    }
                }
                h2 { "API tokens of " (org) }
                p.muted { "Create and revoke them with " code { "outpost-control api-token" } "." }
                table {
                    tr { th { "Id" } th { "Name" } th { "Role" } th { "Created by" } th { "Expires" } th { "Revoked" } }
                    @for t in tokens {
                        tr {
                            td { (t.id) } td { (t.name) } td { (t.role) } td { (t.created_by) }
                            td { (when(Some(t.expires_unix_ms))) }
                            td { (t.revoked_unix_ms.map(|r| when(Some(r))).unwrap_or_default()) }
                        }
                    }
                }
            }
        },
    )
}

pub fn jobs(v: &Visitor, jobs: &[JobInfo], page: usize, state: &str, node: &str) -> Html<String> {
    let extra = format!("&state={}&node={}", query_value(state), query_value(node));
    layout(
        "Jobs",
        Some(v),
        html! {
            form method="get" action="/console/jobs" {
                label.inline { "State " input type="text" name="state" value=(state) placeholder="queued, accepted, finished, cancelled"; }
                label.inline { "Node " input type="text" name="node" value=(node); }
                button type="submit" { "Filter" }
            }
            @if may_operate(v) {
                fieldset id="submit-job" {
                    legend { "Submit a container job" }
                    form method="post" action="/console/jobs" {
                        input type="hidden" name="csrf" value=(v.csrf);
                        label { "Node " input type="text" name="node_id" id="node_id" required; }
                        label { "Image (sha256:…) " input type="text" name="image" id="image" required; }
                        label { "Command (sh -c) " input type="text" name="command" id="command"; }
                        button type="submit" id="submit" { "Submit" }
                    }
                }
            }
            (job_rows(jobs))
            (pager("/console/jobs", page, jobs.len() >= PAGE, &extra))
        },
    )
}

pub fn job(v: &Visitor, j: &JobInfo) -> Html<String> {
    let what = match &j.spec {
        JobSpec::Container(c) => format!("container {} {}", c.image, c.command.join(" ")),
        JobSpec::Inference(i) => format!("{} with model {}", j.spec.kind_name(), i.model),
    };
    let open = matches!(j.state, JobState::Queued | JobState::Accepted);
    layout(
        &format!("Job {}", j.job_id),
        Some(v),
        html! {
            table {
                tr { th { "State" } td id="job-state" { (state_name(j.state)) } }
                tr { th { "Node" } td { a href={ "/console/nodes/" (j.node_id) } { (j.node_id) } } }
                tr { th { "Organisation" } td { (j.org_id) } }
                tr { th { "What" } td { code { (what) } } }
                tr { th { "Submitted" } td { (when(Some(j.submitted_unix_ms))) } }
                tr { th { "Attempt" } td { (j.attempt) } }
                @if let Some(s) = &j.selector { tr { th { "Placed by selector" } td { code { (s) } } } }
                @if let Some(r) = &j.result {
                    tr { th { "Outcome" } td id="job-outcome" { (outpost_protocol::wire_name(&r.outcome)) } }
                    tr { th { "Exit code" } td { (r.exit_code.map(|c| c.to_string()).unwrap_or_default()) } }
                    @if let Some(e) = &r.error { tr { th { "Error" } td { (e) } } }
                    tr { th { "Finished" } td { (when(r.timings.finished_unix_ms)) } }
                    tr { th { "Provenance" } td { "reported by node " (j.node_id) " under idempotency key " code { (r.idempotency_key) } } }
                }
            }
            @if let Some(r) = &j.result {
                @if r.sealed.is_some() { p { "The output is sealed for the job's recipients: open it with " code { "outpost-control job result --identity" } "." } }
                h2 { "stdout (tail)" } pre id="stdout" { (r.stdout_tail) }
                h2 { "stderr (tail)" } pre { (r.stderr_tail) }
            }
            @if open && may_operate(v) {
                form method="post" action={ "/console/jobs/" (j.job_id) "/cancel" } {
                    input type="hidden" name="csrf" value=(v.csrf);
                    button type="submit" id="cancel" { "Cancel this job" }
                }
            }
        },
    )
}

pub fn audit(v: &Visitor, entries: &[AuditEntry]) -> Html<String> {
    layout(
        "Audit trail",
        Some(v),
        html! {
            p.muted {
                "The most recent " (entries.len()) " entries, newest last. Each node's own hash-chained audit log, \
                 as its results bundles brought it, is verified from its first entry on the node's page."
            }
            table {
                tr { th { "#" } th { "Time" } th { "Actor" } th { "Action" } th { "Detail" } }
                @for e in entries {
                    tr { td { (e.seq) } td { (when(Some(e.unix_ms))) } td { (e.actor) } td { (e.action) } td { (e.detail) } }
                }
            }
        },
    )
}
