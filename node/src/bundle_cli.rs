//! `outpost bundle …`: the air-gapped uplink by hand. `import` applies a signed bundle from
//! the control plane (images, models, configuration, jobs, services, acknowledgements); while the agent runs it hands
//! the file to the agent (its inbox) and waits for the outcome, since the ledger has one owner.
//! `export-results` writes the outbox's results, signed by this node, for the control plane.
//! `inspect` verifies a bundle completely and prints what it holds, changing nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use outpost_node::bundle::{self, BundleError, Outcome, apply, read};
use outpost_node::clock::now_unix_ms;
use outpost_node::config::Config;
use outpost_node::identity::Identity;
use outpost_node::ledger::Ledger;
use outpost_node::models::{ModelStore, Publishers};
use outpost_node::runtime::docker::DockerRuntime;
use outpost_node::services::book::ServiceBook;
use outpost_node::store::sled_store::SledStore;
use outpost_node::verify::ManifestVerifier;
use outpost_protocol::progress::Bar;

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Verify a bundle completely (signature, target, counter, expiry, every part's digest)
    /// and print what it holds; changes nothing.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify and apply a bundle from the control plane: all or nothing. Importing the same
    /// bundle again is a no-op that says so; an older one is refused as a replay.
    Import {
        file: PathBuf,
        /// The outcome as JSON (no progress bar).
        #[arg(long)]
        json: bool,
        /// No progress bar (there is none either when standard error is not a terminal).
        #[arg(long, short)]
        quiet: bool,
        /// While the agent runs, how long to wait for it to import the bundle.
        #[arg(long, value_parser = parse_secs, default_value = "600")]
        wait: Duration,
    },
    /// Write every result, relay event, service report and audit entry the control plane has
    /// not acknowledged, signed by this node, for `outpost-control bundle import-results`. They
    /// stay in the outbox until the acknowledgement bundle comes back.
    ExportResults {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Only what no results bundle written since the last acknowledgement carried: `last`
        /// (or that bundle's id). Without it, everything not acknowledged goes again.
        #[arg(long, value_name = "LAST")]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.trim_end_matches('s')
        .parse()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?} is not a number of seconds"))
}

