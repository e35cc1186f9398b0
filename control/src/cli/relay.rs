//! `events` and `trigger`: list and follow the relay events nodes deliver, and manage the
//! org-level triggers that turn them into jobs. `trigger create` takes the same container flags
//! as `job submit` ([`SpecArgs`]).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use outpost_protocol::{CreateTriggerRequest, EventList, EventMatch, StoredEvent, TriggerList};
use serde_json::{Map, Value};

use super::show::{table, when};
use super::submit::{SpecArgs, apply_spec_flags};
use crate::client::{Client, EventsQuery};

/// How long each follow-up request of `events tail` is held by the server.
const TAIL_WAIT_SECS: u64 = 25;

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List stored events, oldest first, with the jobs triggers started for them.
    ///
    /// With --node, the node's events in seq order and --after is a seq of that node; without
    /// it, every node's events in arrival order and --after is a CURSOR (first column).
    List {
        /// Only this node's events.
        #[arg(long, value_name = "NODE_ID")]
        node: Option<String>,
        /// Only this organisation's events.
        #[arg(long, value_name = "ORG_ID")]
        org: Option<String>,
        /// Only events after this seq (with --node) or cursor (without).
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
        /// At most this many (the server caps it at 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Print events as nodes deliver them, one line each (or one JSON object per line with
    /// --json), until Ctrl-C or --count events.
    ///
    /// Starts with the --last most recent events, then follows with the server's long-poll.
    Tail {
        /// Only this node's events.
        #[arg(long, value_name = "NODE_ID")]
        node: Option<String>,
        /// Exit after printing this many events (the --last ones included).
        #[arg(long, value_name = "N")]
        count: Option<usize>,
        /// How many already stored events to print first.
        #[arg(long, value_name = "N", default_value_t = 10)]
        last: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum TriggerCommand {
    /// Create a trigger: run a job on the node that saw each matching event, with the
    /// object's key appended to the job's inputs; prints the trigger id.
    Create(Box<TriggerCreateArgs>),
    /// List triggers, oldest first.
    List {
        /// Only this organisation's triggers.
        #[arg(long, value_name = "ORG_ID")]
        org: Option<String>,
    },
    /// Show one trigger with its job template (JSON).
    Get { trigger_id: String },
    /// Remove a trigger; events stored afterwards no longer fire it (its jobs stay).
    Delete { trigger_id: String },
}

#[derive(Debug, Args)]
#[command(after_help = "\
Every given match flag must hold; rejected objects are skipped unless --include-rejected.
A trigger fires once per event, even when the node resends it. The job also gets
OUTPOST_EVENT_KEY, OUTPOST_EVENT_SEQ and OUTPOST_EVENT_SHA256 in its environment and the
object mounted read-only at /in/KEY.

Examples:
  outpost-control trigger create --org org-… --name thumbnails --prefix incoming/ --suffix .jpg \\
      --image sha256:… --output-prefix thumbs/ --memory 128m -- /bin/thumb
  outpost-control trigger create --org org-… --name quarantine --watch uploads --include-rejected \\
      --image sha256:… -- /bin/report")]
pub struct TriggerCreateArgs {
    /// The organisation whose nodes' events fire it.
    #[arg(long, value_name = "ORG_ID")]
    pub org: String,
    /// 1 to 64 of A-Z a-z 0-9 _ . - , unique in the organisation.
    #[arg(long)]
    pub name: String,
    /// Only events of this node (default: any node of the organisation).
    #[arg(long, value_name = "NODE_ID")]
    pub node: Option<String>,
    /// Only events of this watch of the node's relay.
    #[arg(long)]
    pub watch: Option<String>,
    /// Only events of this bucket of the node's local store.
    #[arg(long)]
    pub bucket: Option<String>,
    /// Only keys starting with this.
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub prefix: String,
    /// Only keys ending with this, e.g. .jpg.
    #[arg(long, value_name = "SUFFIX")]
    pub suffix: Option<String>,
    /// Fire on objects the watch rejected too.
    #[arg(long)]
    pub include_rejected: bool,
    #[command(flatten)]
    pub spec: SpecArgs,
}

/// The request the flags describe, validated against the protocol's types.
pub fn trigger_request(a: TriggerCreateArgs) -> anyhow::Result<CreateTriggerRequest> {
    let expires_in_secs = a.spec.expires.map(|d| d.as_secs());
    let mut spec = Map::new();
    apply_spec_flags(&mut spec, a.spec)?;
    let job = serde_json::from_value(Value::Object(spec)).context("the job template is not a valid spec")?;
    Ok(CreateTriggerRequest {
        org_id: a.org,
        name: a.name,
        on: EventMatch {
            node_id: a.node,
            bucket: a.bucket,
            watch: a.watch,
            key_prefix: a.prefix,
            key_suffix: a.suffix,
            include_rejected: a.include_rejected,
        },
        job,
        expires_in_secs,
    })
}

pub fn events(list: &EventList) {
    let rows = list
        .events
        .iter()
        .map(|e| {
            vec![
                e.cursor.to_string(),
                e.node_id.clone(),
                e.event.seq.to_string(),
                e.event.watch.clone(),
                e.event.key.clone(),
                e.event.size.to_string(),
                status(e),
                e.triggered_jobs.join(","),
            ]
        })
        .collect::<Vec<_>>();
    table(&["CURSOR", "NODE", "SEQ", "WATCH", "KEY", "SIZE", "STATUS", "TRIGGERED JOBS"], &rows);
}

fn status(e: &StoredEvent) -> String {
    if e.event.accepted {
        "accepted".into()
    } else {
        format!("rejected: {}", e.event.reason.as_deref().unwrap_or("no reason given"))
    }
}

fn event_line(e: &StoredEvent) -> String {
    let mut line = format!(
        "{} {} seq {} watch {} {} ({} bytes) {}",
        when(Some(e.received_unix_ms)),
        e.node_id,
        e.event.seq,
        e.event.watch,
        e.event.key,
        e.event.size,
        status(e)
    );
    if !e.triggered_jobs.is_empty() {
        line.push_str(&format!(" -> jobs {}", e.triggered_jobs.join(",")));
    }
    line
}

pub fn triggers(list: &TriggerList) {
    let rows = list
        .triggers
        .iter()
        .map(|t| {
            vec![
                t.trigger_id.clone(),
                t.org_id.clone(),
                t.name.clone(),
                describe_match(&t.on),
                t.job.image.clone(),
                when(Some(t.created_unix_ms)),
            ]
        })
        .collect::<Vec<_>>();
    table(&["ID", "ORG", "NAME", "ON", "IMAGE", "CREATED"], &rows);
}

fn describe_match(on: &EventMatch) -> String {
    let mut parts = Vec::new();
    if let Some(n) = &on.node_id {
        parts.push(format!("node={n}"));
    }
    if let Some(b) = &on.bucket {
        parts.push(format!("bucket={b}"));
    }
    if let Some(w) = &on.watch {
        parts.push(format!("watch={w}"));
    }
    parts.push(format!("key={}*{}", on.key_prefix, on.key_suffix.as_deref().unwrap_or("")));
    if on.include_rejected {
        parts.push("+rejected".into());
    }
    parts.join(" ")
}

/// Follows events: the `last` most recent first, then each new one as the long-poll brings it.
pub async fn tail(
    c: &Client,
    json: bool,
    node: Option<String>,
    count: Option<usize>,
    last: usize,
) -> anyhow::Result<ExitCode> {
    let mut left = count.unwrap_or(usize::MAX);
    if left == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    // Arrival order with a node filter, so a node's late gap-fillers are not skipped.
    let base = EventsQuery { node_id: node, cursor: Some(0), ..EventsQuery::default() };
    let recent = c.events(&EventsQuery { newest: true, limit: Some(last.max(1)), ..base.clone() }).await?;
    let mut cursor = recent.events.last().map_or(0, |e| e.cursor);
    let backlog = recent.events.len().saturating_sub(last);
    let mut pending: Vec<StoredEvent> = recent.events.into_iter().skip(backlog).collect();
    loop {
        for e in pending.drain(..) {
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                println!("{}", event_line(&e));
            }
            left -= 1;
            if left == 0 {
                return Ok(ExitCode::SUCCESS);
            }
        }
        let q = EventsQuery { cursor: Some(cursor), wait_secs: Some(TAIL_WAIT_SECS), ..base.clone() };
        pending = c.events(&q).await?.events;
        if let Some(e) = pending.last() {
            cursor = e.cursor;
        }
    }
}
