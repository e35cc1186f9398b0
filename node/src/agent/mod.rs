//! `outpost run`: the agent's long-running services wired together. The poller fetches and
//! persists jobs, executors run them, the reporter drains the outbox, and the heartbeat and
//! status tasks tell the world how the node is. All state that matters lives in the ledger;
//! the in-memory parts here can be lost at any moment without losing a job.

mod approvals;
mod audit_uplink;
mod bundles;
mod events;
mod executor;
mod heartbeat;
mod infer;
mod local_triggers;
mod logs;
mod metrics;
mod poller;
mod renewal;
mod reporter;
mod rotation;
mod service_reports;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::clock::now_unix_ms;
use crate::config::Config;
use crate::identity::Identity;
use crate::inference::Inference;
use crate::ledger::{JobState, Ledger};
use crate::objstore::AnyStore;
use crate::relay::Relay;
use crate::runtime::{JobRef, Runtime};
use crate::status::{self, Status};
use crate::uplink::Uplink;
use crate::verify::ManifestVerifier;

/// How often the agent checks that its ledger can still be written.
const LEDGER_PROBE: Duration = Duration::from_secs(5);

/// What the services share besides the ledger: wake-ups and connection health.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Why the agent stopped itself: its state store failed (a full disk), and going on would
    /// mean doing again, in a loop, what it cannot record. Set once; `run` then returns it.
    fatal: Mutex<Option<String>>,
    /// Something was added to the ledger that an executor should start.
    work: Notify,
    /// A result entered the outbox.
    outbox: Notify,
    /// A job left the queue (finished), so the poller may fetch more.
    capacity: Notify,
    connected: AtomicBool,
    last_contact_unix_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
    running: Mutex<BTreeSet<String>>,
    /// Jobs started per submitter ([`crate::policy::submitter_key`]), for
    /// `[policy] max_jobs_per_submitter`; an entry leaves with its last job.
    per_submitter: Mutex<std::collections::HashMap<String, u64>>,
    ready: AtomicBool,
    /// The container runtime answered and the last run's containers are reconciled: jobs run.
    runtime_ready: AtomicBool,
    /// Why the runtime is not ready, while it is not.
    runtime_error: Mutex<Option<String>>,
    /// Something `outpost status` shows has changed: rewrite the status file soon.
    changed: Notify,
    /// Stop signals of attempts the control plane asked to cancel, with the reason; an entry
    /// lives until the attempt's executor ends (bounded by the queue limit).
    cancels: Mutex<std::collections::HashMap<String, (CancellationToken, String)>>,
    /// Log requests being served (bounded by `logs::MAX_STREAMS`).
    log_streams: Mutex<std::collections::HashSet<String>>,
    /// When contact with the control plane was last written to the ledger (trust window).
    trust_written: AtomicU64,
    /// Figures the metrics endpoint counts as they happen.
    counted: metrics::Counted,
    /// Where the metrics endpoint listens, once it does.
    metrics_addr: Mutex<Option<String>>,
}

impl Shared {
    /// Signals the attempt's executor to stop; false when it was signalled before.
    fn request_cancel(&self, job_id: &str, attempt: u32, reason: &str) -> bool {
        let Ok(mut map) = self.cancels.lock() else { return false };
        let (token, why) = map.entry(format!("{job_id}/{attempt}")).or_default();
        if token.is_cancelled() {
            return false;
        }
        *why = reason.to_owned();
        token.cancel();
        true
    }

    /// The stop signal of an attempt (created on first use) and the reason once signalled.
    fn cancel_signal(&self, job_id: &str, attempt: u32) -> CancellationToken {
        self.cancels
            .lock()
            .map(|mut map| map.entry(format!("{job_id}/{attempt}")).or_default().0.clone())
            .unwrap_or_default()
    }

