//! Verification of job manifests before anything runs: the org's ed25519 signature over the
//! exact payload bytes, then the payload's own claims (this node, not expired, a sequence number
//! above every one accepted before, a spec the agent can run safely). A manifest that fails any
//! check is refused with a reason that is reported and audited; it is never retried.

use std::sync::{Arc, RwLock};

use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use outpost_protocol::{
    ContainerSpec, InferenceSpec, JobAssignment, JobEnvelope, JobSpec, PublicKey, ServiceEnvelope,
    SignedEnvelope,
};

use crate::jobdata::path;

/// An ed25519 public key as the protocol carries it, ready to verify.
pub fn verifying_key(key: &PublicKey) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(&key.ed25519_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("org key {} is not 32 bytes of hex", key.key_id))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("org key {}: {e}", key.key_id))
}

fn parse_keys(keys: &[PublicKey]) -> Result<Vec<(PublicKey, VerifyingKey)>, String> {
    if keys.is_empty() {
        return Err("no org signing key to trust".into());
    }
    keys.iter().map(|k| Ok((k.clone(), verifying_key(k)?))).collect()
}

/// Most entries a manifest may list in `inputs`, and in `egress_bodies`.
pub const MAX_INPUT_ENTRIES: usize = 64;
pub const MAX_EGRESS_ENTRIES: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error(
        "manifest is signed by key {got}, but this node trusts only org key {want}; was the job submitted to another organisation, or signed by a key the organisation retired? (a node learns a rotated key from its control plane)"
    )]
    UnknownKey { got: String, want: String },
    #[error(
        "manifest signature does not verify against org key {key_id}: the manifest was altered or forged"
    )]
    BadSignature { key_id: String },
    #[error("manifest payload is malformed: {0}")]
    Malformed(String),
    #[error("manifest is for node {got}, not this node ({want})")]
    WrongNode { got: String, want: String },
    #[error("assignment names job {assigned} but the signed manifest is for job {signed}")]
    Mismatch { assigned: String, signed: String },
    #[error("manifest expired at {expires_unix_ms} (now {now_unix_ms}); submit the job again")]
    Expired { expires_unix_ms: u64, now_unix_ms: u64 },
    #[error("manifest sequence {seq} is not above the last accepted {last}: a replayed manifest")]
    Replayed { seq: u64, last: u64 },
    #[error("manifest spec is not acceptable: {0}")]
    BadSpec(String),
}

/// The trust a node pins at enrollment: the org's signing key, and during a key rotation's
/// overlap the next one too. Clones share the key set, so a rotation learned by the poller
/// reaches every holder at once.
#[derive(Debug, Clone)]
pub struct ManifestVerifier {
    node_id: String,
    keys: Arc<RwLock<Vec<(PublicKey, VerifyingKey)>>>,
}

impl ManifestVerifier {
    pub fn new(node_id: &str, org_key: &PublicKey) -> Result<Self, String> {
        Self::with_keys(node_id, std::slice::from_ref(org_key))
    }

    /// A verifier that accepts a signature by any of `keys` (at least one).
    pub fn with_keys(node_id: &str, keys: &[PublicKey]) -> Result<Self, String> {
        Ok(Self { node_id: node_id.into(), keys: Arc::new(RwLock::new(parse_keys(keys)?)) })
    }

    /// Accepts exactly `keys` from now on (every clone of this verifier does).
    pub fn set_keys(&self, keys: &[PublicKey]) -> Result<(), String> {
        let parsed = parse_keys(keys)?;
        *self.keys.write().map_err(|_| "the org key set is poisoned".to_owned())? = parsed;
        Ok(())
    }

    /// The keys accepted now.
    pub fn keys(&self) -> Vec<PublicKey> {
        self.keys.read().map(|k| k.iter().map(|(key, _)| key.clone()).collect()).unwrap_or_default()
    }

