//! The operator commands: each one API call through [`Client`], printed as a table or JSON.
//! Create commands print only the new id (or token) on stdout, so `$(…)` captures it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde::Serialize;

use super::relay::{self, EventsCommand, TriggerCommand};
use super::{
    ApiTokenCommand, AuditCommand, CaCommand, Command, Global, JobCommand, NodeCommand, OrgCommand,
    TokenCommand, show, submit,
};
use crate::client::{Client, EventsQuery, JobsQuery};
use crate::data_dir::DataDir;

/// How often `job wait` asks.
const WAIT_INTERVAL: Duration = Duration::from_millis(500);

fn client(g: &Global) -> anyhow::Result<Client> {
    let dir = DataDir::new(&g.data_dir);
    let token = match &g.token {
        Some(t) => t.trim().to_owned(),
        None => {
            let path = dir.admin_token();
            std::fs::read_to_string(&path)
                .with_context(|| format!("no --token given and cannot read {}", path.display()))?
                .trim()
                .to_owned()
        }
    };
    let ca_path = g.ca_file.clone().unwrap_or_else(|| dir.ca_cert());
    let mut ca = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("cannot read the CA certificate {} (give --ca-file)", ca_path.display()))?;
    // During a CA rotation the server presents the new CA's certificate from the switch on.
    if g.ca_file.is_none()
        && let Ok(next) = std::fs::read_to_string(dir.ca_next_cert())
    {
        ca.push_str(&next);
    }
    Client::new(&g.url, &ca, &token)
}

fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

