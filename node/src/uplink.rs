//! The agent's only connection: outbound HTTPS (TLS 1.3, mTLS) to the control plane. It knows
//! the routes and turns every failure into retryable (network, 5xx) or refused (4xx) so the
//! callers can back off or give up; it never listens on anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use outpost_protocol::{
    Ack, EnrollRequest, EnrollResponse, ErrorBody, EventAck, EventBatch, Heartbeat, PollRequest,
    PollResponse, ResultReport, paths,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// Could not reach the control plane, or it failed: try again later.
    #[error("control plane unreachable at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("control plane error {status} at {url}: {message}")]
    Server { url: String, status: u16, message: String },
    /// The control plane refused the request: retrying the same request will not help.
    #[error("control plane refused {url} ({status} {code}): {message}")]
    Refused { url: String, status: u16, code: String, message: String },
    #[error("unexpected answer from {url}: {message}")]
    Decode { url: String, message: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl UplinkError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            UplinkError::Unreachable { .. } | UplinkError::Server { .. } | UplinkError::Decode { .. }
        )
    }

    /// A control plane older than this agent refused a value it does not know (an outcome).
    fn is_unknown_variant(&self) -> bool {
        matches!(self, UplinkError::Refused { status: 400, message, .. } if message.contains("unknown variant"))
    }

    /// A control plane older than this agent refused a field it does not know.
    fn is_unknown_field(&self) -> bool {
        matches!(self, UplinkError::Refused { status: 400, message, .. } if message.contains("unknown field"))
    }

    /// A control plane older than this agent has no such route.
    pub fn is_unknown_route(&self) -> bool {
        matches!(self, UplinkError::Refused { code, .. } if code == "no_such_route")
    }
}

#[derive(Debug, Clone)]
pub struct Uplink {
    /// Shared by every clone, so a renewed certificate ([`Uplink::set_tls`]) reaches them all.
    client: Arc<std::sync::RwLock<reqwest::Client>>,
    base: String,
    request_timeout: Duration,
    /// The control plane's protocol revision as last seen: 0 until known, 1 for a control plane
    /// that states none (older than revision 2), else what its `outpost-protocol` header says.
    peer_revision: Arc<AtomicU32>,
}

impl Uplink {
    pub fn new(
        base: &str,
        tls: rustls::ClientConfig,
        request_timeout: Duration,
    ) -> Result<Self, UplinkError> {
        Ok(Self {
            client: Arc::new(std::sync::RwLock::new(Self::client(tls)?)),
            base: base.trim_end_matches('/').to_string(),
            request_timeout,
            peer_revision: Arc::new(AtomicU32::new(0)),
        })
    }

