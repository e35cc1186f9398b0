//! `outpost policy …`: the site policy as the site's IT team works with it. `check` validates
//! (the agent refuses to start on the same errors), `show` prints the effective policy and the
//! files it came from, `explain` says what the policy does to a job or service spec without
//! running anything, `template strict` prints the hospital template.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};

use outpost_node::config::Config;
use outpost_node::policy::{Decision, Work};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate the policy in the node's configuration files (exit 1 naming the file, the key
    /// and the problem). The agent will not start on a policy that fails this.
    Check,
    /// Print the effective policy and which files set it.
    Show,
    /// Say whether the policy allows a job or service spec, and which rule decides; runs
    /// nothing. Exit 0 when allowed, 1 when refused.
    Explain {
        /// A job file (JSON or TOML: its `spec`, or a bare spec) or, with --service, a service spec.
        file: PathBuf,
        /// Read FILE as a service spec (a deployment's `spec`).
        #[arg(long)]
        service: bool,
        /// Who submits it, as the control plane would say: `org:ID`, `role:NAME`, `name:TOKEN`,
        /// `deployment:NAME`, `trigger:NAME`, `local-trigger:NAME` (repeatable).
        #[arg(long, value_name = "KIND:VALUE")]
        submitter: Vec<String>,
    },
    /// Print a policy template to start from.
    Template {
        #[arg(value_enum)]
        which: Template,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Template {
    /// Nothing runs until an image is listed by digest; no relaxations; no store prefix
    /// readable until one is listed (what the appliance image installs).
    Strict,
}

pub fn run(cfg: &Config, sources: &[String], cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        // Loading the configuration validated the policy already: an invalid one never gets here.
        PolicyCommand::Check => {
            if cfg.policy.is_open() {
                println!(
                    "policy OK: no [policy] is set, so every rule is open (work runs as the control plane signs it)"
                );
            } else {
                println!("policy OK (hash {})", cfg.policy.digest());
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Show => {
            let from: Vec<String> = sources.iter().filter_map(|s| policy_keys_in(s)).collect();
            if from.is_empty() {
                println!("# no [policy] in the configuration files: every rule is open");
            }
            for line in from {
                println!("# {line}");
            }
            println!("# hash {}", cfg.policy.digest());
            #[derive(serde::Serialize)]
            struct Doc<'a> {
                policy: &'a outpost_node::policy::Policy,
            }
            print!(
                "{}",
                toml::to_string_pretty(&Doc { policy: &cfg.policy }).context("cannot render the policy")?
            );
            print_remembered(cfg);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Explain { file, service, submitter } => {
            let by = parse_submitter(&submitter)?;
            let value = read_spec_file(&file)?;
            let work = if service {
                let spec: outpost_protocol::ServiceSpec = serde_json::from_value(value)
                    .with_context(|| format!("{} does not hold a valid service spec", file.display()))?;
                Work::service(&spec, by)
            } else {
                let spec: outpost_protocol::JobSpec = serde_json::from_value(value)
                    .with_context(|| format!("{} does not hold a valid job spec", file.display()))?;
                Work::job(&spec, by)
            };
            if cfg.policy.is_open() {
                println!("allowed: no [policy] is set, every rule is open");
                return Ok(ExitCode::SUCCESS);
            }
            match cfg.policy.evaluate(&work, true) {
                Decision::Refuse(r) => {
                    println!("refused: {} does not allow {}", r.rule, r.value);
                    Ok(ExitCode::FAILURE)
                }
                Decision::Allow | Decision::NeedsApproval => {
                    let image = work.image.as_deref().and_then(|d| cfg.policy.image(d));
                    match image {
                        Some(rule) if !rule.name.is_empty() => {
                            println!(
                                "allowed: image {} ({}) is listed and every rule passes",
                                rule.digest, rule.name
                            )
                        }
                        Some(rule) => {
                            println!("allowed: image {} is listed and every rule passes", rule.digest)
                        }
                        None => println!("allowed: every rule passes"),
                    }
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        PolicyCommand::Template { which: Template::Strict } => {
            print!("{}", outpost_node::policy::STRICT_TEMPLATE);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `FILE: keys a, b` for a configuration file that sets `[policy]`.
fn policy_keys_in(source: &str) -> Option<String> {
    let path = Path::new(source.strip_suffix(" (from a bundle)").unwrap_or(source));
    let table: toml::Table = std::fs::read_to_string(path).ok()?.parse().ok()?;
    let policy = table.get("policy")?.as_table()?;
    let keys: Vec<&str> = policy.keys().map(String::as_str).collect();
    Some(format!("from {}: {}", path.display(), keys.join(", ")))
}

fn read_spec_file(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value = if path.extension().is_some_and(|e| e == "toml") {
        let t: toml::Table = text.parse().with_context(|| format!("{} is not TOML", path.display()))?;
        serde_json::to_value(t)?
    } else {
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?
    };
    Ok(value.get("spec").cloned().unwrap_or(value))
}

fn parse_submitter(parts: &[String]) -> anyhow::Result<Option<outpost_protocol::Submitter>> {
    if parts.is_empty() {
        return Ok(None);
    }
    let mut s = outpost_protocol::Submitter::in_org("");
    for p in parts {
        let Some((kind, value)) = p.split_once(':') else {
            bail!("--submitter {p:?} must be KIND:VALUE (org, role, name, deployment, trigger)");
        };
        match kind {
            "org" => s.org_id = value.to_owned(),
            "role" => s.role = Some(value.to_owned()),
            "name" => s.name = Some(value.to_owned()),
            "deployment" => s.deployment = Some(value.to_owned()),
            "trigger" => s.trigger = Some(value.to_owned()),
            "local-trigger" => s.local_trigger = Some(value.to_owned()),
            _ => bail!(
                "--submitter {p:?}: {kind:?} is not org, role, name, deployment, trigger or local-trigger"
            ),
        }
    }
    Ok(Some(s))
}

/// The images approved at this site with `--remember`, as comments after the policy.
fn print_remembered(cfg: &outpost_node::config::Config) {
    let path = outpost_node::approvals::remembered_file(cfg);
    let Ok(text) = std::fs::read(&path) else { return };
    let Ok(all) = serde_json::from_slice::<
        std::collections::BTreeMap<String, outpost_node::approvals::Remembered>,
    >(&text) else {
        println!("# {} is unreadable; the agent rewrites it at the next --remember", path.display());
        return;
    };
    if all.is_empty() {
        return;
    }
    println!("# approved at this site with `outpost approvals approve --remember` (run without asking):");
    for (digest, r) in &all {
        let inputs = match &r.input_prefixes {
            None => "any input".to_owned(),
            Some(p) if p.is_empty() => "no inputs".to_owned(),
            Some(p) => format!("inputs under {}", p.iter().cloned().collect::<Vec<_>>().join(", ")),
        };
        let by = if r.by.is_empty() { String::new() } else { format!(", by {}", r.by) };
        println!("#   {digest}: {inputs}{by}");
    }
}
