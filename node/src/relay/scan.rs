//! The two passes. Both list in pages of at most `batch_size`, evaluate the new or changed
//! objects of a page, and apply the page's events with its cursor/index changes as one batch;
//! both stop when the outbox is full. Nothing is kept in memory between batches that the store
//! does not also hold, so a failed batch leaves the relay exactly where the store says it is.

use std::sync::atomic::Ordering;

use super::config::Watch;
use super::event::{PassReport, RelayEvent};
use super::state::{Batch, CursorState};
use super::validate::{Checks, check_body, check_metadata, content_type_of};
use super::{Relay, RelayError, Result};
use crate::objstore::{ObjectMeta, ObjectStore, ObjectStoreError};

/// What evaluating one object came to.
enum Outcome {
    /// Boxed: an event is large next to `Vanished`.
    Event(Box<RelayEvent>),
    /// Listed, then gone before its body could be read.
    Vanished,
}

impl<S: ObjectStore> Relay<S> {
    /// List every watch after its cursor and event what is new, page by page.
    pub async fn scan_pass(&self) -> Result<PassReport> {
        let _one = self.pass.lock().await;
        let mut report = PassReport::default();
        for watch in &self.config.watches {
            let r = self.scan_watch(watch).await;
            let r = self.settle(&mut report, r)?;
            if r.backpressure {
                break;
            }
        }
        self.counters.backpressure.store(report.backpressure, Ordering::Relaxed);
        Ok(report)
    }

    /// List every watch whole: event objects behind the cursor that are new or whose ETag
    /// changed, and forget index entries of keys that are gone.
    pub async fn reconcile_pass(&self) -> Result<PassReport> {
        let _one = self.pass.lock().await;
        let mut report = PassReport::default();
        for watch in &self.config.watches {
            let r = self.reconcile_watch(watch).await;
            let r = self.settle(&mut report, r)?;
            if r.backpressure {
                break;
            }
        }
        self.counters.backpressure.store(report.backpressure, Ordering::Relaxed);
        Ok(report)
    }

    /// Fold one watch's figures in, counting what was applied even when it then failed.
    fn settle(&self, total: &mut PassReport, r: (PassReport, Result<()>)) -> Result<PassReport> {
        let (part, outcome) = r;
        self.count(&part);
        total.add(part);
        outcome.map(|()| part)
    }

    /// Room left in the outbox for this batch.
    fn room(&self) -> Result<u64> {
        let pending = self.state.pending_keys()?.len() as u64;
        Ok(self.config.outbox_bound.saturating_sub(pending))
    }

    async fn scan_watch(&self, watch: &Watch) -> (PassReport, Result<()>) {
        let mut report = PassReport::default();
        let r = self.scan_watch_inner(watch, &mut report).await;
        (report, r)
    }

    async fn scan_watch_inner(&self, watch: &Watch, report: &mut PassReport) -> Result<()> {
        let mut after = match self.state.cursor(&watch.name, &watch.prefix)? {
            CursorState::At(after) => Some(after),
            CursorState::Fresh => None,
            CursorState::PrefixChanged => {
                tracing::warn!(watch = %watch.name, prefix = %watch.prefix, "relay watch prefix changed; starting it over");
                self.state.apply(self.state.reset_ops(&watch.name)?)?;
                None
            }
        };
        loop {
            let room = self.room()?;
            if room == 0 {
                report.backpressure = true;
                tracing::warn!(watch = %watch.name, bound = self.config.outbox_bound, "relay outbox full; scanning paused until events are sent");
                return Ok(());
            }
            let limit = (self.config.batch_size as u64).min(room) as usize;
            let page = self
                .objects
                .list(&watch.prefix, after.as_deref(), limit)
                .await
                .map_err(|source| RelayError::Objects { watch: watch.name.clone(), source })?;
            report.list_calls += 1;
            let Some(last) = page.objects.last().map(|o| o.key.clone()) else { return Ok(()) };
            let mut batch = Batch::new(self.state.last_seq()?);
            for obj in &page.objects {
                let known = self.state.indexed_etag(&watch.name, &obj.key)?;
                if known.as_deref() == Some(obj.etag.as_str()) {
                    continue;
                }
                match self.evaluate(watch, obj, known).await? {
                    Outcome::Event(e) => batch.event(*e),
                    Outcome::Vanished => report.vanished += 1,
                }
            }
            batch.cursor(&watch.name, &watch.prefix, &last);
            self.commit(batch, report)?;
            if page.next_start_after.is_none() {
                return Ok(());
            }
            after = Some(last);
        }
    }

    async fn reconcile_watch(&self, watch: &Watch) -> (PassReport, Result<()>) {
        let mut report = PassReport::default();
        let r = self.reconcile_watch_inner(watch, &mut report).await;
        (report, r)
    }