    /// Whether a stop was asked for this attempt (without making an entry for it).
    fn cancel_requested(&self, job_id: &str, attempt: u32) -> bool {
        self.cancels
            .lock()
            .map(|map| map.get(&format!("{job_id}/{attempt}")).is_some_and(|(t, _)| t.is_cancelled()))
            .unwrap_or(false)
    }

    fn cancel_reason(&self, job_id: &str, attempt: u32) -> String {
        self.cancels
            .lock()
            .ok()
            .and_then(|map| map.get(&format!("{job_id}/{attempt}")).map(|(_, why)| why.clone()))
            .unwrap_or_default()
    }

    fn forget_cancel(&self, job_id: &str, attempt: u32) {
        if let Ok(mut map) = self.cancels.lock() {
            map.remove(&format!("{job_id}/{attempt}"));
        }
    }

    fn runtime_failed(&self, err: &dyn std::fmt::Display) {
        if let Ok(mut e) = self.runtime_error.lock() {
            *e = Some(err.to_string());
        }
        self.changed.notify_one();
    }

    /// The engine answered. Clears the error only once jobs run: before that, the error may be
    /// a failed reconciliation, which an answering engine does not fix.
    fn runtime_answered(&self) {
        if !self.runtime_ready.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut e) = self.runtime_error.lock()
            && e.take().is_some()
        {
            self.changed.notify_one();
        }
    }

    fn contact_ok(&self) {
        if !self.connected.swap(true, Ordering::Relaxed) {
            self.changed.notify_one();
        }
        self.last_contact_unix_ms.store(now_unix_ms(), Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
    }

    fn contact_failed(&self, err: &dyn std::fmt::Display) {
        if self.connected.swap(false, Ordering::Relaxed) {
            self.changed.notify_one();
        }
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(explain_contact_error(err.to_string()));
        }
    }
}

/// A failed contact as `outpost status` shows it, with what to do where the answer is final: a
/// revoked node is refused in the TLS handshake (a `CertificateRevoked` alert) or, on a
/// connection opened before, with `node_revoked`.
fn explain_contact_error(text: String) -> String {
    if text.contains("CertificateRevoked") || text.contains("node_revoked") {
        format!(
            "{text} (this node was revoked by an operator of the control plane: enroll it again with a new \
             enrollment token, `outpost enroll`)"
        )
    } else {
        text
    }
}

pub struct Agent<R: Runtime> {
    pub(crate) cfg: Config,
    pub(crate) identity: Identity,
    pub(crate) ledger: Ledger,
    pub(crate) runtime: Arc<R>,
    /// The local object store (`[storage]`): job inputs and outputs, and what the relay watches.
    pub(crate) objects: Arc<AnyStore>,
    /// Present when `[relay]` has watches: turns new objects into events for the uplink.
    pub(crate) relay: Option<Arc<Relay<AnyStore>>>,
    pub(crate) uplink: Uplink,
    pub(crate) verifier: ManifestVerifier,
    /// The tag of the control plane's trust document last taken (or refused): a poll answer
    /// with another sends the agent to fetch it.
    pub(crate) trust_tag: Mutex<Option<String>>,
    /// Wakes the renewal task to renew at once (a CA rotation: the next certificate comes
    /// from the new CA).
    pub(crate) renew_now: Notify,
    /// Held while the identity files or the uplink's TLS configuration change (renewal, a
    /// trust rotation), so that neither undoes the other's change.
    pub(crate) identity_lock: tokio::sync::Mutex<()>,
    /// Inference jobs and the local endpoint: models load on first use.
    pub(crate) inference: Arc<Inference>,
    pub(crate) shared: Arc<Shared>,
    /// Containers being created and started at the same moment (see `executor`).
    pub(crate) launch: Semaphore,
    /// The services' desired state and report outbox.
    pub(crate) services: crate::services::book::ServiceBook,
    /// Wakes the service reconciler: a desired state changed.
    pub(crate) service_wake: Arc<Notify>,
    /// Wakes the service report sender: a report was written.
    pub(crate) service_reported: Arc<Notify>,
    /// One bundle import (or the finishing of an interrupted one) at a time.
    pub(crate) bundle_lock: tokio::sync::Mutex<()>,
    /// Held while a waiting job is approved, denied, expired or cancelled: one decision each.
    pub(crate) decisions: std::sync::Mutex<()>,
    /// The site policy in force: `cfg.policy` at start, replaced on SIGHUP.
    pub(crate) policy: crate::policy::Current,
    /// The configuration file the agent was started with (`--config`), reloaded on SIGHUP.
    pub(crate) config_path: Option<std::path::PathBuf>,
}

