//! `outpost-control deploy`: services kept running on every node a selector matches, rolled out
//! batch by batch with health gates, and the per-node view of where each one stands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use outpost_protocol::{
    BatchSize, DeployAction, DeployRequest, DeploymentInfo, DeploymentList, RolloutPolicy, ServiceSpec,
    wire_name,
};

use super::show::table;
use crate::client::Client;

#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Create a deployment, or a new revision of one (same --name), which supersedes any
    /// rollout in progress; prints the revision.
    Create(Box<DeployCreateArgs>),
    /// List the organisation's deployments.
    List {
        #[arg(long, value_name = "ORG_ID")]
        org: String,
    },
    /// A deployment's rollout and every node it selects: phase, desired revision, last report,
    /// and the reason for anything that is not healthy.
    Status {
        name: String,
        #[arg(long, value_name = "ORG_ID")]
        org: String,
    },
    /// Stop moving to the next batch (nodes keep what they run).
    Pause {
        name: String,
        #[arg(long, value_name = "ORG_ID")]
        org: String,
    },
    /// Go on with a paused rollout.
    Resume {
        name: String,
        #[arg(long, value_name = "ORG_ID")]
        org: String,
    },
    /// Stop the rollout; the nodes it updated go back to the last completed revision.
    Abort {
        name: String,
        #[arg(long, value_name = "ORG_ID")]
        org: String,
    },
    /// Put every node back on the revision that completed before the current one.
    Rollback {
        name: String,
        #[arg(long, value_name = "ORG_ID")]
        org: String,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "\
Example:
  outpost-control deploy create --org ORG --name dicom --selector 'site=icu' --service dicom.toml --batch 10% --max-unavailable 1

A service file holds the ServiceSpec (TOML or JSON), e.g.:
  image = \"sha256:…\"
  command = [\"/bin/listener\", \"--port\", \"104\"]
  network = \"internal\"
  volume = \"/data\"
  [restart]
  mode = \"always\"
  [health]
  tcp_port = 104
  interval_ms = 1000
  retries = 3")]
pub struct DeployCreateArgs {
    #[arg(long, value_name = "ORG_ID")]
    pub org: String,
    /// Deployment name (lowercase letters, digits, '-').
    #[arg(long)]
    pub name: String,
    /// Which nodes run it, e.g. `site=icu,gpu in (a100,l4)`; nodes that match later get it too.
    #[arg(long, value_name = "SELECTOR")]
    pub selector: String,
    /// The service spec, a .toml or .json file.
    #[arg(long = "service", value_name = "FILE")]
    pub service_file: PathBuf,
    /// The service name on the nodes (default: the deployment name); deployments of one
    /// service compose by priority.
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,
    /// Higher wins where several deployments of one service select a node (ties: the newer).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub priority: i32,
    /// Nodes per batch: a count like 5 or a share like 10%.
    #[arg(long, value_parser = BatchSize::parse, default_value = "25%")]
    pub batch: BatchSize,
    /// How long a node of a batch has to report the new revision healthy (e.g. 2m).
    #[arg(long, value_parser = super::submit::parse_duration, default_value = "2m")]
    pub health_timeout: Duration,
    /// Failed nodes that stop the rollout and roll the updated ones back.
    #[arg(long, default_value_t = 1)]
    pub abort_on_failures: u32,
    /// Most nodes updating (not yet healthy on the new revision) at once; caps --batch.
    #[arg(long, value_name = "N")]
    pub max_unavailable: Option<u32>,
}

fn read_spec(path: &PathBuf) -> anyhow::Result<ServiceSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the service file {}", path.display()))?;
    let spec = if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text)
            .with_context(|| format!("{} is not a valid service spec (TOML)", path.display()))?
    } else {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid service spec (JSON)", path.display()))?
    };
    Ok(spec)
}

pub(super) async fn run(c: &Client, json: bool, command: DeployCommand) -> anyhow::Result<ExitCode> {
    let print = |d: &DeploymentInfo| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(d)?);
        } else {
            status(d);
        }
        Ok(())
    };
    match command {
        DeployCommand::Create(a) => {
            let spec = read_spec(&a.service_file)?;
            if a.abort_on_failures == 0 || a.max_unavailable == Some(0) {
                anyhow::bail!("--abort-on-failures and --max-unavailable must be at least 1");
            }
            let req = DeployRequest {
                name: a.name,
                org_id: a.org.clone(),
                selector: a.selector,
                service: a.service_name,
                spec,
                priority: a.priority,
                rollout: RolloutPolicy {
                    batch: a.batch,
                    health_timeout_secs: a.health_timeout.as_secs().max(1),
                    abort_on_failures: a.abort_on_failures,
                    max_unavailable: a.max_unavailable,
                },
            };
            let d = c.deploy(&a.org, &req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                eprintln!("deployment {} revision {} rolling out to `{}`", d.name, d.revision, d.selector);
                println!("{}", d.revision);
            }
        }
        DeployCommand::List { org } => {
            let list = c.deployments(&org).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                deployments(&list);
            }
        }
        DeployCommand::Status { name, org } => print(&c.deployment(&org, &name).await?)?,
        DeployCommand::Pause { name, org } => {
            print(&c.deploy_action(&org, &name, DeployAction::Pause).await?)?
        }
        DeployCommand::Resume { name, org } => {
            print(&c.deploy_action(&org, &name, DeployAction::Resume).await?)?
        }
        DeployCommand::Abort { name, org } => {
            print(&c.deploy_action(&org, &name, DeployAction::Abort).await?)?
        }
        DeployCommand::Rollback { name, org } => {
            print(&c.deploy_action(&org, &name, DeployAction::Rollback).await?)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn deployments(list: &DeploymentList) {
    let rows: Vec<Vec<String>> = list
        .deployments
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.service.clone(),
                d.revision.to_string(),
                d.stable_revision.map_or("-".into(), |r| r.to_string()),
                wire_name(&d.status),
                d.priority.to_string(),
                d.selector.clone(),
            ]
        })
        .collect();
    table(&["NAME", "SERVICE", "REVISION", "STABLE", "ROLLOUT", "PRIORITY", "SELECTOR"], &rows);
}

fn status(d: &DeploymentInfo) {
    println!("deployment: {} (service {}, org {})", d.name, d.service, d.org_id);
    println!(
        "revision:   {} ({}), stable {}",
        d.revision,
        wire_name(&d.status),
        d.stable_revision.map_or("-".into(), |r| r.to_string())
    );
    println!("selector:   {}  priority {}  batch {}", d.selector, d.priority, d.rollout.batch);
    println!("image:      {}", d.spec.image);
    if let Some(r) = &d.reason {
        println!("reason:     {r}");
    }
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for n in &d.nodes {
        *counts.entry(wire_name(&n.phase)).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!("nodes:      {}", if summary.is_empty() { "none selected".into() } else { summary.join(", ") });
    let rows: Vec<Vec<String>> = d
        .nodes
        .iter()
        .map(|n| {
            let reported = n.report.as_ref().map_or("-".into(), |r| {
                format!("r{} {} (restarts {})", r.revision, wire_name(&r.state), r.restarts)
            });
            vec![
                n.node_id.clone(),
                wire_name(&n.phase),
                n.desired_revision.map_or("-".into(), |r| r.to_string()),
                reported,
                n.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        println!();
        table(&["NODE", "PHASE", "DESIRED", "REPORTED", "REASON"], &rows);
    }
}
