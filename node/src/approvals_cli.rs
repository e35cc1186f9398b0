//! `outpost approvals …`: the site's approvers at work. Talks to the running agent over its
//! approval socket (root and `[policy] approvers_group` only); the agent records who asked.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use outpost_node::approvals::{self, Details, Request, Response, Waiting};
use outpost_node::config::Config;

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Jobs waiting for the site's approval, oldest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Everything an approver agrees to: submitter, image, command, inputs (objects and bytes
    /// they cover), outputs, what may leave the site, relaxations and limits.
    Show {
        /// `JOB_ID` or `JOB_ID/ATTEMPT`, as `list` prints it.
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Let a waiting job run.
    Approve {
        id: String,
        /// Also approve its image for later jobs (`approval = "new-image"` then stops asking).
        #[arg(long)]
        remember: bool,
    },
    /// Refuse a waiting job: it ends as `not_approved` and the reason reaches the operator.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

pub fn run(cfg: &Config, cmd: ApprovalsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ApprovalsCommand::List { json } => {
            let body = ask(cfg, &Request::List)?;
            let mut waiting: Vec<Waiting> = serde_json::from_value(body).context("the agent's answer")?;
            waiting.sort_by_key(|w| w.since_unix_ms);
            if json {
                println!("{}", serde_json::to_string(&waiting)?);
            } else if waiting.is_empty() {
                println!("no job is waiting for approval");
            } else {
                let now = outpost_node::clock::now_unix_ms();
                for w in &waiting {
                    println!(
                        "{}  {}  {}  waiting {} s  by {}",
                        w.id,
                        w.kind,
                        w.image.as_deref().unwrap_or("-"),
                        now.saturating_sub(w.since_unix_ms) / 1000,
                        who(w)
                    );
                }
            }
        }
        ApprovalsCommand::Show { id, json } => {
            let body = ask(cfg, &Request::Show { id })?;
            if json {
                println!("{body}");
            } else {
                let d: Details = serde_json::from_value(body).context("the agent's answer")?;
                print_details(&d);
            }
        }
        ApprovalsCommand::Approve { id, remember } => {
            ask(cfg, &Request::Approve { id: id.clone(), remember })?;
            println!("approved {id}{}", if remember { "; its image is remembered" } else { "" });
        }
        ApprovalsCommand::Deny { id, reason } => {
            ask(cfg, &Request::Deny { id: id.clone(), reason })?;
            println!("denied {id}: it ends as not_approved and the reason goes to the operator");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn who(w: &Waiting) -> String {
    w.submitter.as_ref().map_or_else(|| "(not stated)".into(), |s| s.identities().join(" "))
}

fn print_details(d: &Details) {
    let w = &d.waiting;
    println!("job:           {} ({})", w.id, w.kind);
    println!("submitter:     {}", who(w));
    if let Some(image) = &w.image {
        println!(
            "image:         {image}{}",
            d.image_name.as_deref().filter(|n| !n.is_empty()).map(|n| format!(" ({n})")).unwrap_or_default()
        );
        match (d.image_size_bytes, &d.image_created) {
            (Some(size), Some(created)) => println!("               {size} bytes, created {created}"),
            _ => println!("               not loaded in the engine"),
        }
    }
    println!("command:       {:?}", d.command);
    if d.inputs.is_empty() {
        println!("inputs:        none");
    }
    for i in &d.inputs {
        let more = if i.more { " or more" } else { "" };
        println!("input:         {} ({} object(s){more}, {} bytes)", i.key, i.objects, i.bytes);
    }
    println!("output prefix: {}", d.output_prefix.as_deref().unwrap_or("none"));
    println!(
        "leaves site:   result metadata; output bodies asked {:?}, allowed by the egress policy {:?}",
        d.egress_asked, d.egress_allowed
    );
    println!(
        "relaxations:   {}",
        if d.relaxations.is_empty() { "none (fully hardened)".to_owned() } else { d.relaxations.join(", ") }
    );
    println!(
        "limits:        {} MB memory, {} millicores, timeout {}",
        d.memory_mb,
        d.cpu_millis,
        d.timeout_secs.map_or("-".to_owned(), |t| format!("{t} s"))
    );
}

/// One request to the running agent.
fn ask(cfg: &Config, req: &Request) -> anyhow::Result<serde_json::Value> {
    let path = approvals::socket_path(cfg);
    let stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the agent's approval socket {} (is `outpost run` running, and are you root or in \
             [policy] approvers_group?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).context("no answer from the agent")?;
    match serde_json::from_str::<Response>(&answer).context("the agent's answer does not parse")? {
        Response::Ok { body } => Ok(body),
        Response::Error { error } => bail!("{error}"),
    }
}
