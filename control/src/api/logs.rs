//! Live job logs. An operator's `GET /v1/jobs/{job_id}/logs` opens a stream session for the
//! job's current attempt; the node is asked for it in its next poll answer and posts the
//! container's output to `/v1/node/logs`. Sessions live in memory only (logs are ephemeral;
//! the result's tails are what is stored), each with a bounded window, and at most
//! [`MAX_SESSIONS`] at once. A session nobody has read for [`IDLE`] is dropped and the node
//! told to stop. Once a job has ended, the result's stdout and stderr tails answer; they do so
//! too, at the end, when the node's egress policy refuses live logs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outpost_protocol::{
    ErrorBody, JobInfo, JobLogs, JobState, LogChunk, LogChunkAck, LogRequest, LogSource, LogsQuery,
    MAX_LOG_CHUNK_BYTES, capability, paths,
};
use tokio::sync::Notify;

use super::{ApiError, ApiResult, Body, Caller, NodeAuth, Params, Shared};

/// Most log streams open at once across all nodes.
pub const MAX_SESSIONS: usize = 256;
/// Bytes of a stream kept for readers; older bytes are dropped (a reader that falls behind
/// is told where the text resumes).
pub const WINDOW_BYTES: usize = 1024 * 1024;
/// A session no operator has read for this long is dropped; its node stops sending.
pub const IDLE: Duration = Duration::from_secs(60);
/// A node that answered a request and then sent nothing (not even its keep-alive, every
/// 15 s) for this long has stopped (it restarted, or lost its link): the stream ends, saying so.
pub const NODE_SILENCE: Duration = Duration::from_secs(45);
/// Largest jump forward a chunk may make past the end of its stream (the node's own bound on
/// one stream is 16 MiB).
const MAX_GAP: u64 = 64 * 1024 * 1024;

struct Session {
    request: LogRequest,
    node_id: String,
    /// The node has answered (any chunk): it is no longer offered in polls.
    answered: bool,
    /// Stream offset of `buf[0]`.
    base: u64,
    buf: String,
    done: bool,
    refused: Option<String>,
    note: Option<String>,
    last_read: Instant,
    /// When the node last sent a chunk (or the request was made).
    last_chunk: Instant,
    /// Ended because the node went silent, not by its word.
    silent: bool,
    /// A reader has been given its end (`done`).
    finished_read: bool,
    changed: Arc<Notify>,
}

impl Session {
    fn end(&self) -> u64 {
        self.base.saturating_add(self.buf.len() as u64)
    }

    /// Append what lies past the end of the stream so far (a repeated chunk adds nothing),
    /// then trim the window from the front at a character boundary.
    fn append(&mut self, offset: u64, data: &str) {
        let end = self.end();
        if offset > end {
            // A gap (a chunk lost on the node's side): show where the text resumes.
            self.buf.clear();
            self.base = offset;
            self.buf.push_str(data);
        } else {
            let skip = (end - offset) as usize;
            if skip < data.len() {
                let mut from = skip;
                while !data.is_char_boundary(from) {
                    from += 1;
                }
                self.buf.push_str(&data[from..]);
            }
        }
        if self.buf.len() > WINDOW_BYTES {
            let mut cut = self.buf.len() - WINDOW_BYTES;
            while !self.buf.is_char_boundary(cut) {
                cut += 1;
            }
            self.buf.drain(..cut);
            self.base = self.base.saturating_add(cut as u64);
        }
    }
}

/// Every open log stream, keyed by `job_id/attempt/follow|once`: a reader that follows and one
/// that does not never share a stream.
#[derive(Default)]
pub struct LogHub {
    sessions: Mutex<HashMap<String, Session>>,
}

impl LogHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Requests the node has not answered yet (offered in its polls until it does).
    pub fn pending_for(&self, node_id: &str) -> Vec<LogRequest> {
        let mut sessions = self.lock();
        Self::sweep(&mut sessions, Instant::now());
        let mut out: Vec<LogRequest> = sessions
            .values()
            .filter(|s| s.node_id == node_id && !s.answered && !s.done)
            .map(|s| s.request.clone())
            .collect();
        out.sort_by(|a, b| a.request_id.cmp(&b.request_id));
        out
    }

    /// Drops sessions nobody read for [`IDLE`], and ends those whose node went silent.
    fn sweep(sessions: &mut HashMap<String, Session>, now: Instant) {
        sessions.retain(|_, s| now.duration_since(s.last_read) < IDLE);
        for s in sessions.values_mut() {
            if s.answered && !s.done && now.duration_since(s.last_chunk) > NODE_SILENCE {
                s.done = true;
                s.silent = true;
                s.note = Some(format!(
                    "node {} stopped sending (it restarted or lost its link); ask again",
                    s.node_id
                ));
                s.changed.notify_waiters();
            }
        }
    }
}

