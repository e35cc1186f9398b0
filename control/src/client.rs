//! The operator's client of the API, used by the CLI: TLS 1.3 with the control plane's CA
//! pinned, the admin token as bearer, `ErrorBody` answers turned into readable errors.

use std::time::Duration;

use anyhow::{Context, anyhow};
use outpost_protocol::{
    ApiTokenInfo, ApiTokenList, AuditList, CreateApiTokenRequest, CreateOrgRequest, CreateTokenRequest,
    CreateTriggerRequest, CreatedApiToken, EnrollmentToken, ErrorBody, EventList, JobGroup, JobInfo, JobList,
    JobState, LabelNodeRequest, NodeInfo, NodeList, Org, Role, SubmitJobRequest, Trigger, TriggerList, paths,
};
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The query of [`Client::events`]; see the `GET /v1/events` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsQuery {
    pub org_id: Option<String>,
    pub node_id: Option<String>,
    pub after_seq: Option<u64>,
    pub cursor: Option<u64>,
    pub newest: bool,
    pub limit: Option<usize>,
    pub wait_secs: Option<u64>,
}

impl EventsQuery {
    fn to_query(&self) -> String {
        let mut parts = Vec::new();
        if let Some(o) = &self.org_id {
            parts.push(format!("org_id={}", enc(o)));
        }
        if let Some(n) = &self.node_id {
            parts.push(format!("node_id={}", enc(n)));
        }
        let numbers = [("after_seq", self.after_seq), ("cursor", self.cursor), ("wait_secs", self.wait_secs)];
        for (name, value) in numbers {
            if let Some(v) = value {
                parts.push(format!("{name}={v}"));
            }
        }
        if let Some(l) = self.limit {
            parts.push(format!("limit={l}"));
        }
        if self.newest {
            parts.push("newest=true".into());
        }
        if parts.is_empty() { String::new() } else { format!("?{}", parts.join("&")) }
    }
}

