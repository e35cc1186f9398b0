//! Live job logs (`outpost-control job logs JOB [--follow]`). The node never listens: the
//! control plane asks for a job's output in a poll answer ([`LogRequest`]), and the node, when
//! its egress policy allows log egress, posts the container's output in pieces
//! ([`LogChunk`]). Logs are ephemeral: the control plane keeps a bounded window of each stream
//! in memory and stores nothing; the result's stdout and stderr tails are what is kept.

use serde::{Deserialize, Serialize};

/// Most bytes of text one [`LogChunk`] may carry.
pub const MAX_LOG_CHUNK_BYTES: usize = 64 * 1024;

/// Control plane → node: send the output of this job attempt's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LogRequest {
    /// Names this request in the node's [`LogChunk`]s; a new id is a new stream.
    pub request_id: String,
    pub job_id: String,
    pub attempt: u32,
    /// Keep sending what the container writes until it exits (else: what it wrote so far).
    pub follow: bool,
}

/// Node → control plane (`POST /v1/node/logs`): the next piece of a requested stream, stdout
/// and stderr interleaved as written, invalid UTF-8 replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LogChunk {
    pub request_id: String,
    pub job_id: String,
    pub attempt: u32,
    /// Where `data` starts in this request's stream, in bytes.
    pub offset: u64,
    #[serde(default)]
    pub data: String,
    /// Nothing more follows: the container exited, the job is not running here, or the node's
    /// bound on one stream was reached (`note` says which).
    #[serde(default)]
    pub eof: bool,
    /// The node's egress policy does not allow log egress: why. Nothing else is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Why the stream ended, for the operator (e.g. "the job is not running on this node").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The control plane's answer to a [`LogChunk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LogChunkAck {
    /// False once nobody reads the stream any more: the node stops sending it.
    pub keep: bool,
}

/// Where the text of a [`JobLogs`] answer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LogSource {
    /// Streamed from the node while the job runs.
    Live,
    /// The stdout and stderr tails of the stored result (the job has ended, or the node does
    /// not allow live logs and the job ended since).
    ResultTail,
    /// Nothing yet: the job is queued, or the node has not answered.
    Pending,
}

/// Operator (`GET /v1/jobs/{job_id}/logs?after=N&follow=B&wait_secs=S`): the job's output from
/// byte `after` of the live stream, or the result's tails once the job has ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobLogs {
    pub job_id: String,
    pub attempt: u32,
    pub node_id: String,
    pub source: LogSource,
    /// Where `data` starts; above the `after` asked for when the control plane's window had
    /// already dropped the bytes in between.
    pub offset: u64,
    pub data: String,
    /// The `after` to ask with next.
    pub next: u64,
    /// Nothing more will come: print and stop.
    pub done: bool,
    /// The node refused live logs (its egress policy): why. The result's tails are shown when
    /// the job ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Anything else the operator should know (why the stream ended, a node too old).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Query of `GET /v1/jobs/{job_id}/logs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Bytes of the live stream already read (default 0).
    #[serde(default)]
    pub after: Option<u64>,
    /// Ask the node to keep streaming until the job ends.
    #[serde(default)]
    pub follow: Option<bool>,
    /// Hold the request up to this long (at most the server's `--max-hold`, 30 s by default)
    /// while there is nothing new.
    #[serde(default)]
    pub wait_secs: Option<u64>,
}