    fn client(tls: rustls::ClientConfig) -> Result<reqwest::Client, UplinkError> {
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(50))
            .build()
            .map_err(|e| UplinkError::Tls(e.to_string()))
    }

    /// From now on every request (of every clone) goes out with `tls` (a renewed identity) on
    /// new connections; requests in flight finish on theirs.
    pub fn set_tls(&self, tls: rustls::ClientConfig) -> Result<(), UplinkError> {
        let client = Self::client(tls)?;
        let mut held = self
            .client
            .write()
            .map_err(|_| UplinkError::Tls("the uplink's client lock is poisoned".into()))?;
        *held = client;
        Ok(())
    }

    /// Sends the next entries of the node's audit log.
    pub async fn post_audit(
        &self,
        batch: &outpost_protocol::AuditBatch,
    ) -> Result<outpost_protocol::AuditAck, UplinkError> {
        self.post(paths::NODE_AUDIT_UPLINK, batch, self.request_timeout).await
    }

    /// Asks for a new client certificate for the CSR's key (mutual TLS with the current one).
    pub async fn renew_certificate(
        &self,
        req: &outpost_protocol::RenewCertificateRequest,
    ) -> Result<outpost_protocol::RenewCertificateResponse, UplinkError> {
        self.post(paths::NODE_CERTIFICATE, req, self.request_timeout).await
    }

    /// What the node should trust now (CAs, the org's signing keys).
    pub async fn trust(&self) -> Result<outpost_protocol::NodeTrust, UplinkError> {
        self.send::<(), _>(reqwest::Method::GET, paths::NODE_TRUST, None, self.request_timeout).await
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, UplinkError> {
        // A control plane from before the announcement at enrollment refuses the field whatever
        // revision it states: enroll without it (the first heartbeat announces).
        match self.post(paths::ENROLL, req, self.request_timeout).await {
            Err(e) if e.is_unknown_field() && req.announce.is_some() => {
                tracing::debug!(error = %e, "the control plane refused the announcement at enrollment; enrolling without it");
                let legacy = EnrollRequest { announce: None, ..req.clone() };
                self.post(paths::ENROLL, &legacy, self.request_timeout).await
            }
            r => r,
        }
    }

    /// Long-poll: the server holds the request up to `wait`; allow a margin on top.
    pub async fn poll(&self, req: &PollRequest, wait: Duration) -> Result<PollResponse, UplinkError> {
        let legacy = || PollRequest { announce: None, service_acks: Vec::new(), ..req.clone() };
        self.post_compat(paths::NODE_POLL, req, legacy, wait + self.request_timeout).await
    }

    pub async fn report(&self, report: &ResultReport) -> Result<Ack, UplinkError> {
        // A control plane before revision 3 knows no `refused` or `not_approved`: it gets
        // `rejected` with the same error, which it stores and shows.
        let new = matches!(
            report.outcome,
            outpost_protocol::Outcome::Refused | outpost_protocol::Outcome::NotApproved
        );
        let legacy = || ResultReport { outcome: outpost_protocol::Outcome::Rejected, ..report.clone() };
        match self.peer_revision() {
            1 | 2 if new => self.post(paths::NODE_RESULTS, &legacy(), self.request_timeout).await,
            // Not known yet (no answer since the start): try, and learn from a refusal.
            0 if new => match self.post(paths::NODE_RESULTS, report, self.request_timeout).await {
                Err(e) if e.is_unknown_variant() => {
                    self.post(paths::NODE_RESULTS, &legacy(), self.request_timeout).await
                }
                r => r,
            },
            _ => self.post(paths::NODE_RESULTS, report, self.request_timeout).await,
        }
    }

    /// Deliver relay events, oldest first; the answer says up to which seq they are stored.
    pub async fn post_events(&self, batch: &EventBatch) -> Result<EventAck, UplinkError> {
        self.post(paths::NODE_EVENTS, batch, self.request_timeout).await
    }

    /// Deliver service status reports, oldest first; the answer says up to which seq they are stored.
    pub async fn post_service_reports(
        &self,
        batch: &outpost_protocol::ServiceReportBatch,
    ) -> Result<outpost_protocol::ServiceReportAck, UplinkError> {
        self.post(paths::NODE_SERVICES, batch, self.request_timeout).await
    }

    /// A piece of a log stream the control plane asked for.
    pub async fn post_logs(
        &self,
        chunk: &outpost_protocol::LogChunk,
    ) -> Result<outpost_protocol::LogChunkAck, UplinkError> {
        self.post(paths::NODE_LOGS, chunk, self.request_timeout).await
    }

    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), UplinkError> {
        // Jobs held for approval are news only to a control plane of revision 3 or later.
        let stripped;
        let hb = if self.peer_revision() < 3 && !hb.awaiting_approval.is_empty() {
            stripped = Heartbeat { awaiting_approval: Vec::new(), ..hb.clone() };
            &stripped
        } else {
            hb
        };
        let legacy = || Heartbeat { labels: Default::default(), announce: None, ..hb.clone() };
        self.post_compat::<_, serde_json::Value>(paths::NODE_HEARTBEAT, hb, legacy, self.request_timeout)
            .await
            .map(drop)
    }

    /// Posts `body`, or its older form (without what a control plane before protocol revision
    /// 2 refuses) to such a control plane: known as one, or found to be one by its refusal.
    async fn post_compat<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        legacy: impl FnOnce() -> B,
        timeout: Duration,
    ) -> Result<R, UplinkError> {
        if self.peer_is_legacy() {
            return self.post(path, &legacy(), timeout).await;
        }
        match self.post(path, body, timeout).await {
            Err(e) if e.is_unknown_field() && self.peer_revision() < 2 => {
                self.legacy_peer(&e);
                self.post(path, &legacy(), timeout).await
            }
            r => r,
        }
    }

    /// The control plane's protocol revision, once an answer told it (0 before).
    pub fn peer_revision(&self) -> u32 {
        self.peer_revision.load(Ordering::Relaxed)
    }

    /// A control plane before revision 2 refuses what it does not know: the agent's
    /// announcement and labels are left out for it, and come back as soon as an answer states
    /// revision 2 or later (the control plane was upgraded).
    fn peer_is_legacy(&self) -> bool {
        self.peer_revision() == 1
    }

    fn legacy_peer(&self, refusal: &UplinkError) {
        tracing::debug!(error = %refusal, "an older control plane refused a field; sending the older form");
        self.older_peer();
    }

    /// The control plane states no protocol revision: it is older than revision 2.
    fn older_peer(&self) {
        if self.peer_revision.swap(1, Ordering::Relaxed) != 1 {
            tracing::warn!(
                "the control plane is older than this agent (protocol revision 1): labels and \
                 capabilities are not sent, and it cannot deploy services, cancel jobs or stream \
                 logs here, until it is upgraded"
            );
        }
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<R, UplinkError> {
        self.send(reqwest::Method::POST, path, Some(body), timeout).await
    }

    async fn send<B: Serialize, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<R, UplinkError> {
        let url = format!("{}{}", self.base, path);
        let client = self
            .client
            .read()
            .map(|c| c.clone())
            .map_err(|_| UplinkError::Tls("the uplink's client lock is poisoned".into()))?;
        let mut request = client.request(method, &url).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let resp = request.send().await.map_err(|e| UplinkError::Unreachable {
            url: url.clone(),
            message: with_hint(error_chain(&e)),
        })?;
        let status = resp.status();
        match resp
            .headers()
            .get(outpost_protocol::PROTOCOL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
        {
            Some(rev) => self.peer_revision.store(rev.max(2), Ordering::Relaxed),
            // Every answer of a control plane of revision 2 or later states it; one without is
            // older (or was rolled back). A 5xx may come from something in between: no sign.
            None if !status.is_server_error() => self.older_peer(),
            None => {}
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| UplinkError::Unreachable { url: url.clone(), message: error_chain(&e) })?;
        if status.is_success() {
            let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(body)
                .map_err(|e| UplinkError::Decode { url, message: e.to_string() });
        }
        let err: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
        let message =
            err.as_ref().map(|e| e.message.clone()).unwrap_or_else(|| String::from_utf8_lossy(&bytes).into());
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(UplinkError::Server { url, status: status.as_u16(), message })
        } else {
            let code = err.map(|e| e.code).unwrap_or_default();
            Err(UplinkError::Refused { url, status: status.as_u16(), code, message })
        }
    }
}

/// A failed handshake because the control plane's certificate is from a CA this node does not
/// trust says what to do about it.
fn with_hint(message: String) -> String {
    if message.contains("UnknownIssuer") {
        format!(
            "{message} (the control plane presents a certificate from a CA this node does not trust: if it \
             rotated its CA while this node was offline through the whole overlap, enroll this node again, \
             `outpost enroll --force` with a new token or an offline enrollment bundle)"
        )
    } else {
        message
    }
}

/// reqwest's Display hides the cause (e.g. "connection refused", a TLS alert); show the chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
