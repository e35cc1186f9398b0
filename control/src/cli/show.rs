//! Human-readable output of the operator commands: aligned tables and detail views. Scripts
//! use `--json` instead, which prints the API's own types.

use outpost_protocol::{
    ApiTokenList, AuditList, InferenceKind, JobInfo, JobList, JobSpec, JobState, NodeInfo, NodeList, Org,
    Outcome,
};

/// Prints rows under headers, each column as wide as its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn orgs(orgs: &[Org]) {
    let rows = orgs
        .iter()
        .map(|o| {
            vec![o.id.clone(), o.name.clone(), o.signing_key.key_id.clone(), when(Some(o.created_unix_ms))]
        })
        .collect::<Vec<_>>();
    table(&["ID", "NAME", "SIGNING KEY", "CREATED"], &rows);
}

pub fn org_settings(org_id: &str, s: &outpost_protocol::OrgSettings) {
    println!("organisation     {org_id}");
    println!("revision         {}{}", s.revision, if s.revision == 0 { " (never set)" } else { "" });
    println!(
        "default profile  {}",
        s.default_profile
            .as_deref()
            .unwrap_or("none (each node's own; on-prem unless its file says otherwise)")
    );
    for f in outpost_protocol::feature::ALL {
        println!("{:<16} {}", f, if s.enabled(f) { "on" } else { "off" });
    }
    if s.updated_unix_ms > 0 {
        println!("updated          {}", when(Some(s.updated_unix_ms)));
    }
}

/// A rotation just started (`org rotate-key`, `ca rotate`).
pub fn rotation(what: &str, r: &outpost_protocol::RotateResponse) {
    println!("new {what}  {}", r.new_id);
    println!("switch at       {}", when(Some(r.switch_unix_ms)));
    if r.nodes_left_behind.is_empty() {
        println!("every node can learn of it; they trust both until the switch");
    } else {
        println!(
            "left behind     {} node(s) cannot learn of it and must enroll again after the switch: {}",
            r.nodes_left_behind.len(),
            r.nodes_left_behind.join(", ")
        );
    }
}

pub fn jobs(list: &JobList) {
    let rows = list
        .jobs
        .iter()
        .map(|j| {
            let (outcome, exit) = j.result.as_ref().map_or((String::new(), String::new()), |r| {
                (outcome_name(r.outcome).to_owned(), r.exit_code.map(|c| c.to_string()).unwrap_or_default())
            });
            vec![
                j.job_id.clone(),
                j.node_id.clone(),
                j.seq.to_string(),
                state_name(j.state).to_owned(),
                outcome,
                exit,
                when(Some(j.submitted_unix_ms)),
            ]
        })
        .collect::<Vec<_>>();
    table(&["JOB", "NODE", "SEQ", "STATE", "OUTCOME", "EXIT", "SUBMITTED"], &rows);
}

pub fn job(j: &JobInfo) {
    println!("job:       {} (attempt {}, seq {})", j.job_id, j.attempt, j.seq);
    println!("node:      {} (org {})", j.node_id, j.org_id);
    match &j.spec {
        JobSpec::Container(c) => {
            println!("image:     {}", c.image);
            println!("command:   {}", c.command.join(" "));
        }
        JobSpec::Inference(i) => {
            println!("kind:      {}", j.spec.kind_name());
            println!("model:     {}", i.model);
        }
    }
    println!("state:     {}", state_name(j.state));
    if let Some(sel) = &j.selector {
        let how = j.placement.map(|p| if p == outpost_protocol::Placement::Any { "any" } else { "each" });
        println!("placed:    {} node of `{sel}`", how.unwrap_or("-"));
    }
    if let Some(g) = &j.group_id {
        println!("group:     {g}");
    }
    for a in &j.superseded {
        let late = a.late_result.as_ref().map_or("no result".to_owned(), |r| {
            format!("late result {} (not counted)", outcome_name(r.outcome))
        });
        println!("attempt {} on node {} superseded: {} — {late}", a.attempt, a.node_id, a.reason);
    }
    if let Some(t) = j.cancel_requested_unix_ms {
        println!("cancel:    asked {}", when(Some(t)));
    }
    println!("submitted: {}", when(Some(j.submitted_unix_ms)));
    if let Some(t) = j.accepted_unix_ms {
        println!("accepted:  {}", when(Some(t)));
    }
    if let Some(t) = j.awaiting_site_approval_since_unix_ms {
        println!("waiting:   for site approval since {} (`outpost approvals` on the node)", when(Some(t)));
    }
    let Some(r) = &j.result else { return };
    println!("outcome:   {}", outcome_name(r.outcome));
    if let Some(code) = r.exit_code {
        println!("exit code: {code}");
    }
    if let Some(e) = &r.error {
        println!("error:     {e}");
    }
    if let (Some(s), Some(f)) = (r.timings.started_unix_ms, r.timings.finished_unix_ms) {
        println!("ran for:   {} ms", f.saturating_sub(s));
    }
    if let Some(i) = &r.inference {
        println!("engine:    {} ({})", i.engine, i.engine_version);
        println!("model:     {}", i.model_digest);
        match i.kind {
            InferenceKind::Generate => println!(
                "tokens:    {} prompt, {} generated ({}), first token {:.1} ms, {:.1} tokens/s",
                i.prompt_tokens,
                i.completion_tokens,
                i.finish.as_deref().unwrap_or("-"),
                i.time_to_first_token_us as f64 / 1000.0,
                i.tokens_per_s()
            ),
            InferenceKind::Embed => {
                println!(
                    "vectors:   {} of dimension {} ({} tokens)",
                    i.vectors, i.dimensions, i.prompt_tokens
                )
            }
        }
    }
    for o in &r.outputs {
        println!("output:    {} ({} bytes, sha256 {})", o.key, o.size, o.sha256);
    }
    if r.sealed.is_some() {
        println!(
            "sealed:    output tails and bodies, for the job's recipients only (`job result {} --identity FILE`)",
            j.job_id
        );
    }
    let tail = if r.output_truncated { " (tail)" } else { "" };
    if !r.stdout_tail.is_empty() {
        println!("--- stdout{tail} ---\n{}", r.stdout_tail.trim_end());
    }
    if !r.stderr_tail.is_empty() {
        println!("--- stderr{tail} ---\n{}", r.stderr_tail.trim_end());
    }
}

