//! The service reconciler: one loop that compares the desired state in the book with the
//! containers the engine has, and converges, whether or not the control plane is reachable.
//! It removes every container that is not the target revision of a service (so a removed or
//! replaced revision never lingers), creates and starts the target, restarts it by its policy
//! with exponential backoff, probes its health, and rolls a new revision that does not become
//! healthy in time back to the last one that was. Each change of state becomes a report.
//!
//! It never runs two containers of one revision: a revision's container has a fixed name, and
//! a restart starts that same container again.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use outpost_protocol::{RestartMode, ServiceState};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::book::{Draft, HealthyRevision, ServiceBook, ServiceRecord, Target};
use super::health::probe;
use super::inputs;
use crate::clock::now_unix_ms;
use crate::config::ServicesConfig;
use crate::ledger::Ledger;
use crate::objstore::AnyStore;
use crate::runtime::{ContainerState, ManagedService, Runtime, RuntimeError, ServiceRef};

/// How often the loop looks when nothing wakes it. Exits wake it at once (a watcher per
/// running container), and restarts and probes wake it when they are due.
const PASS_EVERY: Duration = Duration::from_secs(1);
/// The least time between passes: a restart or probe that is overdue because its step failed
/// must not turn the loop into a busy one.
const PASS_GAP_MIN: Duration = Duration::from_millis(50);
/// Healthy this long, and the restart backoff starts over from its first step.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);

/// What the reconciler knows about a service beyond the book (lost on restart, rebuilt from
/// the engine).
#[derive(Debug, Clone)]
struct Live {
    revision: u64,
    deployment: String,
    /// When this revision became the target: its health gate counts from here.
    since: Instant,
    started: Option<Instant>,
    restarts: u32,
    backoff: Duration,
    restart_at: Option<Instant>,
    failures: u32,
    healthy: bool,
    ever_healthy: bool,
    healthy_since: Option<Instant>,
    next_probe: Instant,
    last_exit: Option<i64>,
    health_output: String,
    message: Option<String>,
    state: ServiceState,
    reported: Option<(ServiceState, u64, u32)>,
    gate_reported: bool,
}

impl Live {
    fn new(t: &Target, now: Instant) -> Self {
        Self::of(&t.deployment, t.revision, t.spec.restart.backoff_initial_ms, now)
    }

    fn of(deployment: &str, revision: u64, backoff_initial_ms: u64, now: Instant) -> Self {
        Self {
            revision,
            deployment: deployment.to_owned(),
            since: now,
            started: None,
            restarts: 0,
            backoff: Duration::from_millis(backoff_initial_ms),
            restart_at: None,
            failures: 0,
            healthy: false,
            ever_healthy: false,
            healthy_since: None,
            next_probe: now,
            last_exit: None,
            health_output: String::new(),
            message: None,
            state: ServiceState::Pending,
            reported: None,
            gate_reported: false,
        }
    }
}

pub struct Reconciler<R: Runtime> {
    runtime: Arc<R>,
    book: ServiceBook,
    ledger: Ledger,
    live: HashMap<String, Live>,
    /// Woken when the desired state changes.
    wake: Arc<Notify>,
    /// Notified when a report was written.
    reported: Arc<Notify>,
    /// The node's own limits on published ports, checked again before every create.
    allow: ServicesConfig,
    /// The site policy and this node's organisation, checked again before every create.
    policy: crate::policy::Current,
    org_id: String,
    /// Engine waits on running service containers.
    watchers: HashMap<ServiceRef, tokio::task::JoinHandle<()>>,
    /// Where services' `inputs` come from and are staged.
    inputs: InputSource,
    /// Inputs being copied, per revision.
    staging: HashMap<ServiceRef, tokio::task::JoinHandle<Result<PathBuf, RuntimeError>>>,
    /// Service restarts since the agent started (Prometheus).
    restarts: prometheus_client::metrics::counter::Counter,
}

/// The local object store services' `inputs` are copied from, and the directory they are
/// staged under ([`inputs::root`]).
pub struct InputSource {
    pub objects: Arc<AnyStore>,
    pub root: PathBuf,
}