pub async fn run(cfg: &Config, cmd: BundleCommand) -> anyhow::Result<ExitCode> {
    let identity = Identity::load(&cfg.identity_dir()).context(
        "this node is not enrolled: bundles are verified against the organisation key pinned at enrollment",
    )?;
    match cmd {
        BundleCommand::Inspect { file, json } => inspect(cfg, &identity, &file, json),
        BundleCommand::Import { file, json, quiet, wait } => {
            if agent_running(cfg) {
                return hand_to_agent(cfg, &file, json, wait).await;
            }
            let store = SledStore::open(&cfg.ledger_dir())?;
            import_here(cfg, &identity, Ledger::new(Arc::new(store)), &file, json, json || quiet).await
        }
        BundleCommand::ExportResults { out, since, json } => {
            let out = absolute(&out)?;
            let exported = if agent_running(cfg) {
                export_by_agent(cfg, &out, since).await?
            } else {
                let ledger = Ledger::new(Arc::new(SledStore::open(&cfg.ledger_dir())?));
                bundle::results::export(cfg, &identity, &ledger, &out, now_unix_ms(), since.as_deref())?
            };
            if json {
                println!("{}", serde_json::to_string(&exported)?);
            } else {
                println!(
                    "{} result(s), {} relay event(s), {} service report(s) and {} audit entr(ies) written to {} \
                     ({} bytes); take it to `outpost-control bundle import-results`",
                    exported.results.len(),
                    exported.events,
                    exported.service_reports,
                    exported.audit_entries,
                    out.display(),
                    exported.bytes
                );
                if exported.remaining > 0 {
                    println!(
                        "{} more result(s) did not fit this bundle: they go in the next export, once this one's \
                         acknowledgement bundle has been imported here",
                        exported.remaining
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `path` made absolute (the agent may write it, from another working directory).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir().context("cannot read the working directory")?.join(path))
}

/// The agent owns the ledger: ask it (a request in its inbox) to write the results bundle.
async fn export_by_agent(
    cfg: &Config,
    out: &Path,
    since: Option<String>,
) -> anyhow::Result<bundle::results::Exported> {
    let request = serde_json::to_vec(&bundle::ExportRequest { out: out.to_path_buf(), since })?;
    eprintln!("the agent is running: asked it to write the results bundle");
    let v = ask_agent(cfg, "export", Duration::from_secs(600), |tmp| {
        std::fs::write(tmp, &request).with_context(|| format!("cannot write {}", tmp.display()))
    })
    .await?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("no results bundle written: {err}");
    }
    serde_json::from_value(v).context("the agent's outcome does not parse")
}

/// Leaves an item for the running agent in its inbox (`put` writes it at the temporary path it
/// is given; it is renamed into place after) and waits up to `wait` for the agent's outcome.
/// An item the agent has not started on by then is taken back: nothing is left pending behind
/// the operator's back.
async fn ask_agent(
    cfg: &Config,
    ext: &str,
    wait: Duration,
    put: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<serde_json::Value> {
    let inbox = bundle::inbox_dir(cfg);
    std::fs::create_dir_all(&inbox).with_context(|| format!("cannot create {}", inbox.display()))?;
    let name = format!("{}-{}.{ext}", now_unix_ms(), std::process::id());
    let tmp = inbox.join(format!(".{name}.partial"));
    put(&tmp)?;
    std::fs::rename(&tmp, inbox.join(&name))?;
    let outcome_file = bundle::outcome_path(cfg, &name);
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(text) = std::fs::read_to_string(&outcome_file) {
            let _ = std::fs::remove_file(&outcome_file);
            return serde_json::from_str(&text).context("the agent's outcome does not parse");
        }
        if Instant::now() > deadline {
            if std::fs::remove_file(inbox.join(&name)).is_ok() {
                bail!("the agent did not take it within {} s; nothing was done", wait.as_secs());
            }
            bail!(
                "the agent is still working on it after {} s; see `outpost audit list` for its outcome",
                wait.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `outpost run` is up on this data dir (its status file names a live process).
fn agent_running(cfg: &Config) -> bool {
    outpost_node::status::read(&cfg.status_file()).ok().is_some_and(|s| outpost_node::status::is_alive(s.pid))
}

fn inspect(cfg: &Config, identity: &Identity, file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    // The running agent owns the ledger: then the counter cannot be compared here.
    let last = if agent_running(cfg) {
        None
    } else {
        SledStore::open(&cfg.ledger_dir()).ok().and_then(|s| apply::last_bundle(&s).ok()).map(|l| l.counter)
    };
    let counter_checked = last.is_some();
    let last = last.unwrap_or(0);
    let expect = read::Expect {
        org_id: &identity.node.org_id,
        org_keys: &identity.org_keys,
        node_id: &identity.node.node_id,
        now_unix_ms: now_unix_ms(),
    };
    let result = read::verify_and_stage(file, &expect, last, None, &|_| {});
    let manifest = match &result {
        Ok(v) => Some(v.manifest.clone()),
        Err(_) => read::manifest(file, &expect).ok(),
    };
    if json {
        let v = serde_json::json!({
            "manifest": manifest,
            "verified": result.is_ok(),
            "counter_checked": counter_checked,
            "error": result.as_ref().err().map(ToString::to_string),
        });
        println!("{v}");
    } else {
        if let Some(m) = &manifest {
            println!("bundle {} of organisation {}", m.bundle_id, m.org_id);
            println!("  created {} (Unix ms), expires {}", m.created_unix_ms, m.expires_unix_ms);
            println!(
                "  for {} node(s); this node's counter {:?}",
                m.counters.len(),
                m.counters.get(&identity.node.node_id)
            );
            for p in &m.parts {
                let node = p.node_id.as_deref().map(|n| format!(" for {n}")).unwrap_or_default();
                println!("  {:<22} {:>12} bytes  {}{}", p.name, p.size, p.label, node);
            }
        }
        match &result {
            Ok(_) if counter_checked => {
                println!("verified: every part matches the signed manifest; importable here")
            }
            Ok(_) => println!(
                "verified: every part matches the signed manifest (the counter was not compared: the \
                 agent is running and holds the ledger; it refuses a replay on import)"
            ),
            Err(e) => println!("NOT importable here: {e}"),
        }
    }
    Ok(if result.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Imports `file` in this process (the agent is not running); `quiet` hides the progress bar.
async fn import_here(
    cfg: &Config,
    identity: &Identity,
    ledger: Ledger,
    file: &Path,
    json: bool,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let verifier = ManifestVerifier::with_keys(&identity.node.node_id, &identity.org_keys)
        .map_err(anyhow::Error::msg)?;
    let runtime = DockerRuntime::new(&identity.node.node_id, cfg.docker.socket.as_deref())?;
    let models = ModelStore::new(cfg.models_dir());
    let publishers =
        Publishers::new(&identity.org_keys, &cfg.models.trusted_publishers).map_err(anyhow::Error::msg)?;
    let services = ServiceBook::new(Arc::clone(ledger.store()));
    let node = apply::Node {
        cfg,
        policy: Arc::new(cfg.policy.clone()),
        ledger: &ledger,
        verifier: &verifier,
        runtime: &runtime,
        models: &models,
        publishers: &publishers,
        services: &services,
        node_id: &identity.node.node_id,
        enrolled_unix_ms: identity.node.enrolled_unix_ms,
    };
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let bar = Bar::bytes(&format!("verifying {}", file.display()), size, quiet);
    let seen = bar.clone();
    let outcome = bundle::import_file(
        &node,
        &identity.org_keys,
        &identity.node.org_id,
        &bundle::staging_dir(cfg),
        file,
        now_unix_ms(),
        Arc::new(move |done| seen.set(done)),
    )
    .await;
    bar.finish();
    report(outcome, json)
}

fn report(outcome: Result<Outcome, BundleError>, json: bool) -> anyhow::Result<ExitCode> {
    match outcome {
        Ok(o) => {
            if json {
                println!("{}", serde_json::to_string(&o)?);
            } else {
                print_outcome(&o);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json {
                let v = serde_json::json!({ "outcome": "refused", "error": e.to_string(), "changed_nothing": e.changed_nothing() });
                println!("{v}");
                Ok(ExitCode::FAILURE)
            } else if e.changed_nothing() {
                bail!("bundle not imported (nothing changed): {e}")
            } else {
                bail!(
                    "bundle only partly imported: {e}; import it again to finish (every step is idempotent)"
                )
            }
        }
    }
}

fn print_outcome(o: &Outcome) {
    match o {
        Outcome::AlreadyImported { bundle_id, counter } => {
            println!("bundle {bundle_id} (counter {counter}) was imported already: nothing to do");
        }
        Outcome::Imported(a) => {
            println!("imported bundle {} (counter {})", a.bundle_id, a.counter);
            for i in &a.images {
                println!("  image loaded    {i}");
            }
            for m in &a.models {
                println!("  model imported  {m}");
            }
            for j in &a.jobs_accepted {
                println!("  job accepted    {j}");
            }
            for j in &a.jobs_known {
                println!("  job known       {j} (received before)");
            }
            for (j, why) in &a.jobs_rejected {
                println!("  job rejected    {j}: {why}");
            }
            for (s, what) in &a.services {
                println!("  service         {s}: {what}");
            }
            if let Some(path) = &a.config {
                println!(
                    "  configuration   written to {path}; it applies when the agent next starts (e.g. `systemctl \
                     restart outpost`), under this node's own files, which win"
                );
            }
            if a.results_acknowledged > 0 {
                println!("  {} result(s) acknowledged: cleared from the outbox", a.results_acknowledged);
            }
            if a.events_acknowledged > 0 {
                println!("  {} relay event(s) acknowledged: cleared from the outbox", a.events_acknowledged);
            }
            if a.service_reports_acknowledged {
                println!("  service reports acknowledged: cleared from the outbox");
            }
            if a.audit_acknowledged_up_to > 0 {
                println!(
                    "  audit log stored on the control plane up to entry {}",
                    a.audit_acknowledged_up_to
                );
            }
        }
    }
}

/// The agent owns the ledger: leave the file in its inbox and wait for its outcome.
async fn hand_to_agent(cfg: &Config, file: &Path, json: bool, wait: Duration) -> anyhow::Result<ExitCode> {
    let size = std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?.len();
    bundle::check_free_space(&bundle::inbox_dir(cfg), size)?;
    eprintln!("the agent is running: handed {} to it; waiting for its outcome", file.display());
    let v = ask_agent(cfg, "bundle", wait, |tmp| {
        std::fs::copy(file, tmp)
            .map(drop)
            .with_context(|| format!("cannot copy {} to {}", file.display(), tmp.display()))
    })
    .await?;
    if json {
        println!("{v}");
    }
    match v.get("error").and_then(|e| e.as_str()) {
        Some(_) if json => Ok(ExitCode::FAILURE),
        Some(err) => bail!("bundle not imported (nothing changed): {err}"),
        None => {
            if !json {
                match serde_json::from_value::<Outcome>(v.clone()) {
                    Ok(o) => print_outcome(&o),
                    Err(_) => println!("{v}"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