/// How many containers the agent creates and starts at once: one per CPU (at least two), since
/// the engine's create/start work is CPU- and lock-bound.
fn launch_concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).max(2)
}

impl<R: Runtime> Agent<R> {
    pub fn new(
        cfg: Config,
        identity: Identity,
        ledger: Ledger,
        runtime: R,
        objects: AnyStore,
    ) -> anyhow::Result<Self> {
        let uplink = identity
            .uplink(cfg.control.url.as_deref(), Duration::from_secs(cfg.control.request_timeout_secs))?;
        let cfg_identity_dir = cfg.identity_dir();
        let verifier = ManifestVerifier::with_keys(&identity.node.node_id, &identity.org_keys)
            .map_err(|e| anyhow::anyhow!("pinned org key in the identity is unusable: {e}"))?;
        let relay = if cfg.relay.watches.is_empty() {
            None
        } else {
            let relay_cfg = crate::relay::RelayConfig {
                allowed_event_fields: cfg.egress.allow_event_fields.clone(),
                ..cfg.relay.clone()
            };
            let audit_ledger = ledger.clone();
            let mut relay = Relay::new(objects.clone(), Arc::clone(ledger.store()), relay_cfg)
                .map_err(|e| anyhow::anyhow!("[relay]: {e}"))?
                .with_audit(Arc::new(move |action: &str, detail: &str| {
                    if let Err(e) = audit_ledger.audit(action, detail) {
                        tracing::error!(error = %e, action, detail, "cannot write the audit log");
                    }
                }));
            if !cfg.relay.triggers.is_empty() {
                relay = relay.with_event_hook(local_triggers::hook(cfg.relay.triggers.clone()));
            }
            Some(Arc::new(relay))
        };
        let inference =
            Arc::new(Inference::new(&cfg.inference, crate::models::ModelStore::new(cfg.models_dir())));
        Ok(Self {
            relay,
            inference,
            policy: crate::policy::Current::new(crate::policy::Policy {
                org: crate::org_settings::load(&cfg.data_dir).map_err(anyhow::Error::msg)?,
                ..cfg.policy.clone()
            }),
            config_path: None,
            cfg,
            identity,
            runtime: Arc::new(runtime),
            objects: Arc::new(objects),
            uplink,
            verifier,
            trust_tag: Mutex::new(
                crate::rotation::load(&cfg_identity_dir)
                    .map_err(anyhow::Error::msg)?
                    .map(|accepted| accepted.tag),
            ),
            renew_now: Notify::new(),
            identity_lock: tokio::sync::Mutex::new(()),
            shared: Arc::default(),
            launch: Semaphore::new(launch_concurrency()),
            services: crate::services::book::ServiceBook::new(Arc::clone(ledger.store())),
            service_wake: Arc::default(),
            bundle_lock: tokio::sync::Mutex::new(()),
            decisions: std::sync::Mutex::new(()),
            service_reported: Arc::default(),
            ledger,
        })
    }

    /// Reload the site policy from `path` (what `--config` named; none: the default path) when
    /// the agent gets SIGHUP.
    pub fn reloading_from(self, path: Option<std::path::PathBuf>) -> Self {
        Self { config_path: path, ..self }
    }