fn key(job_id: &str, attempt: u32, follow: bool) -> String {
    format!("{job_id}/{attempt}/{}", if follow { "follow" } else { "once" })
}

/// The result's tails as one text: stdout, then stderr.
fn result_tail(info: &JobInfo) -> String {
    let Some(r) = &info.result else { return String::new() };
    if r.sealed.is_some() {
        return format!(
            "[job {}: the output is sealed for the job's recipients; open it with `outpost-control job result {} \
             --identity FILE`]\n",
            info.job_id, info.job_id
        );
    }
    let mut text = r.stdout_tail.clone();
    if !r.stderr_tail.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&r.stderr_tail);
    }
    text
}

fn answer(info: &JobInfo, source: LogSource, offset: u64, data: String, done: bool) -> JobLogs {
    let next = offset + data.len() as u64;
    JobLogs {
        job_id: info.job_id.clone(),
        attempt: info.attempt,
        node_id: info.node_id.clone(),
        source,
        offset,
        data,
        next,
        done,
        refused: None,
        note: None,
    }
}

#[utoipa::path(get, path = paths::JOB_LOGS, tag = "jobs",
    params(("job_id" = String, Path, description = "job id"), LogsQuery),
    description = "The job's output. While it runs: streamed from its node from byte `after` on (the node \
                   is asked on its next poll; `follow` keeps it streaming until the job ends), only where \
                   the node's egress policy allows log egress (else `refused` says why, audited). Once the \
                   job has ended: the stored result's stdout and stderr tails. Held up to `wait_secs` \
                   (at most the server's `--max-hold`, 30 s by default) while there is nothing new. Logs are not stored: the control plane keeps \
                   the last 1 MiB of each open stream in memory.",
    responses((status = 200, body = JobLogs), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, description = "too many log streams open", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn job_logs(
    caller: Caller,
    State(st): State<Shared>,
    Path(job_id): Path<String>,
    Params(q): Params<LogsQuery>,
) -> ApiResult<Json<JobLogs>> {
    let missing = || ApiError::not_found(format!("job {job_id} does not exist"));
    let info = st.store.get_job(&job_id).await?.ok_or_else(missing)?.info;
    caller.may(&info.org_id, outpost_protocol::Role::Viewer, missing)?;
    let after = q.after.unwrap_or(0);
    let follow = q.follow.unwrap_or(false);
    let wait = q.wait_secs.map_or(Duration::ZERO, Duration::from_secs).min(st.max_hold);
    let ended = matches!(info.state, JobState::Finished | JobState::Cancelled);
    let k = key(&info.job_id, info.attempt, follow);
    let now = Instant::now();

    // What the node has streamed, if it has.
    let changed = {
        let mut sessions = st.logs.lock();
        LogHub::sweep(&mut sessions, now);
        // A new read of a job that still runs gets a new stream rather than the end of one
        // that is complete (a read without --follow) or whose node went silent; a refusal stands.
        let stale = sessions.get(&k).is_some_and(|s| {
            after == 0
                && !ended
                && s.done
                && s.refused.is_none()
                && ((s.finished_read && !s.request.follow) || s.silent)
        });
        if stale {
            sessions.remove(&k);
        }
        match sessions.get_mut(&k) {
            Some(s) => {
                s.last_read = now;
                Some(s.changed.clone())
            }
            None => None,
        }
    };
    let changed = match changed {
        Some(c) => c,
        None => {
            if ended {
                let data = if after == 0 { result_tail(&info) } else { String::new() };
                return Ok(Json(answer(&info, LogSource::ResultTail, after, data, true)));
            }
            if info.state == JobState::Queued {
                let mut a = answer(&info, LogSource::Pending, after, String::new(), !follow);
                a.note = Some("the job is queued: its node has not taken it yet".into());
                return Ok(Json(a));
            }
            let node = st.store.get_node(&info.node_id).await?;
            if !node.is_some_and(|n| n.announce().has(capability::LOGS)) {
                let mut a = answer(&info, LogSource::Pending, after, String::new(), !follow);
                a.note = Some(format!(
                    "the agent on node {} is too old to stream logs; the result's tails show when the job ends",
                    info.node_id
                ));
                return Ok(Json(a));
            }
            let changed = {
                let mut sessions = st.logs.lock();
                if !sessions.contains_key(&k) && sessions.len() >= MAX_SESSIONS {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too_many_log_streams",
                        format!("{MAX_SESSIONS} log streams are open; try again when one is closed"),
                    ));
                }
                let request = LogRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    job_id: info.job_id.clone(),
                    attempt: info.attempt,
                    follow,
                };
                // Another reader may have opened it meanwhile: wait on the one in the map.
                let s = sessions.entry(k.clone()).or_insert_with(|| Session {
                    request,
                    node_id: info.node_id.clone(),
                    answered: false,
                    base: 0,
                    buf: String::new(),
                    done: false,
                    refused: None,
                    note: None,
                    last_read: now,
                    last_chunk: now,
                    silent: false,
                    finished_read: false,
                    changed: Arc::new(Notify::new()),
                });
                s.changed.clone()
            };
            st.wakers.wake(&info.node_id);
            changed
        }
    };

    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let view = {
            let mut sessions = st.logs.lock();
            LogHub::sweep(&mut sessions, Instant::now());
            sessions.get(&k).map(|s| {
                let mut from = after.max(s.base);
                let data = if from < s.end() {
                    let mut start = (from - s.base) as usize;
                    while !s.buf.is_char_boundary(start) {
                        start += 1;
                    }
                    from = s.base + start as u64;
                    s.buf[start..].to_owned()
                } else {
                    String::new()
                };
                (from, data, s.done, s.refused.clone(), s.note.clone(), s.answered, s.end() == 0)
            })
        };
        let Some((from, data, done, refused, note, answered, empty)) = view else {
            // Dropped meanwhile (idle sweep): nothing more from this stream.
            return Ok(Json(answer(&info, LogSource::Pending, after, String::new(), true)));
        };
        if done && empty && refused.is_none() {
            // The node had nothing to stream (the job ended before the stream began): the
            // result's tails, once it is stored.
            let info = st.store.get_job(&job_id).await?.map_or(info.clone(), |j| j.info);
            if matches!(info.state, JobState::Finished | JobState::Cancelled) {
                let data = if after == 0 { result_tail(&info) } else { String::new() };
                return Ok(Json(answer(&info, LogSource::ResultTail, after, data, true)));
            }
            if !follow || tokio::time::Instant::now() >= deadline {
                let mut a = answer(&info, LogSource::Pending, after, String::new(), !follow);
                a.note = note;
                return Ok(Json(a));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                _ = st.shutdown.cancelled() => {
                    return Ok(Json(answer(&info, LogSource::Pending, after, String::new(), false)));
                }
            }
        }
        if let Some(why) = refused {
            // Live logs refused: the result's tails, once the job has ended.
            let info = st.store.get_job(&job_id).await?.map_or(info.clone(), |j| j.info);
            let ended = matches!(info.state, JobState::Finished | JobState::Cancelled);
            let mut a = if ended {
                let data = if after == 0 { result_tail(&info) } else { String::new() };
                answer(&info, LogSource::ResultTail, after, data, true)
            } else {
                answer(&info, LogSource::Pending, after, String::new(), !follow)
            };
            a.refused = Some(why);
            if ended || !follow || tokio::time::Instant::now() >= deadline {
                return Ok(Json(a));
            }
        } else if !data.is_empty() || done || tokio::time::Instant::now() >= deadline {
            let source = if answered { LogSource::Live } else { LogSource::Pending };
            if done && let Some(s) = st.logs.lock().get_mut(&k) {
                s.finished_read = true;
            }
            let mut a = answer(&info, source, from, data, done);
            a.note = note;
            return Ok(Json(a));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = st.shutdown.cancelled() => {
                return Ok(Json(answer(&info, LogSource::Pending, after, String::new(), false)));
            }
        }
    }
}

