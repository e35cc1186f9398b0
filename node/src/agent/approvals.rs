//! The agent's side of the approval queue (see `crate::approvals`): the unix socket the
//! approvers' commands talk to, and the sweep that ends jobs whose manifest expired while they
//! waited. One request at a time: approvals are rare and each one is a ledger write.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::{JobSpec, Outcome};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::approvals::{self, Details, InputCover, Request, Response, Waiting};
use crate::clock::now_unix_ms;
use crate::ledger::{JobRecord, JobState};
use crate::runtime::Runtime;

/// How often waiting jobs are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Most objects counted per input when `show` says what a job would read.
const COUNT_LIMIT: usize = 10_000;
/// How long a client may take to send its request: one that sends nothing holds no one up.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

impl<R: Runtime> Agent<R> {
    /// Serves the approval socket until shutdown, and sweeps expired waiting jobs.
    pub(super) async fn approvals(self: Arc<Self>, shutdown: CancellationToken) {
        // The sweep runs whatever becomes of the socket: waiting jobs always expire.
        let sweeper = Arc::clone(&self);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = sweep.tick() => sweeper.expire_waiting(),
                }
            }
        });
        let path = approvals::socket_path(&self.cfg);
        let _ = std::fs::remove_file(&path);
        let listener = match tokio::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "cannot open the approval socket; approvals wait");
                return;
            }
        };
        if let Err(e) = self.restrict_socket(&path) {
            // Never leave a socket anyone could use: without its permissions it is closed.
            tracing::error!(error = %e, "cannot restrict the approval socket; it is closed");
            let _ = std::fs::remove_file(&path);
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if let Err(e) = self.answer(stream).await {
                            tracing::warn!(error = %e, "approval request failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "approval socket accept failed"),
                },
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Mode 0660, group `[policy] approvers_group` (root's otherwise).
    fn restrict_socket(&self, path: &std::path::Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(group) = &self.cfg.policy.approvers_group {
            let g = nix::unistd::Group::from_name(group)?
                .ok_or_else(|| anyhow::anyhow!("[policy] approvers_group {group:?} does not exist"))?;
            nix::unistd::chown(path, None, Some(g.gid))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        } else {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }

    async fn answer(&self, stream: tokio::net::UnixStream) -> anyhow::Result<()> {
        let cred = stream.peer_cred()?;
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read).take(approvals::MAX_REQUEST_BYTES as u64);
        tokio::time::timeout(REQUEST_WAIT, reader.read_line(&mut line))
            .await
            .map_err(|_| anyhow::anyhow!("no request within {} s", REQUEST_WAIT.as_secs()))??;
        let response = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error { error: format!("the request does not parse: {e}") },
            Ok(req) => match approvals::may_approve(cred.uid(), self.cfg.policy.approvers_group.as_deref()) {
                Err(why) if !matches!(req, Request::List | Request::Show { .. }) => {
                    let _ = self.ledger.audit("approval.refused", &why);
                    Response::Error { error: why }
                }
                Err(why) => Response::Error { error: why },
                Ok(user) => match self.handle(req, &user, cred.uid()).await {
                    Ok(body) => Response::Ok { body },
                    Err(error) => Response::Error { error },
                },
            },
        };
        let mut text = serde_json::to_string(&response)?;
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
        Ok(())
    }

    async fn handle(&self, req: Request, user: &str, uid: u32) -> Result<serde_json::Value, String> {
        let err = |e: crate::store::StoreError| e.to_string();
        match req {
            Request::List => {
                let waiting: Vec<Waiting> = self
                    .ledger
                    .all()
                    .map_err(err)?
                    .iter()
                    .filter(|r| r.state == JobState::AwaitingApproval)
                    .map(waiting)
                    .collect();
                Ok(serde_json::to_value(waiting).unwrap_or_default())
            }
            Request::Show { id } => {
                let rec = self.waiting_record(&id)?;
                Ok(serde_json::to_value(self.details(&rec).await).unwrap_or_default())
            }
            Request::Approve { id, remember } => {
                // Decided under the lock a cancel takes too: never both.
                let _one = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
                let mut rec = self.waiting_record(&id)?;
                if expired(&rec, now_unix_ms()) {
                    self.end_waiting(&mut rec, "its manifest expired while it waited for approval")
                        .map_err(err)?;
                    return Err(format!("job {id} expired while it waited; it ends as not_approved"));
                }
                let image = rec.spec.as_ref().and_then(JobSpec::container).map(|c| c.image.clone());
                let inputs =
                    rec.spec.as_ref().map(|s| crate::policy::Work::job(s, None).inputs).unwrap_or_default();
                rec.state = JobState::Staged;
                let mut detail = format!("job {id} approved by {user} (uid {uid})");
                let mut extra = Vec::new();
                let mut now_remembered = None;
                if remember && let Some(image) = &image {
                    let (op, all) = approvals::remember_op(
                        self.ledger.store().as_ref(),
                        image,
                        &inputs,
                        user,
                        now_unix_ms(),
                    )
                    .map_err(err)?;
                    extra.push(op);
                    now_remembered = Some(all);
                    let read: Vec<String> = inputs.iter().map(|k| approvals::input_prefix(k)).collect();
                    detail.push_str(&format!("; image {image} remembered with inputs under {read:?}"));
                }
                self.ledger.update_audited_with(&rec, "job.approved", &detail, extra).map_err(err)?;
                if let Some(all) = &now_remembered {
                    approvals::write_remembered_file(&self.cfg, all);
                }
                tracing::info!("{detail}");
                self.shared.work.notify_one();
                self.shared.changed.notify_one();
                Ok(serde_json::json!({ "approved": id, "remembered": remember && image.is_some() }))
            }
            Request::Deny { id, reason } => {
                let reason = reason.trim();
                if reason.is_empty() || reason.len() > 1000 {
                    return Err(
                        "a denial needs a reason of 1 to 1000 characters: it reaches the operator".into()
                    );
                }
                let _one = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
                let mut rec = self.waiting_record(&id)?;
                self.end_waiting(&mut rec, &format!("denied at the site by {user}: {reason}"))
                    .map_err(err)?;
                Ok(serde_json::json!({ "denied": id }))
            }
        }
    }

    /// The record `id` names, if it waits for approval; else why not.
    fn waiting_record(&self, id: &str) -> Result<JobRecord, String> {
        let (job_id, attempt) = id.rsplit_once('/').map_or((id, None), |(j, a)| (j, a.parse::<u32>().ok()));
        let found: Vec<JobRecord> = self
            .ledger
            .all()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|r| r.job_id == job_id && attempt.is_none_or(|a| a == r.attempt))
            .collect();
        let Some(rec) = found.into_iter().max_by_key(|r| r.attempt) else {
            return Err(format!("no job {id} on this node; see `outpost approvals list`"));
        };
        if rec.state != JobState::AwaitingApproval {
            return Err(format!("job {id} is not waiting for approval (it is {:?})", rec.state));
        }
        Ok(rec)
    }

    /// Ends a waiting job as `not_approved` (denied, or expired), reported and audited.
    fn end_waiting(&self, rec: &mut JobRecord, why: &str) -> Result<(), crate::store::StoreError> {
        let now = now_unix_ms();
        rec.state = JobState::Finished;
        rec.result = Some(crate::intake::unrun_report(rec, Outcome::NotApproved, why, now));
        let detail = format!("job {}/{}: {why}", rec.job_id, rec.attempt);
        self.ledger.update_audited(rec, "job.not_approved", &detail)?;
        tracing::info!("{detail}");
        self.shared.outbox.notify_one();
        self.shared.changed.notify_one();
        Ok(())
    }

    fn expire_waiting(&self) {
        let _one = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_unix_ms();
        let Ok(all) = self.ledger.all() else { return };
        for mut rec in all.into_iter().filter(|r| r.state == JobState::AwaitingApproval && expired(r, now)) {
            if let Err(e) = self.end_waiting(&mut rec, "its manifest expired while it waited for approval") {
                tracing::warn!(error = %e, job = %rec.job_id, "cannot end an expired waiting job");
            }
        }
    }

    async fn details(&self, rec: &JobRecord) -> Details {
        let c = rec.spec.as_ref().and_then(JobSpec::container);
        let image = c.map(|c| c.image.clone());
        let facts = match &image {
            Some(i) => self.runtime.image_facts(i).await.ok(),
            None => None,
        };
        let mut inputs = Vec::new();
        for key in c.map(|c| c.inputs.clone()).unwrap_or_default() {
            inputs.push(self.cover(&key).await);
        }
        let asked = c.map(|c| c.egress_bodies.clone()).unwrap_or_default();
        let allowed = asked
            .iter()
            .filter(|k| self.cfg.egress.allow_body_prefixes.iter().any(|p| k.starts_with(p.as_str())))
            .cloned()
            .collect();
        let work = rec.spec.as_ref().map(|s| crate::policy::Work::job(s, None));
        Details {
            waiting: waiting(rec),
            image_name: image.as_deref().and_then(|d| self.policy.get().image(d).map(|r| r.name.clone())),
            image_size_bytes: facts.as_ref().map(|f| f.size_bytes),
            image_created: facts.map(|f| f.created),
            command: c.map(|c| c.command.clone()).unwrap_or_default(),
            inputs,
            output_prefix: c.and_then(|c| c.output_prefix.clone()),
            egress_asked: asked,
            egress_allowed: allowed,
            network: c.is_some_and(|c| c.network),
            relaxations: work
                .as_ref()
                .map_or_else(Vec::new, |w| w.relaxations.iter().map(|(_, v)| v.clone()).collect()),
            memory_mb: work.as_ref().map_or(0, |w| w.memory_mb),
            cpu_millis: work.as_ref().map_or(0, |w| w.cpu_millis),
            timeout_secs: work.and_then(|w| w.timeout_secs),
        }
    }

    /// How many objects and bytes an input key (or prefix, ending in `/`) covers now.
    async fn cover(&self, key: &str) -> InputCover {
        use crate::objstore::ObjectStore;
        let mut c = InputCover { key: key.to_owned(), objects: 0, bytes: 0, more: false };
        if !key.ends_with('/') {
            if let Ok(m) = self.objects.head(key).await {
                c.objects = 1;
                c.bytes = m.size;
            }
            return c;
        }
        let mut after: Option<String> = None;
        loop {
            let Ok(page) = self.objects.list(key, after.as_deref(), 1000).await else { return c };
            for m in &page.objects {
                if c.objects as usize >= COUNT_LIMIT {
                    c.more = true;
                    return c;
                }
                c.objects += 1;
                c.bytes += m.size;
            }
            match page.next_start_after {
                Some(next) => after = Some(next),
                None => return c,
            }
        }
    }
}

fn expired(rec: &JobRecord, now: u64) -> bool {
    rec.signed_body().is_some_and(|e| e.expires_unix_ms <= now)
}

fn waiting(rec: &JobRecord) -> Waiting {
    let env = rec.signed_body();
    Waiting {
        id: format!("{}/{}", rec.job_id, rec.attempt),
        since_unix_ms: rec.received_unix_ms,
        expires_unix_ms: env.as_ref().map_or(0, |e| e.expires_unix_ms),
        submitter: env.and_then(|e| e.submitter),
        kind: match rec.spec.as_ref() {
            Some(JobSpec::Container(_)) => "container".into(),
            Some(JobSpec::Inference(i)) => outpost_protocol::wire_name(&i.kind),
            None => "unknown".into(),
        },
        image: rec.spec.as_ref().and_then(JobSpec::container).map(|c| c.image.clone()),
    }
}