    async fn reconcile_watch_inner(&self, watch: &Watch, report: &mut PassReport) -> Result<()> {
        // Only what lies at or behind the cursor is reconciled; the scan pass owns the rest.
        let CursorState::At(cursor) = self.state.cursor(&watch.name, &watch.prefix)? else {
            return Ok(());
        };
        // The index snapshot stays valid while we walk it: this pass is its only writer and
        // changes an entry only after walking past it.
        let index: Vec<(String, String)> = self.state.index(&watch.name)?.into_iter().collect();
        let mut next = 0usize;
        let mut after: Option<String> = None;
        loop {
            let room = self.room()?;
            if room == 0 {
                report.backpressure = true;
                return Ok(());
            }
            let page = self
                .objects
                .list(&watch.prefix, after.as_deref(), self.config.batch_size)
                .await
                .map_err(|source| RelayError::Objects { watch: watch.name.clone(), source })?;
            report.list_calls += 1;
            let mut batch = Batch::new(self.state.last_seq()?);
            let mut done = page.next_start_after.is_none();
            for obj in &page.objects {
                // Indexed keys sorting before this listed one were not listed: deleted.
                while next < index.len() && index[next].0.as_str() < obj.key.as_str() {
                    batch.unindex(&watch.name, &index[next].0);
                    next += 1;
                }
                if obj.key > cursor {
                    done = true;
                    break;
                }
                let known = if next < index.len() && index[next].0 == obj.key {
                    next += 1;
                    Some(index[next - 1].1.clone())
                } else {
                    None
                };
                if known.as_deref() == Some(obj.etag.as_str()) {
                    continue;
                }
                if batch.event_count() >= room {
                    // Full: leave this object, and the index from here on, to the next pass.
                    report.backpressure = true;
                    self.commit(batch, report)?;
                    return Ok(());
                }
                match self.evaluate(watch, obj, known.clone()).await? {
                    Outcome::Event(e) => batch.event(*e),
                    Outcome::Vanished => {
                        report.vanished += 1;
                        if known.is_some() {
                            batch.unindex(&watch.name, &obj.key);
                        }
                    }
                }
            }
            if done {
                // Everything indexed that the listing never reached is gone.
                for (key, _) in &index[next..] {
                    if *key <= cursor {
                        batch.unindex(&watch.name, key);
                    }
                }
            }
            self.commit(batch, report)?;
            match page.next_start_after {
                Some(n) if !done => after = Some(n),
                _ => return Ok(()),
            }
        }
    }

    fn commit(&self, batch: Batch, report: &mut PassReport) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (mut ops, events) = batch.finish();
        if let Some(hook) = &self.hook {
            for e in &events {
                ops.extend(hook(e));
            }
        }
        self.state.apply(ops)?;
        report.batches += 1;
        if !events.is_empty() {
            // The sender may ship this page while the pass lists the next one.
            self.ready.notify_one();
        }
        for e in &events {
            report.events += 1;
            if e.accepted {
                report.accepted += 1;
            } else {
                report.rejected += 1;
                tracing::info!(seq = e.seq, watch = %e.watch, key = %crate::objstore::key::display(&e.key), reason = e.reason.as_deref().unwrap_or(""), "relay rejected an object");
            }
        }
        Ok(())
    }

    /// Check one object against its watch's rules, reading its body at most once.
    async fn evaluate(&self, watch: &Watch, obj: &ObjectMeta, replaces: Option<String>) -> Result<Outcome> {
        let cap = self.config.json_check_cap_bytes;
        let event = |size, sha256, content_type, reason: Option<String>| RelayEvent {
            seq: 0,
            watch: watch.name.clone(),
            key: obj.key.clone(),
            size,
            etag: obj.etag.clone(),
            sha256,
            content_type,
            accepted: reason.is_none(),
            reason,
            replaces_etag: replaces.clone(),
            observed_unix_ms: (self.clock)(),
            fields: Default::default(),
            fields_denied: Vec::new(),
        };
        let content_type = content_type_of(&obj.key).map(str::to_owned);
        if let Some(reason) = check_metadata(&watch.rules, &obj.key, obj.size, cap) {
            return Ok(Outcome::Event(Box::new(event(obj.size, None, content_type, Some(reason)))));
        }
        let body = match self.objects.get(&obj.key).await {
            Ok(b) => b,
            Err(ObjectStoreError::NotFound { .. }) => return Ok(Outcome::Vanished),
            Err(source) => return Err(RelayError::Objects { watch: watch.name.clone(), source }),
        };
        let prepared = self.prepared.get(&watch.name);
        let checks = Checks {
            rules: &watch.rules,
            schema: prepared.and_then(|p| p.schema.as_ref()),
            fields: prepared.map_or(&[][..], |p| &p.fields),
        };
        match check_body(&checks, &obj.key, body, cap).await {
            Ok(v) => {
                let mut e = event(v.size, v.sha256, v.content_type, v.rejection);
                if e.accepted {
                    e.fields = v.fields;
                    e.fields_denied = prepared.map(|p| p.policy_denied.clone()).unwrap_or_default();
                    e.fields_denied.extend(v.fields_denied.iter().map(|(name, _)| name.clone()));
                    self.withheld(&e, &v.fields_denied);
                }
                Ok(Outcome::Event(Box::new(e)))
            }
            // The store's own check found stored bytes that do not match their record: that
            // object will not read better later, so it is refused rather than retried forever.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Ok(Outcome::Event(Box::new(event(
                obj.size,
                None,
                content_type,
                Some(format!("the stored body failed its integrity check: {e}")),
            )))),
            Err(source) => Err(RelayError::Read { watch: watch.name.clone(), key: obj.key.clone(), source }),
        }
    }
}