/// Which jobs `job list` asks for.
#[derive(Debug, Clone, Default)]
pub struct JobsQuery {
    pub node_id: Option<String>,
    pub state: Option<JobState>,
    pub group_id: Option<String>,
    pub limit: usize,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(base: &str, ca_pem: &str, token: &str) -> anyhow::Result<Self> {
        let tls = crate::tls::client_config(ca_pem, None)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned(), token: token.to_owned() })
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<R> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach the control plane at {url}: {}", chain(&e)))?;
        let status = resp.status();
        let bytes = resp.bytes().await.with_context(|| format!("reading the answer of {method} {url}"))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => anyhow!("{method} {path}: {} ({}, HTTP {})", e.message, e.code, status.as_u16()),
                Err(_) => anyhow!("{method} {path}: HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
            });
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: unexpected answer"))
    }

    pub async fn create_org(&self, name: &str) -> anyhow::Result<Org> {
        self.call(Method::POST, paths::ORGS, Some(&CreateOrgRequest { name: name.into() })).await
    }

    pub async fn list_orgs(&self) -> anyhow::Result<Vec<Org>> {
        self.call::<(), _>(Method::GET, paths::ORGS, None).await
    }

    pub async fn org_settings(&self, org_id: &str) -> anyhow::Result<outpost_protocol::OrgSettings> {
        let path = paths::fill(paths::ORG_SETTINGS, "org_id", org_id);
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn put_org_settings(
        &self,
        org_id: &str,
        req: &outpost_protocol::PutOrgSettings,
    ) -> anyhow::Result<outpost_protocol::OrgSettings> {
        let path = paths::fill(paths::ORG_SETTINGS, "org_id", org_id);
        self.call(Method::PUT, &path, Some(req)).await
    }

    pub async fn rotate_org_key(
        &self,
        org_id: &str,
        req: &outpost_protocol::RotateRequest,
    ) -> anyhow::Result<outpost_protocol::RotateResponse> {
        self.call(Method::POST, &paths::fill(paths::ORG_KEY_ROTATE, "org_id", &enc(org_id)), Some(req)).await
    }

    pub async fn rotate_ca(
        &self,
        req: &outpost_protocol::RotateRequest,
    ) -> anyhow::Result<outpost_protocol::RotateResponse> {
        self.call(Method::POST, paths::CA_ROTATE, Some(req)).await
    }

    pub async fn create_token(&self, org_id: &str, ttl_secs: Option<u64>) -> anyhow::Result<EnrollmentToken> {
        let path = paths::fill(paths::ORG_TOKENS, "org_id", org_id);
        self.call(Method::POST, &path, Some(&CreateTokenRequest { ttl_secs })).await
    }

    pub async fn create_api_token(
        &self,
        org_id: &str,
        name: &str,
        role: Role,
        ttl_secs: Option<u64>,
    ) -> anyhow::Result<CreatedApiToken> {
        let path = paths::fill(paths::ORG_API_TOKENS, "org_id", &enc(org_id));
        let req = CreateApiTokenRequest { name: name.into(), role, ttl_secs };
        self.call(Method::POST, &path, Some(&req)).await
    }

    pub async fn list_api_tokens(&self, org_id: &str) -> anyhow::Result<ApiTokenList> {
        let path = paths::fill(paths::ORG_API_TOKENS, "org_id", &enc(org_id));
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn revoke_api_token(&self, org_id: &str, token_id: &str) -> anyhow::Result<ApiTokenInfo> {
        let path = paths::fill(paths::ORG_API_TOKEN, "org_id", &enc(org_id));
        let path = paths::fill(&path, "token_id", &enc(token_id));
        self.call::<(), _>(Method::DELETE, &path, None).await
    }

    pub async fn submit(&self, req: &SubmitJobRequest) -> anyhow::Result<JobInfo> {
        self.call(Method::POST, paths::JOBS, Some(req)).await
    }

    pub async fn job(&self, job_id: &str) -> anyhow::Result<JobInfo> {
        self.call::<(), _>(Method::GET, &paths::fill(paths::JOB, "job_id", &enc(job_id)), None).await
    }

    pub async fn jobs(&self, q: &JobsQuery) -> anyhow::Result<JobList> {
        let mut query = format!("?limit={}", q.limit);
        if let Some(n) = &q.node_id {
            query.push_str(&format!("&node_id={}", enc(n)));
        }
        if let Some(s) = q.state {
            let s = serde_json::to_value(s)?;
            query.push_str(&format!("&state={}", s.as_str().unwrap_or_default()));
        }
        if let Some(g) = &q.group_id {
            query.push_str(&format!("&group_id={}", enc(g)));
        }
        self.call::<(), _>(Method::GET, &format!("{}{query}", paths::JOBS), None).await
    }

    /// One job on each node a selector matches (`placement: each`).
    pub async fn submit_group(&self, req: &SubmitJobRequest) -> anyhow::Result<JobGroup> {
        self.call(Method::POST, paths::JOB_GROUPS, Some(req)).await
    }

    pub async fn group(&self, group_id: &str) -> anyhow::Result<JobGroup> {
        self.call::<(), _>(Method::GET, &paths::fill(paths::JOB_GROUP, "group_id", &enc(group_id)), None)
            .await
    }

    /// Enroll a node from its offline request; the answer is the enrollment file's content.
    pub async fn enroll_offline(
        &self,
        org_id: &str,
        params: &outpost_protocol::OfflineEnrollParams,
    ) -> anyhow::Result<outpost_protocol::SignedEnvelope> {
        self.call(Method::POST, &paths::fill(paths::ORG_ENROLL_OFFLINE, "org_id", &enc(org_id)), Some(params))
            .await
    }

    /// Sign a bundle for air-gapped nodes of `org_id`.
    pub async fn bundle(
        &self,
        org_id: &str,
        req: &outpost_protocol::BundleRequest,
    ) -> anyhow::Result<outpost_protocol::BundleResponse> {
        self.call(Method::POST, &paths::fill(paths::ORG_BUNDLES, "org_id", &enc(org_id)), Some(req)).await
    }

    /// Import a node's results bundle; the answer carries the acknowledgement bundle.
    pub async fn import_results(
        &self,
        bundle: &outpost_protocol::ResultsBundle,
    ) -> anyhow::Result<outpost_protocol::ResultsImport> {
        self.call(Method::POST, paths::BUNDLE_RESULTS, Some(bundle)).await
    }

    /// The job's output from byte `after` on (see `GET /v1/jobs/{job_id}/logs`).
    pub async fn logs(
        &self,
        job_id: &str,
        after: u64,
        follow: bool,
        wait_secs: u64,
    ) -> anyhow::Result<outpost_protocol::JobLogs> {
        let path = format!(
            "{}?after={after}&follow={follow}&wait_secs={wait_secs}",
            paths::fill(paths::JOB_LOGS, "job_id", &enc(job_id))
        );
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn cancel(&self, job_id: &str) -> anyhow::Result<JobInfo> {
        self.call::<(), _>(Method::POST, &paths::fill(paths::JOB_CANCEL, "job_id", &enc(job_id)), None).await
    }

    /// Nodes, optionally only those of `org_id` that `selector` matches.
    pub async fn nodes(&self, selector: Option<&str>, org_id: Option<&str>) -> anyhow::Result<NodeList> {
        let mut parts = Vec::new();
        if let Some(s) = selector {
            parts.push(format!("selector={}", enc(s)));
        }
        if let Some(o) = org_id {
            parts.push(format!("org_id={}", enc(o)));
        }
        let query = if parts.is_empty() { String::new() } else { format!("?{}", parts.join("&")) };
        self.call::<(), _>(Method::GET, &format!("{}{query}", paths::NODES), None).await
    }

    pub async fn deploy(
        &self,
        org_id: &str,
        req: &outpost_protocol::DeployRequest,
    ) -> anyhow::Result<outpost_protocol::DeploymentInfo> {
        self.call(Method::POST, &paths::fill(paths::DEPLOYMENTS, "org_id", &enc(org_id)), Some(req)).await
    }

    pub async fn deployments(&self, org_id: &str) -> anyhow::Result<outpost_protocol::DeploymentList> {
        self.call::<(), _>(Method::GET, &paths::fill(paths::DEPLOYMENTS, "org_id", &enc(org_id)), None).await
    }

    pub async fn deployment(
        &self,
        org_id: &str,
        name: &str,
    ) -> anyhow::Result<outpost_protocol::DeploymentInfo> {
        let path = paths::fill(&paths::fill(paths::DEPLOYMENT, "org_id", &enc(org_id)), "name", &enc(name));
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn deploy_action(
        &self,
        org_id: &str,
        name: &str,
        action: outpost_protocol::DeployAction,
    ) -> anyhow::Result<outpost_protocol::DeploymentInfo> {
        let path =
            paths::fill(&paths::fill(paths::DEPLOYMENT_ACTION, "org_id", &enc(org_id)), "name", &enc(name));
        self.call(Method::POST, &path, Some(&outpost_protocol::DeployActionRequest { action })).await
    }

    pub async fn label_node(&self, node_id: &str, req: &LabelNodeRequest) -> anyhow::Result<NodeInfo> {
        self.call(Method::POST, &paths::fill(paths::NODE_LABELS, "node_id", &enc(node_id)), Some(req)).await
    }

    pub async fn revoke_node(&self, node_id: &str) -> anyhow::Result<NodeInfo> {
        self.call::<(), _>(Method::POST, &paths::fill(paths::NODE_REVOKE, "node_id", &enc(node_id)), None)
            .await
    }

    pub async fn node(&self, node_id: &str) -> anyhow::Result<NodeInfo> {
        self.call::<(), _>(Method::GET, &paths::fill(paths::NODE, "node_id", &enc(node_id)), None).await
    }

    /// Stored relay events; with `wait_secs`, held until one matches (long-poll, at most the server's
    /// `--max-hold`, 30 s by default).
    pub async fn events(&self, q: &EventsQuery) -> anyhow::Result<EventList> {
        self.call::<(), _>(Method::GET, &format!("{}{}", paths::EVENTS, q.to_query()), None).await
    }

    pub async fn create_trigger(&self, req: &CreateTriggerRequest) -> anyhow::Result<Trigger> {
        self.call(Method::POST, paths::TRIGGERS, Some(req)).await
    }

    pub async fn triggers(&self, org_id: Option<&str>) -> anyhow::Result<TriggerList> {
        let query = org_id.map(|o| format!("?org_id={}", enc(o))).unwrap_or_default();
        self.call::<(), _>(Method::GET, &format!("{}{query}", paths::TRIGGERS), None).await
    }

    pub async fn trigger(&self, trigger_id: &str) -> anyhow::Result<Trigger> {
        let path = paths::fill(paths::TRIGGER, "trigger_id", &enc(trigger_id));
        self.call::<(), _>(Method::GET, &path, None).await
    }

    /// Removes a trigger; answers with what was removed.
    pub async fn delete_trigger(&self, trigger_id: &str) -> anyhow::Result<Trigger> {
        let path = paths::fill(paths::TRIGGER, "trigger_id", &enc(trigger_id));
        self.call::<(), _>(Method::DELETE, &path, None).await
    }

    pub async fn audit(&self, limit: usize) -> anyhow::Result<AuditList> {
        self.call::<(), _>(Method::GET, &format!("{}?limit={limit}", paths::AUDIT), None).await
    }

    pub async fn node_audit(
        &self,
        node_id: &str,
        after: u64,
    ) -> anyhow::Result<outpost_protocol::NodeAuditList> {
        let path = paths::NODE_AUDIT.replace("{node_id}", &enc(node_id));
        self.call::<(), _>(Method::GET, &format!("{path}?after={after}"), None).await
    }
}

/// Ids are `[A-Za-z0-9-]`; anything else is percent-encoded so it cannot change the path.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