    /// The ids of the keys accepted now.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys().into_iter().map(|k| k.key_id).collect()
    }

    /// The org's signature over exactly the payload bytes; nothing unsigned is parsed.
    fn check_signature(&self, env: &SignedEnvelope) -> Result<(), Rejection> {
        let key = self
            .keys
            .read()
            .ok()
            .and_then(|keys| keys.iter().find(|(k, _)| k.key_id == env.key_id).map(|(_, key)| *key));
        let Some(key) = key else {
            return Err(Rejection::UnknownKey { got: env.key_id.clone(), want: self.key_ids().join(", ") });
        };
        let sig: [u8; 64] = hex::decode(&env.signature_hex)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Rejection::BadSignature { key_id: env.key_id.clone() })?;
        key.verify(env.payload.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| Rejection::BadSignature { key_id: env.key_id.clone() })
    }

    /// The org's signature over any signed statement (a bundle's manifest, an
    /// acknowledgement): the payload, once it verified.
    pub fn verify_payload<'e>(&self, env: &'e SignedEnvelope) -> Result<&'e str, Rejection> {
        self.check_signature(env)?;
        Ok(&env.payload)
    }

    /// A service's signed desired state: signature, then this node, then a usable spec. Replay
    /// and revision order are the caller's (it knows what it runs).
    pub fn verify_service(&self, env: &SignedEnvelope) -> Result<ServiceEnvelope, Rejection> {
        self.check_signature(env)?;
        let svc: ServiceEnvelope =
            serde_json::from_str(&env.payload).map_err(|e| Rejection::Malformed(e.to_string()))?;
        if svc.node_id != self.node_id {
            return Err(Rejection::WrongNode { got: svc.node_id, want: self.node_id.clone() });
        }
        outpost_protocol::check_service_name(&svc.service)
            .map_err(|why| Rejection::BadSpec(format!("service name {why}")))?;
        if let Some(spec) = &svc.spec {
            spec.check().map_err(Rejection::BadSpec)?;
            if spec.resources.memory_mb < 6 || spec.resources.cpu_millis == 0 || spec.resources.pids == 0 {
                return Err(Rejection::BadSpec(
                    "resources.memory_mb must be at least 6, cpu_millis and pids at least 1".into(),
                ));
            }
        }
        Ok(svc)
    }

    /// Check signature first (nothing unsigned is even parsed), then the payload's claims.
    pub fn verify(
        &self,
        a: &JobAssignment,
        last_seq: u64,
        now_unix_ms: u64,
    ) -> Result<JobEnvelope, Rejection> {
        let env = &a.envelope;
        self.check_signature(env)?;
        let job: JobEnvelope =
            serde_json::from_str(&env.payload).map_err(|e| Rejection::Malformed(e.to_string()))?;
        if job.node_id != self.node_id {
            return Err(Rejection::WrongNode { got: job.node_id, want: self.node_id.clone() });
        }
        if job.job_id != a.job_id || job.attempt != a.attempt {
            return Err(Rejection::Mismatch {
                assigned: format!("{}/{}", a.job_id, a.attempt),
                signed: format!("{}/{}", job.job_id, job.attempt),
            });
        }
        if job.expires_unix_ms <= now_unix_ms {
            return Err(Rejection::Expired { expires_unix_ms: job.expires_unix_ms, now_unix_ms });
        }
        if job.seq <= last_seq {
            return Err(Rejection::Replayed { seq: job.seq, last: last_seq });
        }
        check_spec(&job).map_err(Rejection::BadSpec)?;
        Ok(job)
    }
}

/// Ids end up in container names and ledger keys: keep them to a safe alphabet.
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn check_spec(job: &JobEnvelope) -> Result<(), String> {
    if !valid_job_id(&job.job_id) {
        return Err(format!("job id {:?} must be 1-64 characters of [A-Za-z0-9-]", job.job_id));
    }
    outpost_protocol::seal::check_recipients(&job.recipients).map_err(|why| format!("recipients: {why}"))?;
    match &job.spec {
        JobSpec::Container(c) => check_container_spec(c),
        JobSpec::Inference(i) => check_inference_spec(i),
    }
}

/// What every inference spec must satisfy: the protocol's checks, and object keys that are
/// safe keys of the local store.
pub fn check_inference_spec(s: &InferenceSpec) -> Result<(), String> {
    s.check()?;
    for key in s.input_keys() {
        if key.ends_with('/') {
            return Err(format!("input key {key:?} names a prefix; name one object"));
        }
        path::check_entry(key).map_err(|e| format!("input key: {e}"))?;
    }
    if let Some(prefix) = &s.output_prefix {
        path::check_entry(prefix).map_err(|e| format!("output_prefix: {e}"))?;
    }
    Ok(())
}

/// What every container spec must satisfy before the node runs it, whoever wrote it (a signed
/// manifest, or a local trigger in the site's configuration).
pub fn check_container_spec(s: &ContainerSpec) -> Result<(), String> {
    let digest = s.image.strip_prefix("sha256:").unwrap_or("");
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("image {:?} must be an image id of the form sha256:<64 hex digits>", s.image));
    }
    if s.timeout_secs == 0 {
        return Err("timeout_secs must be at least 1".into());
    }
    if s.resources.memory_mb < 6 {
        return Err("resources.memory_mb must be at least 6 (the engine's minimum)".into());
    }
    if s.resources.cpu_millis == 0 || s.resources.pids == 0 {
        return Err("resources.cpu_millis and resources.pids must be at least 1".into());
    }
    if let Some(k) = s.labels.keys().find(|k| k.starts_with("outpost.")) {
        return Err(format!("label {k:?} uses the reserved outpost. prefix"));
    }
    check_job_data(s)
}

/// Inputs, output prefix and egress requests name objects of the local store that become paths
/// under `/in` and `/out`: each must be a valid key that maps onto a path safely.
fn check_job_data(s: &ContainerSpec) -> Result<(), String> {
    if s.inputs.len() > MAX_INPUT_ENTRIES {
        return Err(format!(
            "inputs lists {} entries, more than {MAX_INPUT_ENTRIES}; name a prefix ending in '/' instead",
            s.inputs.len()
        ));
    }
    for entry in &s.inputs {
        path::check_entry(entry).map_err(|e| format!("inputs: {e}"))?;
    }
    if let Some(prefix) = &s.output_prefix {
        path::check_entry(prefix).map_err(|e| format!("output_prefix: {e}"))?;
    }
    if s.egress_bodies.len() > MAX_EGRESS_ENTRIES {
        return Err(format!(
            "egress_bodies lists {} entries, more than {MAX_EGRESS_ENTRIES}; name a prefix ending in '/' instead",
            s.egress_bodies.len()
        ));
    }
    for entry in &s.egress_bodies {
        path::check_entry(entry).map_err(|e| format!("egress_bodies: {e}"))?;
    }
    if !s.egress_bodies.is_empty() && s.output_prefix.is_none() {
        return Err(
            "egress_bodies names output bodies but the spec has no output_prefix, so no outputs".into()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
