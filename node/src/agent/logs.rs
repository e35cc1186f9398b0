//! Live job logs, on the control plane's request (a `logs` entry of a poll answer). Only where
//! the node's egress policy allows it (`[egress] allow_logs`, off by default: then only the
//! result's tails leave the site); a refusal is audited here and told to the control plane,
//! which audits it too. A stream is bounded in bytes and in time, at most
//! [`MAX_STREAMS`] run at once, and each ends when the container exits, when the control plane
//! says nobody reads it any more, or at shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use outpost_protocol::{LogChunk, LogRequest, MAX_LOG_CHUNK_BYTES};
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::ledger::JobState;
use crate::runtime::{JobRef, Runtime, RuntimeError};
use crate::verify::valid_job_id;

/// Log streams sent at once; further requests wait for the control plane to ask again.
pub(super) const MAX_STREAMS: usize = 16;
/// Most bytes one stream sends; then it ends, saying so.
const MAX_STREAM_BYTES: u64 = 16 * 1024 * 1024;
/// Lines of what the container wrote before the request that a stream starts with.
const TAIL_LINES: u64 = 1000;
/// How long output is gathered before it is sent.
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Raw bytes gathered before a send (their text, with replacement characters, is split to fit
/// [`MAX_LOG_CHUNK_BYTES`]).
const FLUSH_BYTES: usize = 32 * 1024;
/// How long a stream waits for a staged job's container to appear.
const START_WAIT: Duration = Duration::from_secs(60);
/// Sends of one chunk that fail before the stream is given up.
const SEND_TRIES: u32 = 5;
/// While the container writes nothing, an empty chunk this often tells the control plane the
/// stream is alive and tells us whether anyone still reads it.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Longest one stream runs.
const MAX_STREAM_TIME: Duration = Duration::from_secs(6 * 3600);

/// Why a stream ended early, for the operator.
const NOT_RUNNING: &str = "the job is not running on this node (it has ended or not arrived)";

impl<R: Runtime> Agent<R> {
    /// Start streaming for each request not already being served.
    pub(super) fn request_logs(self: &Arc<Self>, requests: Vec<LogRequest>, shutdown: &CancellationToken) {
        for req in requests {
            if !valid_job_id(&req.job_id) || req.request_id.is_empty() || req.request_id.len() > 128 {
                tracing::warn!(job = %req.job_id, "log request with an unusable id ignored");
                continue;
            }
            let full = {
                let Ok(mut streams) = self.shared.log_streams.lock() else { continue };
                if streams.contains(&req.request_id) {
                    continue;
                }
                let full = streams.len() >= MAX_STREAMS;
                // A refusal for lack of room is sent once too.
                streams.insert(req.request_id.clone());
                full
            };
            let agent = Arc::clone(self);
            let token = shutdown.clone();
            tokio::spawn(async move {
                let id = req.request_id.clone();
                if full {
                    let note =
                        format!("this node is sending {MAX_STREAMS} log streams already; ask again later");
                    let _ = Sender { agent: &agent, req: &req, offset: 0, seal_to: None }
                        .send(String::new(), true, None, Some(note))
                        .await;
                } else {
                    agent.stream_logs(req, token).await;
                }
                // Forget it only after a while: the control plane may offer the request once
                // more before our last chunk reached it.
                tokio::time::sleep(Duration::from_secs(30)).await;
                if let Ok(mut streams) = agent.shared.log_streams.lock() {
                    streams.remove(&id);
                }
            });
        }
    }

    async fn stream_logs(&self, req: LogRequest, shutdown: CancellationToken) {
        let mut out = Sender { agent: self, req: &req, offset: 0, seal_to: None };
        if !self.cfg.egress.allow_logs {
            let why = "this node's egress policy does not allow live logs ([egress] allow_logs = false); \
                       only the result's output tails leave the site";
            let detail = format!("job {}/{}: live logs refused: {why}", req.job_id, req.attempt);
            tracing::info!("{detail}");
            if let Err(e) = self.ledger.audit("logs.refused", &detail) {
                tracing::error!(error = %e, "cannot write the audit log");
            }
            let _ = out.send(String::new(), true, Some(why.to_owned()), None).await;
            return;
        }
        let job = JobRef { job_id: req.job_id.clone(), attempt: req.attempt };
        let stream = match self.open_log_stream(&job, req.follow, &shutdown).await {
            // A sealed job's output leaves only sealed, live too: each piece its own age file
            // (decided on the record the stream was opened for).
            Ok((s, rec)) => {
                out.seal_to = self.seal_recipients(&rec);
                s
            }
            Err(why) => {
                let _ = out.send(String::new(), true, None, Some(why)).await;
                return;
            }
        };
        tracing::info!(job = %req.job_id, attempt = req.attempt, follow = req.follow, "sending live logs");
        let note = self.pump(stream, &mut out, &shutdown).await;
        if let Some(note) = note {
            let _ = out.send(String::new(), true, None, Some(note)).await;
        }
    }

    /// The container's log stream; waits a while for a staged job's container to be created.
    async fn open_log_stream(
        &self,
        job: &JobRef,
        follow: bool,
        shutdown: &CancellationToken,
    ) -> Result<(crate::runtime::LogStream, crate::ledger::JobRecord), String> {
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            let rec = match self.ledger.get(&job.job_id, job.attempt) {
                Ok(Some(rec)) if matches!(rec.state, JobState::Staged | JobState::Running) => {
                    if rec.spec.as_ref().is_some_and(|s| s.container().is_none()) {
                        return Err(
                            "this job runs no container (inference): its output is in its result".into()
                        );
                    }
                    rec
                }
                Ok(_) => return Err(NOT_RUNNING.into()),
                Err(e) => return Err(format!("cannot read the ledger: {e}")),
            };
            match self.runtime.log_stream(job, follow, TAIL_LINES).await {
                Ok(s) => return Ok((s, rec)),
                Err(RuntimeError::NotFound(_)) if tokio::time::Instant::now() < deadline => {}
                Err(RuntimeError::NotFound(_)) => return Err(NOT_RUNNING.into()),
                Err(e) => return Err(format!("cannot read the container's output: {e}")),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err("the agent is shutting down".into()),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Send what the stream yields until it ends; returns the closing note, if one is due.
    async fn pump(
        &self,
        mut stream: crate::runtime::LogStream,
        out: &mut Sender<'_, R>,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let mut pending: Vec<u8> = Vec::new();
        let mut sent: u64 = 0;
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = tokio::time::Instant::now();
        let mut last_send = started;
        loop {
            if started.elapsed() > MAX_STREAM_TIME {
                let text = take_text(&mut pending, true);
                let _ = out.send(text, false, None, None).await;
                return Some(format!(
                    "the stream stopped after {} h (this node's bound)",
                    MAX_STREAM_TIME.as_secs() / 3600
                ));
            }
            let (piece, ended) = tokio::select! {
                _ = shutdown.cancelled() => return Some("the agent is shutting down".into()),
                item = stream.next() => match item {
                    Some(Ok(bytes)) => (bytes, false),
                    Some(Err(e)) => {
                        let text = take_text(&mut pending, true);
                        let _ = out.send(text, false, None, None).await;
                        return Some(format!("the container's output could not be read: {e}"));
                    }
                    None => (Vec::new(), true),
                },
                _ = tick.tick() => (Vec::new(), false),
            };
            pending.extend_from_slice(&piece);
            let full = pending.len() >= FLUSH_BYTES;
            if piece.is_empty() && pending.is_empty() && !ended {
                if last_send.elapsed() >= KEEPALIVE {
                    last_send = tokio::time::Instant::now();
                    match out.send(String::new(), false, None, None).await {
                        Ok(true) => {}
                        Ok(false) | Err(()) => return None,
                    }
                }
                continue;
            }
            if ended || full || piece.is_empty() {
                let room = MAX_STREAM_BYTES.saturating_sub(sent);
                let capped = pending.len() as u64 > room;
                if capped {
                    pending.truncate(room as usize);
                }
                let text = take_text(&mut pending, ended || capped);
                if text.is_empty() && !ended && !capped {
                    // Only part of a character so far: wait for the rest.
                    continue;
                }
                sent += text.len() as u64;
                last_send = tokio::time::Instant::now();
                if capped {
                    let _ = out.send(text, false, None, None).await;
                    return Some(format!(
                        "the stream stopped after {MAX_STREAM_BYTES} bytes (this node's bound)"
                    ));
                }
                if ended {
                    return match out.send(text, true, None, Some("the output ended".into())).await {
                        Ok(_) => None,
                        Err(()) => None,
                    };
                }
                match out.send(text, false, None, None).await {
                    Ok(true) => {}
                    // Nobody reads it any more, or the control plane cannot be reached.
                    Ok(false) | Err(()) => return None,
                }
            }
        }
    }
}

/// The text of the bytes gathered so far; an incomplete character at the end waits for the
/// rest unless `all`.
fn take_text(pending: &mut Vec<u8>, all: bool) -> String {
    let cut = if all { pending.len() } else { pending.len() - incomplete_tail(pending) };
    let text = String::from_utf8_lossy(&pending[..cut]).into_owned();
    pending.drain(..cut);
    text
}

/// How many bytes at the end of `bytes` are the start of a character whose rest has not come
/// yet (0 to 3), whatever comes before them.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead byte
        }
        let needs = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

/// Posts one request's chunks in order, each split to fit a chunk's bound.
struct Sender<'a, R: Runtime> {
    agent: &'a Agent<R>,
    req: &'a LogRequest,
    offset: u64,
    /// For a sealed job: whom each piece of output is sealed for (an ASCII-armoured age file
    /// per piece, self-delimited, which `outpost-control job logs --identity` opens).
    seal_to: Option<Vec<String>>,
}

impl<R: Runtime> Sender<'_, R> {
    /// Ok(keep): the control plane still wants more. Err: it could not be reached.
    async fn send(
        &mut self,
        text: String,
        eof: bool,
        refused: Option<String>,
        note: Option<String>,
    ) -> Result<bool, ()> {
        let sealed_pieces;
        let mut pieces = match &self.seal_to {
            Some(to) if !text.is_empty() => {
                sealed_pieces = split(&text, SEALED_PIECE_BYTES)
                    .into_iter()
                    .map(|p| outpost_protocol::seal::seal(p.as_bytes(), to).map(|mut a| {
                        a.push('\n');
                        a
                    }))
                    .collect::<Result<Vec<String>, _>>()
                    .map_err(|e| tracing::error!(error = %e, "cannot seal a piece of live output; the stream stops"))?;
                sealed_pieces.iter().map(String::as_str).collect()
            }
            _ => split(&text, MAX_LOG_CHUNK_BYTES),
        };
        if pieces.is_empty() {
            pieces.push("");
        }
        let last = pieces.len() - 1;
        let mut keep = true;
        for (i, piece) in pieces.into_iter().enumerate() {
            let chunk = LogChunk {
                request_id: self.req.request_id.clone(),
                job_id: self.req.job_id.clone(),
                attempt: self.req.attempt,
                offset: self.offset,
                data: piece.to_owned(),
                eof: eof && i == last,
                refused: if i == last { refused.clone() } else { None },
                note: if i == last { note.clone() } else { None },
            };
            keep = self.post(&chunk).await?;
            self.offset += piece.len() as u64;
        }
        Ok(keep)
    }

    async fn post(&self, chunk: &LogChunk) -> Result<bool, ()> {
        let mut delay = Duration::from_millis(200);
        for _ in 0..SEND_TRIES {
            match self.agent.uplink.post_logs(chunk).await {
                Ok(ack) => return Ok(ack.keep),
                Err(e) if e.is_retryable() => {
                    tracing::debug!(error = %e, "log chunk not delivered; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(error = %e, job = %chunk.job_id, "the control plane refused a log chunk; stream stopped");
                    return Err(());
                }
            }
        }
        Err(())
    }
}

/// `text` in pieces of at most `max` bytes, cut at character boundaries.
/// Most plaintext one sealed piece holds: its armoured age file (4/3 of it, plus a header)
/// stays within one [`MAX_LOG_CHUNK_BYTES`] chunk.
const SEALED_PIECE_BYTES: usize = MAX_LOG_CHUNK_BYTES / 2;

fn split(text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(max);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_waits_for_the_rest_of_a_split_character() {
        let mut pending = "aé".as_bytes()[..2].to_vec();
        assert_eq!(take_text(&mut pending, false), "a");
        assert_eq!(pending, vec![0xc3]);
        pending.push(0xa9);
        assert_eq!(take_text(&mut pending, false), "é");
        let mut bad = vec![b'x', 0xff, b'y'];
        assert_eq!(take_text(&mut bad, false), "x\u{fffd}y");
        let mut cut = vec![b'z', 0xc3];
        assert_eq!(take_text(&mut cut, true), "z\u{fffd}");
        // An invalid byte earlier does not spoil a character split at the end.
        let mut mixed = vec![0xff, b'a', 0xe2, 0x82];
        assert_eq!(take_text(&mut mixed, false), "\u{fffd}a");
        mixed.push(0xac);
        assert_eq!(take_text(&mut mixed, false), "€");
    }

    #[test]
    fn pieces_fit_the_bound_and_keep_characters_whole() {
        let text = "é".repeat(5);
        let pieces = split(&text, 3);
        assert!(pieces.iter().all(|p| p.len() <= 3 && !p.is_empty()));
        assert_eq!(pieces.concat(), text);
        assert!(split("", 3).is_empty());
    }
}