    /// Run until `shutdown` is cancelled, then drain: stop fetching, give in-flight reports
    /// the grace period, and leave running containers to be adopted by the next start.
    ///
    /// The agent is ready once its own services run (outbox, heartbeat, relay, local endpoint);
    /// it does not wait for the container runtime. Fetching and running jobs start once the
    /// runtime answers and the containers of the last run are reconciled with the ledger, so a
    /// node whose Docker is slow to start, or broken, still reports its health and says why.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let agent = Arc::new(self);
        let started = now_unix_ms();
        agent.record_policy()?;
        // The copy of the remembered images `outpost policy show` reads, current from the start.
        match crate::approvals::remembered(agent.ledger.store().as_ref()) {
            Ok(all) if !all.is_empty() => crate::approvals::write_remembered_file(&agent.cfg, &all),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the remembered images"),
        }

        let tasks = TaskTracker::new();
        if agent.cfg.inference.api.enabled {
            let endpoint =
                crate::inference::api::bind(Arc::clone(&agent.inference), &agent.cfg.inference.api).await?;
            let token = shutdown.clone();
            tasks.spawn(async move {
                if let Err(e) = endpoint.serve(token).await {
                    tracing::error!(error = %e, "the inference endpoint stopped");
                }
            });
        }
        if agent.cfg.metrics.enabled {
            tasks.spawn(Arc::clone(&agent).serve_metrics(shutdown.clone()));
        }
        let uplink = agent.cfg.control.uplink;
        if uplink {
            tasks.spawn(Arc::clone(&agent).reporter(shutdown.clone()));
            tasks.spawn(Arc::clone(&agent).service_report_sender(shutdown.clone()));
            tasks.spawn(Arc::clone(&agent).heartbeat(shutdown.clone()));
            tasks.spawn(Arc::clone(&agent).renewal(shutdown.clone()));
            tasks.spawn(Arc::clone(&agent).audit_uplink(shutdown.clone()));
        } else {
            tracing::info!(
                "[control] uplink = false: the control plane is never dialled; results, events and reports \
                 leave in results bundles (`outpost bundle export`)"
            );
        }
        if let Some(relay) = &agent.relay {
            let relay = Arc::clone(relay);
            let relay_agent = Arc::clone(&agent);
            let token = shutdown.clone();
            tasks.spawn(async move {
                // `run` logs why it stopped. A state store that cannot be written (a full disk)
                // stops the agent, to be started again by its service manager; anything else
                // (a corrupt state, a bad watch) needs an operator, and the rest carries on.
                if let Err(crate::relay::RelayError::State(e)) = relay.run(token.clone()).await {
                    relay_agent.fail_stop(format!("the relay cannot write its state: {e}"), &token);
                }
            });
            if uplink {
                tasks.spawn(Arc::clone(&agent).event_sender(shutdown.clone()));
            }
            tracing::info!(
                watches = agent.cfg.relay.watches.len(),
                bucket = agent.cfg.bucket_name(),
                "relay started"
            );
        }
        tasks.spawn(Arc::clone(&agent).bundle_watcher(shutdown.clone()));
        tasks.spawn(Arc::clone(&agent).approvals(shutdown.clone()));
        tasks.spawn(Arc::clone(&agent).policy_reloader(shutdown.clone()));
        tasks.spawn(Arc::clone(&agent).start_jobs(tasks.clone(), shutdown.clone()));

        agent.shared.ready.store(true, Ordering::Relaxed);
        agent.write_status(started);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!(node_id = %agent.identity.node.node_id, control = %agent.uplink.base(), "outpost agent ready");