pub fn nodes(list: &NodeList) {
    let rows = list
        .nodes
        .iter()
        .map(|n| {
            let version = n.last_heartbeat.as_ref().map(|h| h.agent_version.clone()).unwrap_or_default();
            vec![
                n.node_id.clone(),
                n.org_id.clone(),
                n.hostname.clone(),
                version,
                if n.revoked_unix_ms.is_some() {
                    "revoked"
                } else if n.online {
                    "online"
                } else {
                    "offline"
                }
                .into(),
                ago(n.last_seen_unix_ms),
                labels(&n.labels),
            ]
        })
        .collect::<Vec<_>>();
    table(&["NODE", "ORG", "HOSTNAME", "AGENT", "STATE", "LAST SEEN", "LABELS"], &rows);
}

fn labels(l: &outpost_protocol::Labels) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub fn node(n: &NodeInfo) {
    println!("node:      {} ({})", n.node_id, n.hostname);
    println!("org:       {}", n.org_id);
    println!("enrolled:  {}", when(Some(n.enrolled_unix_ms)));
    println!("cert:      sha256 {}", n.cert_sha256);
    if let Some(at) = n.revoked_unix_ms {
        println!("revoked:   {} (its certificate is refused)", when(Some(at)));
    }
    println!("last seen: {} ({})", ago(n.last_seen_unix_ms), if n.online { "online" } else { "offline" });
    println!("labels:    {}", labels(&n.labels));
    if !n.operator_labels.is_empty() {
        println!("           (set by operators: {})", labels(&n.operator_labels));
    }
    let Some(hb) = &n.last_heartbeat else { return };
    let inv = &hb.inventory;
    println!("agent:     {} ({} running, outbox {})", hb.agent_version, hb.running_jobs, hb.outbox_depth);
    println!(
        "host:      {} {} {}, {} CPUs ({})",
        inv.hostname, inv.os, inv.kernel, inv.cpu_count, inv.cpu_model
    );
    println!(
        "memory:    {} MiB total, {} MiB available",
        inv.memory_total_bytes >> 20,
        inv.memory_available_bytes >> 20
    );
    for d in &inv.disks {
        println!(
            "disk:      {} {} of {} MiB free",
            d.mount_point,
            d.available_bytes >> 20,
            d.total_bytes >> 20
        );
    }
    for g in &inv.gpus {
        println!("gpu:       {} {} at {}", g.vendor, g.name, g.device);
    }
    println!("docker:    {}", inv.docker_version.as_deref().unwrap_or("unavailable"));
    println!("images:    {}", inv.images.len());
}

pub fn api_tokens(list: &ApiTokenList) {
    let rows = list
        .tokens
        .iter()
        .map(|t| {
            let state = match t.revoked_unix_ms {
                Some(at) => format!("revoked {}", when(Some(at))),
                None => String::new(),
            };
            vec![
                t.id.clone(),
                t.name.clone(),
                t.role.to_string(),
                when(Some(t.created_unix_ms)),
                when(Some(t.expires_unix_ms)),
                t.created_by.clone(),
                state,
            ]
        })
        .collect::<Vec<_>>();
    table(&["ID", "NAME", "ROLE", "CREATED", "EXPIRES", "CREATED BY", "REVOKED"], &rows);
}

pub fn audit(list: &AuditList) {
    let rows = list
        .entries
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                when(Some(e.unix_ms)),
                e.actor.clone(),
                e.action.clone(),
                e.detail.clone(),
            ]
        })
        .collect::<Vec<_>>();
    table(&["SEQ", "TIME", "ACTOR", "ACTION", "DETAIL"], &rows);
}

pub fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Accepted => "accepted",
        JobState::Finished => "finished",
        JobState::Cancelled => "cancelled",
    }
}

pub fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::TimedOut => "timed_out",
        Outcome::Rejected => "rejected",
        Outcome::Error => "error",
        Outcome::Cancelled => "cancelled",
        Outcome::Refused => "refused",
        Outcome::NotApproved => "not_approved",
    }
}

/// Unix milliseconds as RFC 3339 (UTC), or `-`.
pub fn when(ms: Option<u64>) -> String {
    let formatted = ms.and_then(|ms| {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
        t.replace_millisecond(0).ok()?.format(&time::format_description::well_known::Rfc3339).ok()
    });
    formatted.unwrap_or_else(|| "-".into())
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(t) => {
            let secs = crate::clock::Clock::system().now_ms().saturating_sub(t) / 1000;
            match secs {
                0..120 => format!("{secs} s ago"),
                120..7200 => format!("{} min ago", secs / 60),
                _ => format!("{} h ago", secs / 3600),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(when(Some(1_700_000_000_123)), "2023-11-14T22:13:20Z");
        assert_eq!(when(None), "-");
    }
}