impl<R: Runtime> Reconciler<R> {
    /// Holds every container it makes to the site policy (none: any).
    /// Counts every service restart into `counter` (the agent's metrics).
    pub fn with_restart_counter(mut self, counter: prometheus_client::metrics::counter::Counter) -> Self {
        self.restarts = counter;
        self
    }

    pub fn with_policy(mut self, policy: crate::policy::Current, org_id: &str) -> Self {
        self.policy = policy;
        self.org_id = org_id.to_owned();
        self
    }

    pub fn new(
        runtime: Arc<R>,
        book: ServiceBook,
        ledger: Ledger,
        allow: ServicesConfig,
        wake: Arc<Notify>,
        reported: Arc<Notify>,
        inputs: InputSource,
    ) -> Self {
        Self {
            runtime,
            book,
            ledger,
            live: HashMap::new(),
            wake,
            policy: crate::policy::Current::default(),
            org_id: String::new(),
            reported,
            allow,
            watchers: HashMap::new(),
            inputs,
            staging: HashMap::new(),
            restarts: Default::default(),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let next = match self.pass().await {
                Ok(()) => {
                    self.next_due().map_or(PASS_EVERY, |due| due.saturating_duration_since(Instant::now()))
                }
                Err(e) => {
                    // The engine does not answer: its restarts and probes stay overdue until it
                    // does, so they do not set the pace.
                    tracing::warn!(error = %e, "service reconciliation failed; retrying");
                    PASS_EVERY
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.watchers.drain().for_each(|(_, w)| w.abort());
                    return;
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(next.clamp(PASS_GAP_MIN, PASS_EVERY)) => {}
            }
        }
    }

    /// The soonest restart or probe that is due.
    fn next_due(&self) -> Option<Instant> {
        self.live.values().flat_map(|l| [l.restart_at, l.started.map(|_| l.next_probe)]).flatten().min()
    }

    /// Wakes the loop the moment the container exits (one engine wait per running container).
    fn watch(&mut self, svc: &ServiceRef) {
        self.watchers.retain(|_, w| !w.is_finished());
        if self.watchers.contains_key(svc) {
            return;
        }
        let (runtime, wake, target) = (Arc::clone(&self.runtime), Arc::clone(&self.wake), svc.clone());
        let watcher = tokio::spawn(async move {
            if runtime.service_wait(&target).await.is_err() {
                // The engine is in trouble: no faster than the idle pass.
                tokio::time::sleep(PASS_EVERY).await;
            }
            wake.notify_one();
        });
        self.watchers.insert(svc.clone(), watcher);
    }

    /// One comparison of desired with current state, and the steps that converge them. A
    /// service whose step fails is logged and tried again next pass; it never holds up the
    /// others.
    pub async fn pass(&mut self) -> anyhow::Result<()> {
        let records = self.book.all()?;
        let containers = match self.runtime.service_list().await {
            Ok(containers) => containers,
            Err(e) => {
                self.engine_lost(&e);
                return Err(e.into());
            }
        };
        let targets: HashMap<String, Option<Target>> =
            records.iter().map(|r| (r.service.clone(), r.target())).collect();
        for c in &containers {
            let wanted = targets.get(&c.service.name).and_then(Option::as_ref);
            if wanted.is_none_or(|t| t.revision != c.service.revision || t.deployment != c.service.deployment)
            {
                tracing::info!(service = %c.service.name, deployment = %c.service.deployment, revision = c.service.revision, "removing a container that is not the service's target");
                if let Err(e) = self.runtime.service_remove(&c.service).await {
                    tracing::warn!(service = %c.service.name, error = %e, "cannot remove a stale service container; trying again");
                }
            }
        }
        for rec in records {
            let done = match rec.target() {
                Some(t) => {
                    let container = containers.iter().find(|c| {
                        c.service.name == rec.service
                            && c.service.revision == t.revision
                            && c.service.deployment == t.deployment
                    });
                    self.converge(&rec, t, container).await
                }
                None => self.removed(&rec).await,
            };
            if let Err(e) = done {
                tracing::warn!(service = %rec.service, error = %e, "service step failed; trying again");
            }
        }
        // Inputs of revisions that are neither wanted nor have a container any more.
        let keep: HashSet<(String, String, u64)> = targets
            .iter()
            .filter_map(|(name, t)| t.as_ref().map(|t| (name.clone(), t.deployment.clone(), t.revision)))
            .chain(
                containers
                    .iter()
                    .map(|c| (c.service.name.clone(), c.service.deployment.clone(), c.service.revision)),
            )
            .collect();
        self.staging.retain(|svc, handle| {
            let wanted = keep.contains(&(svc.name.clone(), svc.deployment.clone(), svc.revision));
            if !wanted {
                handle.abort();
            }
            wanted
        });
        if let Err(e) = inputs::sweep(&self.inputs.root, &keep).await {
            tracing::warn!(error = %e, "cannot remove the inputs of old service revisions");
        }
        Ok(())
    }

    /// The engine does not answer, so nothing is known of the containers: a service reported
    /// healthy is reported unhealthy until the engine answers and a probe passes again.
    fn engine_lost(&mut self, e: &RuntimeError) {
        let healthy: Vec<String> = self
            .live
            .iter()
            .filter(|(_, l)| l.state == ServiceState::Healthy)
            .map(|(name, _)| name.clone())
            .collect();
        for name in healthy {
            if let Some(l) = self.live.get_mut(&name) {
                l.healthy = false;
                l.healthy_since = None;
                l.state = ServiceState::Unhealthy;
                l.message =
                    Some(format!("the container engine does not answer, so its health is unknown: {e}"));
            }
            if let Err(e) = self.report(&name) {
                tracing::warn!(service = %name, error = %e, "cannot write a service report");
            }
        }
    }

    /// The control plane removed the service (or refused its only desired state): nothing runs.
    async fn removed(&mut self, rec: &ServiceRecord) -> anyhow::Result<()> {
        let Some(d) = &rec.desired else { return Ok(()) };
        if d.body.spec.is_some() {
            return Ok(());
        }
        let now = Instant::now();
        let live = self
            .live
            .entry(rec.service.clone())
            .or_insert_with(|| Live::of(&d.body.deployment, d.body.revision, 1, now));
        if live.reported.is_some_and(|(s, _, _)| s == ServiceState::Removed) {
            return Ok(());
        }
        self.runtime.service_forget(&rec.service, false).await?;
        live.state = ServiceState::Removed;
        live.revision = d.body.revision;
        live.deployment = d.body.deployment.clone();
        live.message = Some("removed by the control plane; its volume is kept".into());
        self.ledger.audit("service.removed", &format!("service {}", rec.service))?;
        self.report(&rec.service)
    }

    async fn converge(
        &mut self,
        rec: &ServiceRecord,
        t: Target,
        container: Option<&ManagedService>,
    ) -> anyhow::Result<()> {
        let now = Instant::now();
        let name = rec.service.clone();
        let live = self.live.entry(name.clone()).or_insert_with(|| Live::new(&t, now));
        if live.revision != t.revision || live.deployment != t.deployment {
            *live = Live::new(&t, now);
        }
        let svc = ServiceRef { name: name.clone(), deployment: t.deployment.clone(), revision: t.revision };
        let probe_after =
            t.spec.health.as_ref().map_or(Duration::ZERO, |h| Duration::from_millis(h.interval_ms));
        let policy = t.spec.restart;
        let max_backoff = Duration::from_millis(policy.backoff_max_ms);
        match container.map(|c| &c.state) {
            None | Some(ContainerState::Created) => {
                if live.restart_at.is_some_and(|at| now < at) {
                    live.state = ServiceState::Restarting;
                } else {
                    let fresh = container.is_none();
                    let refusal = super::publish_refusal(&t.spec, &self.allow).or_else(|| {
                        super::policy_refusal(&t.spec, &t.deployment, &self.org_id, &self.policy.get())
                    });
                    let created = match refusal {
                        // The site narrowed publish_allow or its policy since this desired state
                        // arrived.
                        Some(why) if fresh => Err(RuntimeError::Invalid(why)),
                        _ if fresh => {
                            match staged(&mut self.staging, &self.inputs, &self.wake, &svc, &t.spec.inputs) {
                                Staged::Ready(input) => self
                                    .runtime
                                    .service_create(&svc, &t.spec, input.as_deref())
                                    .await
                                    .map(|_| true),
                                Staged::Copying => Ok(false),
                                Staged::Failed(e) => Err(e),
                            }
                        }
                        _ => Ok(true),
                    };
                    match created {
                        // Copying again after a failure: the failure stays what is reported.
                        Ok(false) if live.restart_at.is_some() => {}
                        Ok(false) => {
                            live.state = ServiceState::Pending;
                            live.message = Some(format!(
                                "copying {} input entries from the local object store",
                                t.spec.inputs.len()
                            ));
                        }
                        Ok(true) => match self.runtime.service_start(&svc).await {
                            Ok(()) => {
                                if live.started.is_some() || live.restart_at.is_some() {
                                    live.restarts = live.restarts.saturating_add(1);
                                    self.restarts.inc();
                                }
                                started(live, now, probe_after);
                            }
                            Err(e) => not_started(live, e, now, max_backoff)?,
                        },
                        Err(e) => not_started(live, e, now, max_backoff)?,
                    }
                }
            }
            Some(ContainerState::Running { .. }) => {
                if live.started.is_none() {
                    // Adopted: running since before this agent started.
                    started(live, now, probe_after);
                }

                if now >= live.next_probe {
                    live.next_probe = now
                        + t.spec
                            .health
                            .as_ref()
                            .map_or(Duration::from_millis(500), |h| Duration::from_millis(h.interval_ms));
                    let (ok, output) = match &t.spec.health {
                        Some(check) => {
                            probe(self.runtime.as_ref(), &svc, check, container.and_then(|c| c.address)).await
                        }
                        None => (true, String::new()),
                    };
                    let in_start_period = t.spec.health.as_ref().is_some_and(|h| {
                        live.started
                            .is_some_and(|s| now.duration_since(s) < Duration::from_millis(h.start_period_ms))
                    });
                    live.health_output = output;
                    if ok {
                        live.failures = 0;
                        if !live.healthy {
                            live.healthy = true;
                            live.healthy_since = Some(now);
                        }
                        live.ever_healthy = true;
                        live.state = ServiceState::Healthy;
                        live.message = None;
                    } else if !in_start_period {
                        live.failures = live.failures.saturating_add(1);
                        let retries = t.spec.health.as_ref().map_or(1, |h| h.retries);
                        if live.failures >= retries {
                            live.healthy = false;
                            live.healthy_since = None;
                            live.state = ServiceState::Unhealthy;
                        }
                    }
                }
                if live.healthy_since.is_some_and(|s| now.duration_since(s) >= BACKOFF_RESET_AFTER) {
                    live.backoff = Duration::from_millis(policy.backoff_initial_ms);
                }
            }
            Some(ContainerState::Exited { exit_code, oom_killed, .. }) => {
                let (exit_code, oom) = (*exit_code, *oom_killed);
                live.last_exit = Some(exit_code);
                live.healthy = false;
                live.healthy_since = None;
                let restart = match policy.mode {
                    RestartMode::Always => true,
                    RestartMode::OnFailure => exit_code != 0,
                    RestartMode::Never => false,
                };
                let why = if oom { "OOM-killed".to_owned() } else { format!("exited with code {exit_code}") };
                if !restart {
                    live.state = if exit_code == 0 { ServiceState::Stopped } else { ServiceState::Failed };
                    live.message =
                        Some(format!("{why}; restart policy {:?} does not restart it", policy.mode));
                } else if live.restart_at.is_none() {
                    live.restart_at = Some(now + live.backoff);
                    live.message = Some(format!("{why}; restarting in {} ms", live.backoff.as_millis()));
                    live.backoff = (live.backoff * 2).min(max_backoff);
                    live.state = ServiceState::Restarting;
                } else if live.restart_at.is_some_and(|at| now >= at) {
                    match self.runtime.service_start(&svc).await {
                        Ok(()) => {
                            live.restarts = live.restarts.saturating_add(1);
                            self.restarts.inc();
                            started(live, now, probe_after);
                        }
                        // Failed like a first start: reported, and tried again after the
                        // backoff (never at once: the loop would spin).
                        Err(e) => not_started(live, e, now, max_backoff)?,
                    }
                }
            }
        }
        let live_now = live.clone();
        if matches!(container.map(|c| &c.state), Some(ContainerState::Running { .. }))
            || live_now.state == ServiceState::Starting
        {
            self.watch(&svc);
        }
        // Changes to the record below apply only if no newer desired state arrived meanwhile.
        let desired = rec.desired.as_ref().map(|d| (d.body.deployment.clone(), d.body.revision, d.body.seq));
        let seq = desired.as_ref().map(|d| d.2);
        let is_desired =
            desired.as_ref().is_some_and(|(dep, rev, _)| *dep == t.deployment && *rev == t.revision);
        // The health gate of a new revision: not healthy in time → back to the last healthy one.
        let gate = Duration::from_secs(t.spec.health_timeout_secs);
        if !live_now.ever_healthy && now.duration_since(live_now.since) > gate && is_desired {
            match &rec.last_healthy {
                Some(h) if h.revision != t.revision || h.deployment != t.deployment => {
                    let mut detail = format!(
                        "service {name}: revision {} not healthy within {} s; back to revision {} of deployment {}",
                        t.revision, t.spec.health_timeout_secs, h.revision, h.deployment
                    );
                    if let Some(why) = &live_now.message {
                        detail.push_str(&format!(" (last: {why})"));
                    }
                    let draft = Draft {
                        service: name.clone(),
                        deployment: t.deployment.clone(),
                        revision: t.revision,
                        state: ServiceState::RolledBack,
                        restarts: live_now.restarts,
                        last_exit: live_now.last_exit,
                        health_output: live_now.health_output.clone(),
                        message: Some(detail.clone()),
                    };
                    // The decision and its report are one durable batch: a kill -9 between them
                    // can lose neither.
                    let written = self.book.update(
                        &name,
                        |r| {
                            let current = r.desired.as_ref().map(|d| d.body.seq) == seq;
                            if current {
                                r.rolled_back_from = Some(t.revision);
                            }
                            current
                        },
                        Some((draft, now_unix_ms())),
                    )?;
                    if written.is_some() {
                        tracing::warn!("{detail}");
                        self.ledger.audit("service.rolled_back", &detail)?;
                        self.reported.notify_one();
                    }
                    self.live.remove(&name);
                    self.wake.notify_one();
                    return Ok(());
                }
                _ if !live_now.gate_reported => {
                    if let Some(l) = self.live.get_mut(&name) {
                        l.gate_reported = true;
                        l.message = Some(format!(
                            "not healthy within {} s and no earlier healthy revision to go back to",
                            t.spec.health_timeout_secs
                        ));
                        if l.state == ServiceState::Starting {
                            l.state = ServiceState::Unhealthy;
                        }
                    }
                }
                _ => {}
            }
        }
        if live_now.state == ServiceState::Healthy && is_desired {
            let known = rec
                .last_healthy
                .as_ref()
                .is_some_and(|h| h.revision == t.revision && h.deployment == t.deployment);
            if !known {
                let healthy = HealthyRevision {
                    deployment: t.deployment.clone(),
                    revision: t.revision,
                    spec: t.spec.clone(),
                };
                self.book.update(
                    &name,
                    |r| {
                        let current = r.desired.as_ref().map(|d| d.body.seq) == seq;
                        if current {
                            r.last_healthy = Some(healthy);
                        }
                        current
                    },
                    None,
                )?;
            }
        }
        self.report(&name)
    }

    /// Writes a report when the state, revision or restart count changed since the last one.
    fn report(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(live) = self.live.get_mut(name) else { return Ok(()) };
        let key = (live.state, live.revision, live.restarts);
        if live.reported == Some(key) {
            return Ok(());
        }
        let draft = Draft {
            service: name.to_owned(),
            deployment: live.deployment.clone(),
            revision: live.revision,
            state: live.state,
            restarts: live.restarts,
            last_exit: live.last_exit,
            health_output: live.health_output.clone(),
            message: live.message.clone(),
        };
        let r = self.book.report(draft, now_unix_ms())?;
        tracing::info!(service = %name, revision = r.revision, state = ?r.state, restarts = r.restarts, "service state");
        live.reported = Some(key);
        self.reported.notify_one();
        Ok(())
    }
}

/// A container (re)started now; as Docker does, its first probe is one interval later.
fn started(live: &mut Live, now: Instant, probe_after: Duration) {
    live.started = Some(now);
    live.restart_at = None;
    live.failures = 0;
    live.healthy = false;
    live.state = ServiceState::Starting;
    live.next_probe = now + probe_after;
    live.message = None;
}

/// A create or start that failed (image missing, a refused spec, a port already taken): the
/// service is failed with the engine's reason and tried again after its backoff. (An engine that
/// does not answer at all fails the whole pass before this, at the listing.)
fn not_started(live: &mut Live, e: RuntimeError, now: Instant, max_backoff: Duration) -> anyhow::Result<()> {
    live.state = ServiceState::Failed;
    live.message = Some(e.to_string());
    live.restart_at = Some(now + live.backoff);
    live.backoff = (live.backoff * 2).min(max_backoff);
    Ok(())
}

/// Where a fresh revision's inputs stand.
enum Staged {
    /// Staged (or none named): the directory to mount.
    Ready(Option<PathBuf>),
    /// Being copied by a task of its own, which wakes the loop when done.
    Copying,
    /// Could not be staged: the revision fails and is retried after its backoff (a missing
    /// object may be put there later).
    Failed(RuntimeError),
}

/// The revision's inputs, copied once per revision out of the local object store by a task of
/// its own, so that a large copy never holds up the other services. A directory that exists is
/// complete (staging renames it into place).
fn staged(
    staging: &mut HashMap<ServiceRef, tokio::task::JoinHandle<Result<PathBuf, RuntimeError>>>,
    source: &InputSource,
    wake: &Arc<Notify>,
    svc: &ServiceRef,
    entries: &[String],
) -> Staged {
    if entries.is_empty() {
        return Staged::Ready(None);
    }
    if let Some(handle) = staging.remove(svc) {
        if !handle.is_finished() {
            staging.insert(svc.clone(), handle);
            return Staged::Copying;
        }
        return match handle.now_or_never() {
            Some(Ok(Ok(dir))) => Staged::Ready(Some(dir)),
            Some(Ok(Err(e))) => Staged::Failed(e),
            Some(Err(e)) => Staged::Failed(RuntimeError::Invalid(format!("staging the inputs stopped: {e}"))),
            None => Staged::Copying,
        };
    }
    match inputs::dir(&source.root, svc) {
        Ok(dir) if dir.is_dir() => return Staged::Ready(Some(dir)),
        Ok(_) => {}
        Err(e) => {
            return Staged::Failed(RuntimeError::Invalid(format!("cannot stage the service's inputs: {e}")));
        }
    }
    let (objects, root, svc_owned, entries) =
        (Arc::clone(&source.objects), source.root.clone(), svc.clone(), entries.to_vec());
    let wake = Arc::clone(wake);
    let handle = tokio::spawn(async move {
        let r = match inputs::stage(objects.as_ref(), &root, &svc_owned, &entries).await {
            Ok(dir) => Ok(dir),
            Err(e) if e.is_retryable() => {
                Err(RuntimeError::Unavailable(format!("cannot stage the service's inputs: {e}")))
            }
            Err(e) => Err(RuntimeError::Invalid(format!("cannot stage the service's inputs: {e}"))),
        };
        wake.notify_one();
        r
    });
    staging.insert(svc.clone(), handle);
    Staged::Copying
}