        let mut watchdog_usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
        let tick = if watchdog {
            Duration::from_micros(watchdog_usec / 2).min(Duration::from_secs(2))
        } else {
            Duration::from_secs(2)
        };
        // The ledger and the data directory are written to now and then: a store that can no
        // longer be written (a full disk; sled then refuses every later write too) stops the
        // agent rather than leave it taking work it cannot record. The file write catches a full
        // disk that sled's preallocated slack would hide for a while.
        let mut last_probe = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(tick) => {
                    if watchdog {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    }
                    agent.write_status(started);
                    if last_probe.elapsed() >= LEDGER_PROBE {
                        last_probe = std::time::Instant::now();
                        let probe = crate::store::Op::Put(
                            crate::store::Tree::Meta,
                            b"agent.alive".to_vec(),
                            now_unix_ms().to_be_bytes().to_vec(),
                        );
                        let written = agent
                            .ledger
                            .store()
                            .apply(vec![probe])
                            .map_err(|e| format!("the ledger cannot be written: {e}"))
                            .and_then(|()| {
                                probe_write(&agent.cfg.data_dir)
                                    .map_err(|e| format!("the data directory cannot be written: {e}"))
                            });
                        if let Err(why) = written {
                            agent.fail_stop(why, &shutdown);
                        }
                    }
                }
                _ = agent.shared.changed.notified() => {
                    // Coalesce bursts (a batch of jobs) into one write.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    agent.write_status(started);
                }
            }
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        tracing::info!(
            "shutting down: no new jobs; running containers stay and are adopted on the next start"
        );
        tasks.close();
        let grace = Duration::from_secs(agent.cfg.agent.shutdown_grace_secs);
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!(?grace, "some tasks did not stop within the grace period");
        }
        agent.shared.ready.store(false, Ordering::Relaxed);
        agent.write_status(started);
        if let Some(why) = agent.shared.fatal.lock().ok().and_then(|mut f| f.take()) {
            anyhow::bail!(
                "stopped: {why}. Nothing is lost: what was not recorded is done again at the next start; \
                 free space in the data directory (outpost doctor), the service manager starts the agent again"
            );
        }
        Ok(())
    }

    /// Stops the agent because its state store failed: set `why` (the first reason wins), and
    /// cancel `shutdown`. Like a crash, which the agent survives by design, but said.
    pub(crate) fn fail_stop(&self, why: String, shutdown: &CancellationToken) {
        tracing::error!(reason = %why, "stopping the agent: its state cannot be recorded");
        if let Ok(mut fatal) = self.shared.fatal.lock()
            && fatal.is_none()
        {
            *fatal = Some(why);
        }
        shutdown.cancel();
    }

    /// Jobs need the runtime: wait for it, reconcile the ledger with the containers the last
    /// run left, and only then start the poller and the dispatcher. Until then no job is
    /// fetched, so none waits on this node for an engine that may never come.
    async fn start_jobs(self: Arc<Self>, tasks: TaskTracker, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            self.wait_for_runtime(&shutdown).await;
            if shutdown.is_cancelled() {
                return;
            }
            match self.reconcile().await {
                Ok(()) => break,
                Err(e) => {
                    let delay = backoff.next_delay();
                    let e = format!("cannot reconcile the containers with the ledger: {e:#}");
                    tracing::error!(error = %e, retry_in = ?delay, "jobs wait");
                    self.shared.runtime_failed(&e);
                    poller::sleep_or_cancel(&shutdown, delay).await;
                }
            }
        }
        if shutdown.is_cancelled() {
            return; // stopped while reconciling: the next start fetches and runs
        }
        // A bundle whose import was interrupted is finished before any job runs.
        self.finish_interrupted_import().await;
        let slots = Arc::new(Semaphore::new(self.cfg.agent.max_concurrent_jobs as usize));
        if self.cfg.control.uplink {
            tasks.spawn(Arc::clone(&self).poller(shutdown.clone()));
        }
        tasks.spawn(self.service_reconciler().run(shutdown.clone()));
        tasks.spawn(Arc::clone(&self).dispatcher(slots, tasks.clone(), shutdown));
        self.shared.runtime_ready.store(true, Ordering::Relaxed);
        self.shared.runtime_answered();
        self.shared.changed.notify_one();
        tracing::info!("container runtime ready: fetching and running jobs");
    }

    /// Wait for the runtime with backoff, saying why it is not there yet.
    async fn wait_for_runtime(&self, shutdown: &CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            // A socket-activated engine accepts the call and answers once dockerd is up: keep
            // waiting for that answer, but say meanwhile that it has not come.
            let call = self.runtime.info();
            tokio::pin!(call);
            let answer = tokio::select! {
                r = &mut call => r,
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    self.shared.runtime_failed(&"the container engine has not answered yet");
                    tokio::select! {
                        r = &mut call => r,
                        _ = shutdown.cancelled() => return,
                    }
                }
            };
            match answer {
                Ok(_) => return,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "container runtime not reachable yet");
                    self.shared.runtime_failed(&e);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// After a restart: finished jobs whose container is still there get it removed; staged and
    /// running jobs are picked up by the dispatcher, which adopts their containers. Containers
    /// labelled as ours that the ledger does not know are left alone and audited.
    async fn reconcile(&self) -> anyhow::Result<()> {
        let records = self.ledger.all()?;
        let live: BTreeSet<(String, u32)> = records
            .iter()
            .filter(|r| matches!(r.state, JobState::Staged | JobState::Running))
            .map(|r| (r.job_id.clone(), r.attempt))
            .collect();
        match crate::jobdata::sweep(&self.cfg.data_dir, |job, attempt| {
            live.contains(&(job.to_owned(), attempt))
        })
        .await
        {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(removed = n, "removed job data left by a crash after its result was persisted")
            }
            Err(e) => tracing::warn!(error = %e, "cannot sweep leftover job data"),
        }
        let managed = self.runtime.list_managed().await?;
        for m in &managed {
            match records.iter().find(|r| r.job_id == m.job.job_id && r.attempt == m.job.attempt) {
                Some(r)
                    if matches!(
                        r.state,
                        JobState::Finished | JobState::Reported | JobState::Undeliverable
                    ) =>
                {
                    if let Err(e) = self.runtime.remove(&m.job).await {
                        tracing::warn!(job = %m.job.job_id, error = %e, "could not remove the container of a finished job");
                    }
                }
                Some(_) => {}
                None => {
                    let detail = format!(
                        "container {} for job {} is not in the ledger; left untouched",
                        m.container_id, m.job.job_id
                    );
                    tracing::warn!("{detail}");
                    self.ledger.audit("container.orphan", &detail)?;
                }
            }
        }
        let pending =
            records.iter().filter(|r| matches!(r.state, JobState::Staged | JobState::Running)).count();
        let outbox = records.iter().filter(|r| r.state == JobState::Finished).count();
        tracing::info!(pending, outbox, containers = managed.len(), "reconciled ledger with the runtime");
        Ok(())
    }

    /// Whom `[policy] max_jobs_per_submitter` counts `rec` against.
    fn submitter_key(&self, rec: &crate::ledger::JobRecord) -> String {
        match &rec.local {
            Some(local) => format!("local-trigger:{}", local.trigger),
            None => crate::policy::submitter_key(rec.signed_body().and_then(|e| e.submitter).as_ref()),
        }
    }

    /// Counts a job of `submitter` as started; false (nothing counted) when it must wait, which
    /// only a job that has not started yet (`staged`) and will not end without running ever
    /// does.
    fn take_submitter_turn(
        &self,
        submitter: &str,
        staged: bool,
        ends_without_running: impl FnOnce() -> bool,
    ) -> bool {
        let Ok(mut counts) = self.shared.per_submitter.lock() else { return false };
        let n = counts.entry(submitter.to_owned()).or_insert(0);
        let max = self.policy.get().max_jobs_per_submitter;
        if staged && max.is_some_and(|max| *n >= max) && !ends_without_running() {
            if *n == 0 {
                counts.remove(submitter);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn end_submitter_turn(&self, submitter: &str) {
        if let Ok(mut counts) = self.shared.per_submitter.lock()
            && let Some(n) = counts.get_mut(submitter)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(submitter);
            }
        }
    }

    /// Starts an executor for each staged or running job, at most `max_concurrent_jobs` at once.
    async fn dispatcher(
        self: Arc<Self>,
        slots: Arc<Semaphore>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        loop {
            let notified = self.shared.work.notified();
            let todo = match self.ledger.all() {
                Ok(all) => {
                    all.into_iter().filter(|r| matches!(r.state, JobState::Staged | JobState::Running))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the ledger");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            for rec in todo {
                let key = format!("{}/{}", rec.job_id, rec.attempt);
                if self.shared.running.lock().map(|r| r.contains(&key)).unwrap_or(true) {
                    continue;
                }
                // One submitter's jobs beyond the policy's ceiling wait (staged) for one of its
                // running jobs to end; a job already running (adopted after a restart) counts.
                // A job to be cancelled or refused does not wait: it ends without running. (Asked
                // only of a job that would wait: the policy's check parses its envelope.)
                let submitter = self.submitter_key(&rec);
                let ends_without_running = || {
                    self.shared.cancel_requested(&rec.job_id, rec.attempt)
                        || rec.spec.as_ref().is_some_and(|spec| self.policy_refusal(&rec, spec).is_some())
                };
                if !self.take_submitter_turn(&submitter, rec.state == JobState::Staged, ends_without_running)
                {
                    continue;
                }
                let inserted = match self.shared.running.lock() {
                    Ok(mut running) => running.insert(key),
                    Err(_) => return,
                };
                if !inserted {
                    self.end_submitter_turn(&submitter);
                    continue;
                }
                let permit = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                };
                let agent = Arc::clone(&self);
                let token = shutdown.clone();
                tasks.spawn(async move {
                    let job = JobRef { job_id: rec.job_id.clone(), attempt: rec.attempt };
                    agent.execute(rec, token).await;
                    agent.end_submitter_turn(&submitter);
                    agent.shared.forget_cancel(&job.job_id, job.attempt);
                    if let Ok(mut r) = agent.shared.running.lock() {
                        r.remove(&format!("{}/{}", job.job_id, job.attempt));
                    }
                    drop(permit);
                    agent.shared.capacity.notify_waiters();
                    agent.shared.work.notify_one();
                });
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Writes the site policy's hash to the audit chain when it differs from the one in force
    /// at the last start, so the log shows which policy governed what.
    /// On SIGHUP: load the configuration again and put its `[policy]` in force, writing the
    /// new hash to the audit chain. A configuration that does not load keeps the policy in
    /// force (never fail open) and says why, in the log and the audit chain. Only the policy
    /// changes; every other setting applies at the next start.
    async fn policy_reloader(self: Arc<Self>, shutdown: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGHUP handler: the policy reloads only at start");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hangup.recv() => {}
                _ = shutdown.cancelled() => return,
            }
            match Config::load(self.config_path.as_deref()) {
                Ok(loaded) => {
                    self.policy.set(loaded.config.policy);
                    match self.record_policy() {
                        Ok(()) => tracing::info!(
                            "SIGHUP: [policy] reloaded; other settings apply at the next start (approvers_group included)"
                        ),
                        Err(e) => {
                            tracing::error!(error = %e, "the reloaded policy is in force but not recorded in the audit chain")
                        }
                    }
                }
                Err(e) => {
                    let detail =
                        format!("SIGHUP: the configuration does not load, the policy in force stays: {e}");
                    tracing::error!("{detail}");
                    if let Err(e) = self.ledger.audit("policy.reload_refused", &detail) {
                        tracing::error!(error = %e, "cannot write the audit log");
                    }
                }
            }
        }
    }

    fn record_policy(&self) -> anyhow::Result<()> {
        const KEY: &[u8] = b"policy.hash";
        let store = self.ledger.store();
        let policy = self.policy.get();
        let hash = policy.digest();
        let before = store.get(crate::store::Tree::Meta, KEY)?;
        if before.as_deref() == Some(hash.as_bytes()) {
            return Ok(());
        }
        let detail = if policy.is_open() {
            format!("no site policy: every rule open (hash {hash})")
        } else {
            format!("site policy in force, hash {hash} (see `outpost policy show`)")
        };
        self.ledger.audit("policy.loaded", &detail)?;
        store.apply(vec![crate::store::Op::Put(
            crate::store::Tree::Meta,
            KEY.to_vec(),
            hash.into_bytes(),
        )])?;
        tracing::info!("{detail}");
        Ok(())
    }

    fn write_status(&self, started_unix_ms: u64) {
        let depths = self.ledger.depths().unwrap_or_default();
        let s = Status {
            pid: std::process::id(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            node_id: self.identity.node.node_id.clone(),
            org_id: self.identity.node.org_id.clone(),
            control_url: self.uplink.base().into(),
            ready: self.shared.ready.load(Ordering::Relaxed),
            runtime_ready: self.shared.runtime_ready.load(Ordering::Relaxed),
            runtime_error: self.shared.runtime_error.lock().ok().and_then(|e| e.clone()),
            connected: self.shared.connected.load(Ordering::Relaxed),
            last_contact_unix_ms: Some(self.shared.last_contact_unix_ms.load(Ordering::Relaxed))
                .filter(|t| *t > 0),
            last_error: self.shared.last_error.lock().ok().and_then(|e| e.clone()),
            depths,
            running_jobs: self.shared.running.lock().map(|r| r.iter().cloned().collect()).unwrap_or_default(),
            relay: self.relay.as_ref().and_then(|r| r.metrics().ok()),
            inference: (!self.inference.manager.engines().is_empty())
                .then(|| self.inference.manager.metrics()),
            started_unix_ms,
            updated_unix_ms: now_unix_ms(),
            trust: crate::trust::last_heard(
                self.ledger.store().as_ref(),
                self.identity.node.enrolled_unix_ms,
            )
            .ok()
            .map(|heard| crate::trust::state(heard, self.cfg.trust_window(), now_unix_ms())),
            bundle: crate::bundle::apply::last_bundle(self.ledger.store().as_ref())
                .ok()
                .filter(|b| b.counter > 0)
                .map(|b| crate::bundle::apply::LastBundle { recent: Vec::new(), ..b }),
            metrics: self.shared.metrics_addr.lock().ok().and_then(|m| m.clone()),
        };
        if let Err(e) = status::write(&self.cfg.status_file(), &s) {
            tracing::warn!(error = %e, "cannot write the status file");
        }
    }
}

/// Writes a page to a file in `dir`, syncs it and removes it: whether the data directory takes
/// a write now (a full disk, a read-only remount).
fn probe_write(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = dir.join(".write-probe");
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&[0u8; 4096])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    written
}

#[cfg(test)]
mod tests {
    use super::{explain_contact_error, probe_write};

    #[test]
    fn the_write_probe_leaves_nothing_and_fails_where_nothing_can_be_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        probe_write(dir.path()).expect("a writable directory");
        assert_eq!(std::fs::read_dir(dir.path()).expect("read_dir").count(), 0, "the probe file is removed");
        assert!(probe_write(&dir.path().join("gone")).is_err());
    }

    #[test]
    fn a_revoked_node_is_told_what_to_do_and_other_errors_are_left_alone() {
        let alert =
            "https://cp/v1/node/poll: error sending request: received fatal alert: CertificateRevoked";
        assert!(explain_contact_error(alert.into()).contains("enroll it again with a new enrollment token"));
        let refused = "control plane refused https://cp/v1/node/poll (403 node_revoked): node n was revoked";
        assert!(explain_contact_error(refused.into()).contains("outpost enroll"));
        let down = "https://cp/v1/node/poll: connection refused";
        assert_eq!(explain_contact_error(down.into()), down);
    }
}