#[utoipa::path(post, path = paths::NODE_LOGS, tag = "node", request_body = LogChunk,
    description = "The next piece of a log stream the control plane asked for in a poll answer. A repeated \
                   piece adds nothing. `keep: false` tells the node to stop (nobody reads it any more).",
    responses((status = 200, body = LogChunkAck), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn node_logs(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
    Body(chunk): Body<LogChunk>,
) -> ApiResult<Json<LogChunkAck>> {
    st.touch(&node.node_id);
    if chunk.data.len() > MAX_LOG_CHUNK_BYTES {
        return Err(ApiError::bad_request(
            "chunk_too_large",
            format!("a log chunk carries at most {MAX_LOG_CHUNK_BYTES} bytes"),
        ));
    }
    let k = format!("{}/{}", chunk.job_id, chunk.attempt);
    let mut refused = None;
    let keep = {
        let mut sessions = st.logs.lock();
        let session = sessions.values_mut().find(|s| {
            s.request.request_id == chunk.request_id
                && s.request.job_id == chunk.job_id
                && s.request.attempt == chunk.attempt
        });
        match session {
            Some(s) if s.node_id == node.node_id => {
                if chunk.offset > s.end().saturating_add(MAX_GAP) {
                    return Err(ApiError::bad_request(
                        "bad_offset",
                        format!("offset {} is far past the end of the stream ({})", chunk.offset, s.end()),
                    ));
                }
                s.answered = true;
                s.last_chunk = Instant::now();
                if !s.done {
                    s.append(chunk.offset, &chunk.data);
                    if let Some(why) = &chunk.refused {
                        s.refused = Some(why.clone());
                        s.done = true;
                        refused = Some(why.clone());
                    }
                    if chunk.eof {
                        s.done = true;
                        s.note = chunk.note.clone();
                    }
                }
                s.changed.notify_waiters();
                !s.done && s.last_read.elapsed() < IDLE
            }
            // Dropped, replaced, or not this node's: stop.
            _ => false,
        }
    };
    if let Some(why) = refused {
        let detail = format!("job {k}: live logs refused by the node: {why}");
        st.audit(&format!("node:{}", node.node_id), Some(&node.org_id), "job.logs.refused", &detail).await;
    }
    Ok(Json(LogChunkAck { keep }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            request: LogRequest { request_id: "r".into(), job_id: "j".into(), attempt: 1, follow: true },
            node_id: "n".into(),
            answered: true,
            base: 0,
            buf: String::new(),
            done: false,
            refused: None,
            note: None,
            last_read: Instant::now(),
            last_chunk: Instant::now(),
            silent: false,
            finished_read: false,
            changed: Arc::new(Notify::new()),
        }
    }

    #[test]
    fn a_repeated_chunk_adds_nothing_and_an_overlapping_one_only_its_new_part() {
        let mut s = session();
        s.append(0, "hello ");
        s.append(0, "hello ");
        s.append(3, "lo world");
        assert_eq!(s.buf, "hello world");
        assert_eq!(s.end(), 11);
    }

    #[test]
    fn the_window_keeps_the_newest_bytes_at_a_character_boundary() {
        let mut s = session();
        let big = "é".repeat(WINDOW_BYTES / 2 + 10);
        s.append(0, &big);
        assert!(s.buf.len() <= WINDOW_BYTES);
        assert_eq!(s.end(), big.len() as u64, "offsets keep counting what was dropped");
        assert!(s.buf.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_node_gone_silent_ends_its_stream_and_an_unread_one_is_dropped() {
        let now = Instant::now();
        let mut sessions = HashMap::new();
        let mut silent = session();
        silent.last_chunk = now.checked_sub(NODE_SILENCE + Duration::from_secs(1)).expect("instant");
        sessions.insert("silent".to_owned(), silent);
        let mut unread = session();
        unread.last_read = now.checked_sub(IDLE + Duration::from_secs(1)).expect("instant");
        sessions.insert("unread".to_owned(), unread);
        sessions.insert("fine".to_owned(), session());
        LogHub::sweep(&mut sessions, now);
        assert!(!sessions.contains_key("unread"));
        let s = &sessions["silent"];
        assert!(s.done && s.note.as_deref().is_some_and(|n| n.contains("stopped sending")));
        assert!(!sessions["fine"].done);
    }

    #[test]
    fn a_gap_restarts_the_window_where_the_text_resumes() {
        let mut s = session();
        s.append(0, "abc");
        s.append(10, "xyz");
        assert_eq!((s.base, s.buf.as_str()), (10, "xyz"));
    }
}