pub(super) async fn operator(g: &Global, command: Command) -> anyhow::Result<ExitCode> {
    let c = client(g)?;
    match command {
        Command::Org(OrgCommand::Create { name }) => {
            let org = c.create_org(&name).await?;
            print(g.json, &org, |o| {
                eprintln!("created organisation {:?}, job-signing key {}", o.name, o.signing_key.key_id);
                println!("{}", o.id);
            })?;
        }
        Command::Org(OrgCommand::List) => {
            let orgs = c.list_orgs().await?;
            print(g.json, &orgs, |o| show::orgs(o))?;
        }
        Command::Org(OrgCommand::Settings {
            org,
            default_profile,
            clear_default_profile,
            disable,
            enable,
        }) => {
            let held = c.org_settings(&org).await?;
            let changes = default_profile.is_some()
                || clear_default_profile
                || !disable.is_empty()
                || !enable.is_empty();
            let settings = if changes {
                if let Some(both) = disable.iter().find(|f| enable.contains(f)) {
                    anyhow::bail!("--disable {both} and --enable {both} contradict each other");
                }
                let mut off = held.features_off.clone();
                off.retain(|f| !enable.contains(f));
                off.extend(disable);
                let req = outpost_protocol::PutOrgSettings {
                    default_profile: if clear_default_profile {
                        None
                    } else {
                        default_profile.or(held.default_profile.clone())
                    },
                    features_off: off,
                    // Lost updates are refused: someone else's change in between is a 409.
                    revision: Some(held.revision),
                };
                c.put_org_settings(&org, &req).await?
            } else {
                held
            };
            print(g.json, &settings, |s| show::org_settings(&org, s))?;
        }
        Command::Ca(CaCommand::Rotate { overlap, force }) => {
            let req = outpost_protocol::RotateRequest { overlap_secs: Some(overlap.as_secs()), force };
            let r = c.rotate_ca(&req).await?;
            print(g.json, &r, |r| show::rotation("CA", r))?;
        }
        Command::Org(OrgCommand::RotateKey { org, overlap, force }) => {
            let req = outpost_protocol::RotateRequest { overlap_secs: Some(overlap.as_secs()), force };
            let r = c.rotate_org_key(&org, &req).await?;
            print(g.json, &r, |r| show::rotation("signing key", r))?;
        }
        Command::ApiToken(ApiTokenCommand::Create { org, name, role, ttl }) => {
            let t = c.create_api_token(&org, &name, role, ttl.map(|d| d.as_secs())).await?;
            print(g.json, &t, |t| {
                eprintln!(
                    "created API token {} ({}, role {}) for organisation {}; it is shown only this once",
                    t.info.name, t.info.id, t.info.role, t.info.org_id
                );
                println!("{}", t.token);
            })?;
        }
        Command::ApiToken(ApiTokenCommand::List { org }) => {
            let list = c.list_api_tokens(&org).await?;
            print(g.json, &list, show::api_tokens)?;
        }
        Command::ApiToken(ApiTokenCommand::Revoke { org, token_id }) => {
            let t = c.revoke_api_token(&org, &token_id).await?;
            print(g.json, &t, |t| eprintln!("revoked API token {} ({})", t.name, t.id))?;
        }
        Command::Token(TokenCommand::Create { org, ttl }) => {
            let t = c.create_token(&org, ttl.map(|d| d.as_secs())).await?;
            print(g.json, &t, |t| println!("{}", t.token))?;
        }
        Command::Job(JobCommand::Submit(args)) => {
            let req = submit::submit_request(*args)?;
            if req.placement == Some(outpost_protocol::Placement::Each) {
                let group = c.submit_group(&req).await?;
                print(g.json, &group, |gr| {
                    eprintln!("queued {} jobs (one per node matching `{}`)", gr.jobs.len(), gr.selector);
                    println!("{}", gr.group_id);
                })?;
            } else {
                let job = c.submit(&req).await?;
                print(g.json, &job, |j| {
                    eprintln!("queued job for node {} (seq {})", j.node_id, j.seq);
                    println!("{}", j.job_id);
                })?;
            }
        }
        Command::Job(JobCommand::Cancel { job_id }) => {
            let job = c.cancel(&job_id).await?;
            print(g.json, &job, |j| match j.state {
                outpost_protocol::JobState::Cancelled => {
                    eprintln!("cancelled job {} (it had not started)", j.job_id)
                }
                _ => eprintln!(
                    "asked node {} to stop job {}; it reports `cancelled` when done",
                    j.node_id, j.job_id
                ),
            })?;
        }
        Command::Job(JobCommand::Logs { job_id, follow, identity }) => {
            let keys = identity.as_deref().map(read_identity).transpose()?;
            return logs(g, &c, &job_id, follow, keys).await;
        }
        Command::Job(JobCommand::Get { job_id }) => print(g.json, &c.job(&job_id).await?, show::job)?,
        Command::Job(JobCommand::Result { job_id, identity, sealed }) => {
            return result(g, &c, &job_id, identity.as_deref(), sealed).await;
        }
        Command::Job(JobCommand::List { node, state, group, limit }) => {
            let q = JobsQuery { node_id: node, state, group_id: group, limit };
            print(g.json, &c.jobs(&q).await?, show::jobs)?;
        }
        Command::Job(JobCommand::Wait { job_id, group, timeout }) => match (job_id, group) {
            (_, Some(group)) => return wait_group(g, &c, &group, timeout).await,
            (Some(job_id), None) => return wait(g, &c, &job_id, timeout).await,
            (None, None) => return Err(anyhow!("give a JOB_ID or --group GROUP_ID")),
        },
        Command::Node(NodeCommand::List { selector, org }) => {
            print(g.json, &c.nodes(selector.as_deref(), org.as_deref()).await?, show::nodes)?;
        }
        Command::Node(NodeCommand::Label { node_id, set, remove }) => {
            let mut req = outpost_protocol::LabelNodeRequest { remove, ..Default::default() };
            for pair in &set {
                let (k, v) =
                    outpost_protocol::selector::parse_label_assignment(pair).map_err(|e| anyhow!(e))?;
                req.set.insert(k, v);
            }
            if req.set.is_empty() && req.remove.is_empty() {
                return Err(anyhow!("nothing to do: give KEY=VALUE to set and/or --remove KEY"));
            }
            print(g.json, &c.label_node(&node_id, &req).await?, show::node)?;
        }
        Command::Node(NodeCommand::Revoke { node_id }) => {
            let node = c.revoke_node(&node_id).await?;
            print(g.json, &node, |n| {
                println!("node {} revoked: its certificate is refused from now on", n.node_id);
                println!(
                    "to bring the machine back, enroll it again with a new token (it gets a new node id)"
                );
            })?;
        }
        Command::Node(NodeCommand::EnrollOffline { org, request, out, control_url }) => {
            let text = std::fs::read_to_string(&request)
                .with_context(|| format!("cannot read the request file {}", request.display()))?;
            let request: outpost_protocol::OfflineEnrollRequest = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an offline enrollment request", request.display()))?;
            let params = outpost_protocol::OfflineEnrollParams {
                request,
                control_url: control_url.unwrap_or_else(|| g.url.clone()),
            };
            let signed = c.enroll_offline(&org, &params).await?;
            let enrollment: outpost_protocol::OfflineEnrollment = serde_json::from_str(&signed.payload)?;
            let tmp = out.with_extension("partial");
            std::fs::write(&tmp, serde_json::to_string_pretty(&signed)?)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, &out).with_context(|| format!("cannot write {}", out.display()))?;
            print(g.json, &enrollment.enrollment.node_id, |id| {
                println!("{id}");
                eprintln!(
                    "enrolled node {id} in org {}; carry {} to the node: `outpost enroll --from FILE --ca-fingerprint SHA256`",
                    enrollment.enrollment.org_id,
                    out.display()
                );
            })?;
        }
        Command::Node(NodeCommand::Get { node_id }) => print(g.json, &c.node(&node_id).await?, show::node)?,
        Command::Events(EventsCommand::List { node, org, after, limit }) => {
            // With a node, --after is its seq; across nodes, the arrival cursor.
            let (after_seq, cursor) = if node.is_some() { (after, None) } else { (None, after) };
            let q = EventsQuery {
                org_id: org,
                node_id: node,
                after_seq,
                cursor,
                limit: Some(limit),
                ..EventsQuery::default()
            };
            print(g.json, &c.events(&q).await?, relay::events)?;
        }
        Command::Events(EventsCommand::Tail { node, count, last }) => {
            return relay::tail(&c, g.json, node, count, last).await;
        }
        Command::Trigger(TriggerCommand::Create(args)) => {
            let req = relay::trigger_request(*args)?;
            let t = c.create_trigger(&req).await?;
            print(g.json, &t, |t| {
                eprintln!("created trigger {:?} in organisation {}", t.name, t.org_id);
                println!("{}", t.trigger_id);
            })?;
        }
        Command::Trigger(TriggerCommand::List { org }) => {
            print(g.json, &c.triggers(org.as_deref()).await?, relay::triggers)?;
        }
        Command::Trigger(TriggerCommand::Get { trigger_id }) => {
            let t = c.trigger(&trigger_id).await?;
            println!("{}", serde_json::to_string_pretty(&t)?);
        }
        Command::Trigger(TriggerCommand::Delete { trigger_id }) => {
            let t = c.delete_trigger(&trigger_id).await?;
            print(g.json, &t, |t| eprintln!("deleted trigger {} ({})", t.trigger_id, t.name))?;
        }
        Command::Audit(AuditCommand::List { limit, node: None }) => {
            print(g.json, &c.audit(limit).await?, show::audit)?;
        }
        Command::Audit(AuditCommand::List { limit, node: Some(node) }) => {
            let entries = node_audit_tail(&c, &node, limit).await?;
            let list = outpost_protocol::NodeAuditList { node_id: node, entries };
            print(g.json, &list, |l| {
                for e in &l.entries {
                    println!("{:>6}  {}  {:<24} {}", e.seq, e.unix_ms, e.action, e.detail);
                }
            })?;
        }
        Command::Audit(AuditCommand::Verify { node }) => return verify_node_audit(&c, &node, g.json).await,
        Command::Deploy(d) => return super::deploy::run(&c, g.json, d).await,
        Command::Bundle(b) => return super::bundle::run(&c, g.json, b).await,
        Command::Serve { .. }
        | Command::Migrate { .. }
        | Command::MigrateStore { .. }
        | Command::Ca(_)
        | Command::Doctor { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => {
            return Err(anyhow!("not an operator command"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether a job has ended: a result is stored, or it was cancelled before its node had it.
fn ended(job: &outpost_protocol::JobInfo) -> bool {
    job.result.is_some()
        || (job.state == outpost_protocol::JobState::Cancelled && job.accepted_unix_ms.is_none())
}

/// Asks until every job of the group has ended; 0 then, 1 on timeout.
async fn wait_group(g: &Global, c: &Client, group_id: &str, timeout: Duration) -> anyhow::Result<ExitCode> {
    let deadline = Instant::now() + timeout;
    loop {
        let group = c.group(group_id).await?;
        let open = group.jobs.iter().filter(|j| !ended(j)).count();
        if open == 0 {
            print(g.json, &group, |gr| show::jobs(&outpost_protocol::JobList { jobs: gr.jobs.clone() }))?;
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() + WAIT_INTERVAL > deadline {
            eprintln!(
                "error: {open} of {} jobs of group {group_id} have not ended within {}s; see `job list --group {group_id}`",
                group.jobs.len(),
                timeout.as_secs()
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(WAIT_INTERVAL).await;
    }
}

/// How long `job logs` without --follow waits for a node that does not answer.
const LOGS_ANSWER_WAIT: Duration = Duration::from_secs(60);

/// Prints the job's output as it arrives; 0 once the stream is complete, 1 when the node did
/// not answer (without --follow) within [`LOGS_ANSWER_WAIT`].
async fn logs(
    g: &Global,
    c: &Client,
    job_id: &str,
    follow: bool,
    keys: Option<String>,
) -> anyhow::Result<ExitCode> {
    use outpost_protocol::LogSource;
    use std::io::Write;
    let started = Instant::now();
    let mut after = 0u64;
    let mut told_refused = false;
    let mut told_tail = false;
    let mut told_sealed = false;
    let mut opener = keys.map(|keys| Opener { keys, pending: String::new() });
    let mut attempt = None;
    loop {
        let l = c.logs(job_id, after, follow, 20).await?;
        if attempt.is_some_and(|a| a != l.attempt) {
            // Placed again (its node died): the new attempt's output starts from its beginning.
            if !g.json {
                eprintln!("(job {} moved to attempt {} on node {})", l.job_id, l.attempt, l.node_id);
            }
            attempt = Some(l.attempt);
            after = 0;
            continue;
        }
        attempt = Some(l.attempt);
        if g.json {
            println!("{}", serde_json::to_string(&l)?);
        } else {
            if l.offset > after {
                eprintln!(
                    "[... {} bytes dropped: the control plane keeps the last 1 MiB ...]",
                    l.offset - after
                );
            }
            if let Some(why) = &l.refused
                && !told_refused
            {
                told_refused = true;
                eprintln!("node {} does not send live logs: {why}", l.node_id);
                if !l.done {
                    eprintln!("waiting for the job to end to show its result's output tails");
                }
            }
            if l.source == LogSource::ResultTail && !told_tail {
                told_tail = true;
                eprintln!("(job {} attempt {} has ended: its result's output tails)", l.job_id, l.attempt);
            }
            let text = match (&mut opener, l.source) {
                (Some(o), LogSource::ResultTail) => o.result_tails(c, job_id, &l.data).await?,
                (Some(o), _) => o.feed(&l.data)?,
                (None, LogSource::Live)
                    if told_sealed || l.data.contains(SEALED_BEGIN) || l.data.contains(SEALED_END) =>
                {
                    if !told_sealed {
                        told_sealed = true;
                        eprintln!(
                            "(job {job_id}'s output is sealed for its recipients: give --identity FILE to read it)"
                        );
                    }
                    String::new()
                }
                (None, _) => l.data.clone(),
            };
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        after = l.next;
        if l.done {
            if let Some(note) = &l.note
                && !g.json
            {
                eprintln!("({note})");
            }
            return Ok(ExitCode::SUCCESS);
        }
        if !follow && l.source == LogSource::Pending && started.elapsed() > LOGS_ANSWER_WAIT {
            eprintln!(
                "node {} has not answered within {} s; is it online? (`outpost-control node get {}`)",
                l.node_id,
                LOGS_ANSWER_WAIT.as_secs(),
                l.node_id
            );
            return Ok(ExitCode::FAILURE);
        }
    }
}

/// Asks until the job has ended; 0 once it has, 1 on timeout.
async fn wait(g: &Global, c: &Client, job_id: &str, timeout: Duration) -> anyhow::Result<ExitCode> {
    let deadline = Instant::now() + timeout;
    loop {
        let job = c.job(job_id).await?;
        if ended(&job) {
            print(g.json, &job, show::job)?;
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() + WAIT_INTERVAL > deadline {
            eprintln!(
                "error: no result for job {job_id} within {}s (state: {}); is node {} online? see `node get {}`",
                timeout.as_secs(),
                show::state_name(job.state),
                job.node_id,
                job.node_id
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(WAIT_INTERVAL).await;
    }
}

use outpost_protocol::seal::{ARMOUR_BEGIN as SEALED_BEGIN, ARMOUR_END as SEALED_END};

/// The text of an age identity file (`--identity`).
fn read_identity(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read the identity file {}", path.display()))
}

/// Opens a sealed job's output as it arrives: live, a run of ASCII-armoured age files (one per
/// piece the node sent); ended, the sealed result's tails.
struct Opener {
    /// The identity file's text.
    keys: String,
    /// Received text not yet part of a whole age file.
    pending: String,
}

impl Opener {
    /// The plaintext of every age file `text` completes. Text before the first file's start
    /// (the control plane's window may begin mid-file) is skipped.
    fn feed(&mut self, text: &str) -> anyhow::Result<String> {
        self.pending.push_str(text);
        let mut out = String::new();
        while let Some(start) = self.pending.find(SEALED_BEGIN) {
            let Some(len) = self.pending[start..].find(SEALED_END) else {
                self.pending.drain(..start);
                return Ok(out);
            };
            let stop = start + len + SEALED_END.len();
            let plain = outpost_protocol::seal::open(&self.pending[start..stop], &self.keys)?;
            out.push_str(&String::from_utf8_lossy(&plain));
            self.pending.drain(..stop);
        }
        // No start of a file in what is left: keep only what could be the start of a marker.
        let keep = self.pending.len().saturating_sub(SEALED_BEGIN.len());
        let cut = (keep..=self.pending.len()).find(|&i| self.pending.is_char_boundary(i)).unwrap_or(0);
        self.pending.drain(..cut);
        Ok(out)
    }

    /// An ended job's output: its sealed result's tails opened, or `data` as the control plane
    /// sent it when the result is not sealed.
    async fn result_tails(&self, c: &Client, job_id: &str, data: &str) -> anyhow::Result<String> {
        let job = c.job(job_id).await?;
        match job.result.filter(|r| r.sealed.is_some()) {
            Some(r) => {
                let r = outpost_protocol::seal::open_report(&r, &self.keys)?;
                let mut text = r.stdout_tail;
                if !r.stderr_tail.is_empty() && !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&r.stderr_tail);
                Ok(text)
            }
            None => Ok(data.to_owned()),
        }
    }
}

/// `job result`: the job with its result, a sealed one opened with `identity` (or printed as
/// stored with `sealed`); 1 when there is no result yet.
async fn result(
    g: &Global,
    c: &Client,
    job_id: &str,
    identity: Option<&std::path::Path>,
    sealed: bool,
) -> anyhow::Result<ExitCode> {
    let mut job = c.job(job_id).await?;
    let Some(report) = &job.result else {
        eprintln!(
            "error: job {job_id} has no result yet (state: {}); see `job wait {job_id}`",
            show::state_name(job.state)
        );
        return Ok(ExitCode::FAILURE);
    };
    if sealed {
        let Some(armoured) = &report.sealed else {
            return Err(anyhow!(
                "job {job_id}'s result is not sealed (it was submitted without --recipient)"
            ));
        };
        print!("{armoured}");
        return Ok(ExitCode::SUCCESS);
    }
    match (identity, &report.sealed) {
        (Some(path), Some(_)) => {
            let keys = read_identity(path)?;
            let clear = outpost_protocol::seal::open_report(report, &keys)
                .with_context(|| format!("job {job_id}: with identity {}", path.display()))?;
            job.result = Some(clear);
        }
        (Some(_), None) => eprintln!("note: job {job_id}'s result is not sealed; --identity is not needed"),
        (None, Some(_)) => eprintln!(
            "note: job {job_id}'s output is sealed for its recipients; give --identity FILE to open it here"
        ),
        (None, None) => {}
    }
    print(g.json, &job, show::job)?;
    Ok(ExitCode::SUCCESS)
}

/// The last `limit` entries of a node's stored audit log.
async fn node_audit_tail(
    c: &Client,
    node: &str,
    limit: usize,
) -> anyhow::Result<Vec<outpost_protocol::AuditRecord>> {
    let mut tail = std::collections::VecDeque::new();
    let mut after = 0;
    loop {
        let page = c.node_audit(node, after).await?.entries;
        let Some(last) = page.last() else { break };
        after = last.seq;
        tail.extend(page);
        while tail.len() > limit {
            tail.pop_front();
        }
    }
    Ok(tail.into())
}

/// `audit verify --node`: the whole stored chain, page by page.
async fn verify_node_audit(c: &Client, node: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut walk = outpost_protocol::AuditWalk::new();
    let broken = loop {
        match walk.step(&c.node_audit(node, walk.verified()).await?.entries) {
            Ok(true) => {}
            Ok(false) => break None,
            Err(why) => break Some(why),
        }
    };
    let seq = walk.verified();
    if json {
        println!(
            "{}",
            serde_json::json!({ "node_id": node, "entries": seq, "whole": broken.is_none(), "error": broken })
        );
    } else if let Some(why) = &broken {
        println!("node {node}: the audit log is broken after entry {seq}: {why}");
    } else if seq == 0 {
        println!("node {node}: no audit entries stored yet (they arrive with its results bundles)");
    } else {
        println!("node {node}: {seq} audit entries, each following the one before from the first");
    }
    Ok(if broken.is_none() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
