//! The agent's only connection: outbound HTTPS (TLS 1.3, mTLS) to the control plane. It knows
//! the routes and turns every failure into retryable (network, 5xx) or refused (4xx) so the
//! callers can back off or give up; it never listens on anything.

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
}

#[derive(Debug, Clone)]
pub struct Uplink {
    client: reqwest::Client,
    base: String,
    request_timeout: Duration,
}

impl Uplink {
    pub fn new(
        base: &str,
        tls: rustls::ClientConfig,
        request_timeout: Duration,
    ) -> Result<Self, UplinkError> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(50))
            .build()
            .map_err(|e| UplinkError::Tls(e.to_string()))?;
        Ok(Self { client, base: base.trim_end_matches('/').to_string(), request_timeout })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, UplinkError> {
        self.post(paths::ENROLL, req, self.request_timeout).await
    }

    /// Long-poll: the server holds the request up to `wait`; allow a margin on top.
    pub async fn poll(&self, req: &PollRequest, wait: Duration) -> Result<PollResponse, UplinkError> {
        self.post(paths::NODE_POLL, req, wait + self.request_timeout).await
    }

    pub async fn report(&self, report: &ResultReport) -> Result<Ack, UplinkError> {
        self.post(paths::NODE_RESULTS, report, self.request_timeout).await
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

    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), UplinkError> {
        let _: serde_json::Value = self.post(paths::NODE_HEARTBEAT, hb, self.request_timeout).await?;
        Ok(())
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<R, UplinkError> {
        let url = format!("{}{}", self.base, path);
        let resp = self
            .client
            .post(&url)
            .json(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| UplinkError::Unreachable { url: url.clone(), message: error_chain(&e) })?;
        let status = resp.status();
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
