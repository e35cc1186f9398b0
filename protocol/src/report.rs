use serde::{Deserialize, Serialize};

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The container exited 0.
    Succeeded,
    /// The container exited non-zero.
    Failed,
    /// Killed after `timeout_secs`.
    TimedOut,
    /// The node refused the manifest (signature, expiry, replay, ...). `error` says why.
    Rejected,
    /// The job could not be started (image absent, runtime error). `error` says why.
    Error,
    /// Stopped on an operator's cancel (or because a later attempt superseded it).
    Cancelled,
    /// The site's policy refused the job (`error` names the rule and the value); it is never
    /// retried on that node. Sent only to a control plane of protocol revision 3 or later
    /// (older ones get `rejected` with the same error).
    Refused,
    /// It waited for the site's approval until it expired, or an approver denied it (`error`
    /// says which, with the reason). Sent to older control planes as `rejected`.
    NotApproved,
}

/// The node's report of one job attempt. `idempotency_key` = `job_id/attempt`: the control
/// plane stores the first report for a key and acknowledges every repeat without storing it.
impl Outcome {
    /// Every outcome, in declaration order.
    pub const ALL: [Outcome; 8] = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::TimedOut,
        Outcome::Rejected,
        Outcome::Error,
        Outcome::Cancelled,
        Outcome::Refused,
        Outcome::NotApproved,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResultReport {
    pub job_id: String,
    pub attempt: u32,
    pub idempotency_key: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub error: Option<String>,
    /// Last bytes of stdout (at most [`crate::MAX_OUTPUT_TAIL_BYTES`]), lossy UTF-8.
    #[serde(default)]
    pub stdout_tail: String,
    #[serde(default)]
    pub stderr_tail: String,
    /// True when earlier output was cut off.
    #[serde(default)]
    pub output_truncated: bool,
    pub timings: Timings,
    /// Objects the job wrote to the local store (its `/out` files): metadata only, plus a
    /// body where the egress policy and the signed manifest both allow it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputObject>,
    /// Output keys whose body the manifest asked to report and the node's egress policy
    /// refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_denied: Vec<String>,
    /// Inference jobs: the model, engine and token counts the result came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<crate::InferenceStamp>,
    /// For a job that named recipients: an ASCII-armoured age file holding a
    /// [`crate::seal::SealedPart`] (the tails and output bodies, which are then empty here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
}

/// Largest object body a result may carry (when egress allows it at all).
pub const MAX_EGRESS_BODY_BYTES: usize = 64 * 1024;

/// Most bytes of output bodies one result carries in all: sealed (age armour adds about a
/// third) and JSON-escaped, a result still fits [`crate::MAX_BODY_BYTES`].
pub const MAX_RESULT_BODIES_BYTES: usize = 384 * 1024;

/// One object a job left in the node's local store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OutputObject {
    pub key: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the body.
    pub sha256: String,
    /// The body as UTF-8 text, only when egress is allowed for this key by both the node's
    /// policy and the signed manifest (at most [`MAX_EGRESS_BODY_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl ResultReport {
    pub fn key_for(job_id: &str, attempt: u32) -> String {
        format!("{job_id}/{attempt}")
    }

    /// Empties what the job itself wrote (its output tails and bodies), keeping bookkeeping.
    pub fn withhold_output(&mut self) {
        self.stdout_tail.clear();
        self.stderr_tail.clear();
        for o in &mut self.outputs {
            o.body = None;
        }
    }
}

/// When things happened on the node (Unix ms); absent where the step never happened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Timings {
    pub received_unix_ms: u64,
    #[serde(default)]
    pub started_unix_ms: Option<u64>,
    #[serde(default)]
    pub finished_unix_ms: Option<u64>,
}

/// The control plane's answer to a report: safe to mark it delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub idempotency_key: String,
    /// True when this report had been stored before (a retry); it was not stored again.
    pub duplicate: bool,
}
