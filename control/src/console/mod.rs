//! The web console under `/console`: pages rendered on the server (maud), no JavaScript.
//!
//! Log in with an API token (or the admin token): the console keeps it in memory behind a
//! random session id carried by a cookie that is `HttpOnly`, `Secure`, `SameSite=Strict`,
//! scoped to `/console` and expiring. Every request authenticates the token again, so a revoked
//! or expired token ends its sessions at once, and every page and action goes through the same
//! role checks and handlers as the API (404 for another organisation's objects, 403 for a role
//! too small). Every form carries the session's CSRF token; the login form a double-submit one.
//! Answers forbid caching and carry a strict Content-Security-Policy (no script at all).

mod pages;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::extract::{Form, Path, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use outpost_protocol::{ContainerSpec, JobState, Role, SubmitJobRequest};
use serde::Deserialize;

use crate::api::access::authenticate;
use crate::api::jobs::{self, JobQuery};
use crate::api::operator::{self, AuditQuery};
use crate::api::{ApiError, Body, Caller, Params, Shared, placement};
use crate::data_dir::random_hex;
use crate::store::JobFilter;

/// How long a console session lives after login.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most sessions held at once; the oldest goes first beyond it.
const MAX_SESSIONS: usize = 10_000;
/// Most sessions of one token: logging in again and again evicts that token's own oldest, so no
/// token can push other people's sessions out.
const MAX_SESSIONS_PER_TOKEN: usize = 16;
/// Rows per page of the node and job tables.
pub const PAGE: usize = 100;
const COOKIE: &str = "outpost_session";
const LOGIN_COOKIE: &str = "outpost_login";

struct Session {
    /// The bearer token the person logged in with (authenticated again on every request).
    token: String,
    csrf: String,
    expires_ms: u64,
}

/// Console sessions, in memory: a restart of the control plane logs everyone out.
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    fn open(&self, token: String, now_ms: u64) -> (String, String) {
        let id = random_hex(32);
        let csrf = random_hex(32);
        let expires_ms = now_ms + SESSION_TTL.as_millis() as u64;
        if let Ok(mut map) = self.0.lock() {
            map.retain(|_, s| s.expires_ms > now_ms);
            let mut own: Vec<(u64, String)> = map
                .iter()
                .filter(|(_, s)| s.token == token)
                .map(|(k, s)| (s.expires_ms, k.clone()))
                .collect();
            if own.len() >= MAX_SESSIONS_PER_TOKEN {
                own.sort();
                for (_, old) in own.iter().take(own.len() + 1 - MAX_SESSIONS_PER_TOKEN) {
                    map.remove(old);
                }
            }
            if map.len() >= MAX_SESSIONS
                && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires_ms).map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
            map.insert(id.clone(), Session { token, csrf: csrf.clone(), expires_ms });
        }
        (id, csrf)
    }

    fn get(&self, id: &str, now_ms: u64) -> Option<(String, String)> {
        let map = self.0.lock().ok()?;
        map.get(id).filter(|s| s.expires_ms > now_ms).map(|s| (s.token.clone(), s.csrf.clone()))
    }

    fn close(&self, id: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(id);
        }
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn set_cookie(name: &str, value: &str, max_age: u64) -> HeaderValue {
    let text = format!("{name}={value}; Path=/console; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A logged-in request: who it is and the session's CSRF token.
pub struct Visitor {
    pub caller: Caller,
    pub csrf: String,
    session: String,
}

/// Not logged in (or the session or token ended): to the login page.
fn to_login() -> Response {
    Redirect::to("/console/login").into_response()
}

async fn visitor(st: &Shared, headers: &HeaderMap) -> Result<Visitor, Response> {
    let session = cookie(headers, COOKIE).ok_or_else(to_login)?;
    let (token, csrf) = st.console.get(&session, st.clock.now_ms()).ok_or_else(to_login)?;
    match authenticate(st, &token).await {
        Ok(caller) => Ok(Visitor { caller, csrf, session }),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            // Revoked or expired since login: the session ends with it.
            st.console.close(&session);
            Err(to_login())
        }
        // The store failing for a moment ends nothing.
        Err(e) => Err(pages::error(e.status, &e.body.message, None)),
    }
}

/// Every console page but the login form takes a logged-in visitor; anyone else is sent there.
impl FromRequestParts<Shared> for Visitor {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &Shared) -> Result<Self, Response> {
        visitor(st, &parts.headers).await
    }
}

/// A form post must carry this session's CSRF token: the refusal when it does not.
fn stale_form(v: &Visitor, csrf: &str) -> Option<Response> {
    let fresh = !csrf.is_empty() && crate::api::constant_time_eq(csrf.as_bytes(), v.csrf.as_bytes());
    (!fresh).then(|| {
        pages::error(
            StatusCode::FORBIDDEN,
            "This form is stale or was not sent from the console: go back, reload and try again.",
            Some(v),
        )
    })
}

/// An API handler's refusal as a console page.
fn refused(e: ApiError, v: &Visitor) -> Response {
    pages::error(e.status, &e.body.message, Some(v))
}

/// Headers on every console answer.
async fn harden(req: Request<axum::body::Body>, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

pub fn router() -> Router<Shared> {
    Router::new()
        .route("/console", get(overview))
        .route("/console/style.css", get(style))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route("/console/nodes", get(nodes))
        .route("/console/nodes/{node_id}", get(node))
        .route("/console/nodes/{node_id}/labels", post(label))
        .route("/console/deployments", get(deployments))
        .route("/console/deployments/{org_id}/{name}", get(deployment))
        .route("/console/events", get(events))
        .route("/console/settings", get(settings))
        .route("/console/settings/enrollment-token", post(enrollment_token))
        .route("/console/settings/org", post(org_settings))
        .route("/console/jobs", get(job_list).post(submit))
        .route("/console/jobs/{job_id}", get(job))
        .route("/console/jobs/{job_id}/cancel", post(cancel))
        .route("/console/audit", get(audit))
        .layer(axum::middleware::from_fn(harden))
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], pages::STYLE).into_response()
}

async fn login_form(State(st): State<Shared>, headers: HeaderMap) -> Response {
    if visitor(&st, &headers).await.is_ok() {
        return Redirect::to("/console").into_response();
    }
    let nonce = random_hex(16);
    let mut resp = pages::login(&nonce, None).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, set_cookie(LOGIN_COOKIE, &nonce, 600));
    resp
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    nonce: String,
}

async fn login(State(st): State<Shared>, headers: HeaderMap, Form(f): Form<LoginForm>) -> Response {
    // Double submit: the form's nonce must be the cookie this browser got with the form.
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if f.nonce.is_empty() || !crate::api::constant_time_eq(f.nonce.as_bytes(), expected.as_bytes()) {
        return pages::error(
            StatusCode::FORBIDDEN,
            "This login form is stale or was not sent from the console: reload it.",
            None,
        );
    }
    let token = f.token.trim().to_owned();
    match authenticate(&st, &token).await {
        Err(e) => {
            let nonce = random_hex(16);
            let mut resp =
                (StatusCode::UNAUTHORIZED, pages::login(&nonce, Some(&e.body.message))).into_response();
            resp.headers_mut().insert(header::SET_COOKIE, set_cookie(LOGIN_COOKIE, &nonce, 600));
            resp
        }
        Ok(caller) => {
            let (id, _) = st.console.open(token, st.clock.now_ms());
            st.audit(&caller.actor, caller.org_filter(), "console.login", "").await;
            let mut resp = Redirect::to("/console").into_response();
            resp.headers_mut().append(header::SET_COOKIE, set_cookie(COOKIE, &id, SESSION_TTL.as_secs()));
            resp.headers_mut().append(header::SET_COOKIE, set_cookie(LOGIN_COOKIE, "", 0));
            resp
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(v: Visitor, State(st): State<Shared>, Form(f): Form<CsrfForm>) -> Response {
    if let Some(r) = stale_form(&v, &f.csrf) {
        return r;
    }
    st.console.close(&v.session);
    st.audit(&v.caller.actor, v.caller.org_filter(), "console.logout", "").await;
    let mut resp = Redirect::to("/console/login").into_response();
    resp.headers_mut().insert(header::SET_COOKIE, set_cookie(COOKIE, "", 0));
    resp
}

async fn overview(v: Visitor, State(st): State<Shared>) -> Response {
    let org = v.caller.org_filter();
    let failed = JobFilter { org_id: org.map(str::to_owned), failed: true, limit: 10, ..Default::default() };
    let read = async {
        let (online, offline) = st.presence(org).await?;
        let counts = st.store.job_counts(org).await?;
        let failures = st.store.list_jobs(failed).await?;
        Ok::<_, crate::store::StoreError>((online, offline, counts, failures))
    };
    match read.await {
        Ok((online, offline, counts, failures)) => {
            pages::overview(&v, (online, offline), &counts, &failures).into_response()
        }
        Err(e) => refused(e.into(), &v),
    }
}

#[derive(Deserialize)]
struct PageQuery {
    #[serde(default)]
    page: usize,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    node: Option<String>,
}

async fn nodes(v: Visitor, State(st): State<Shared>, Query(p): Query<PageQuery>) -> Response {
    let offset = p.page.saturating_mul(PAGE);
    match st.store.page_nodes(v.caller.org_filter(), offset, PAGE + 1).await {
        Ok(mut page) => {
            let more = page.len() > PAGE;
            page.truncate(PAGE);
            let page: Vec<_> = page.into_iter().map(|n| placement::present(&st, n)).collect();
            pages::nodes(&v, &page, p.page, more).into_response()
        }
        Err(e) => refused(e.into(), &v),
    }
}

async fn node(v: Visitor, State(st): State<Shared>, Path(node_id): Path<String>) -> Response {
    let info = match operator::get_node(v.caller.clone(), State(st.clone()), Path(node_id.clone())).await {
        Ok(n) => n.0,
        Err(e) => return refused(e, &v),
    };
    let chain = match audit_chain(&st, &node_id).await {
        Ok(c) => c,
        Err(e) => return refused(e.into(), &v),
    };
    let q = JobQuery { node_id: Some(node_id), state: None, group_id: None, limit: Some(20) };
    let recent = jobs::list_jobs(v.caller.clone(), State(st.clone()), Params(q))
        .await
        .map(|j| j.0.jobs)
        .unwrap_or_default();
    pages::node(&v, &info, &chain, &recent).into_response()
}

/// Most of a node's audit entries one page view verifies.
const MAX_CHAIN_VERIFIED: u64 = 100_000;

/// What verifying a node's stored audit chain from its first entry found.
pub struct ChainCheck {
    /// Entries that follow each other from the first.
    pub whole: u64,
    /// Why the chain breaks after `whole`, if it does.
    pub broken: Option<String>,
    /// More entries are stored than one page view verifies.
    pub more: bool,
}

/// Verifies the node's stored audit log from its first entry, as `outpost-control audit verify
/// --node` does, a page at a time (each entry was also checked when it was stored).
async fn audit_chain(st: &Shared, node_id: &str) -> Result<ChainCheck, crate::store::StoreError> {
    let mut walk = outpost_protocol::AuditWalk::new();
    loop {
        let page = st.store.node_audit(node_id, walk.verified(), 10_000).await?;
        match walk.step(&page) {
            Ok(true) => {}
            Ok(false) => return Ok(ChainCheck { whole: walk.verified(), broken: None, more: false }),
            Err(why) => return Ok(ChainCheck { whole: walk.verified(), broken: Some(why), more: false }),
        }
        if walk.verified() >= MAX_CHAIN_VERIFIED {
            let more = !st.store.node_audit(node_id, walk.verified(), 1).await?.is_empty();
            return Ok(ChainCheck { whole: walk.verified(), broken: None, more });
        }
    }
}

async fn job_list(v: Visitor, State(st): State<Shared>, Query(p): Query<PageQuery>) -> Response {
    let state: Option<JobState> = match p.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match serde_json::from_value(serde_json::Value::String(s.to_owned())) {
            Ok(state) => Some(state),
            Err(_) => {
                return pages::error(StatusCode::BAD_REQUEST, &format!("unknown job state {s:?}"), Some(&v));
            }
        },
    };
    let node = p.node.clone().filter(|n| !n.is_empty());
    let limit = p.page.saturating_add(1).saturating_mul(PAGE);
    let q = JobQuery { node_id: node.clone(), state, group_id: None, limit: Some(limit.min(1000)) };
    match jobs::list_jobs(v.caller.clone(), State(st.clone()), Params(q)).await {
        Ok(j) => {
            let page: Vec<_> = j.0.jobs.into_iter().skip(p.page.saturating_mul(PAGE)).collect();
            pages::jobs(&v, &page, p.page, p.state.as_deref().unwrap_or(""), node.as_deref().unwrap_or(""))
                .into_response()
        }
        Err(e) => refused(e, &v),
    }
}

async fn job(v: Visitor, State(st): State<Shared>, Path(job_id): Path<String>) -> Response {
    match jobs::get_job(v.caller.clone(), State(st.clone()), Path(job_id)).await {
        Ok(j) => pages::job(&v, &j.0).into_response(),
        Err(e) => refused(e, &v),
    }
}

#[derive(Deserialize)]
struct SubmitForm {
    #[serde(default)]
    csrf: String,
    node_id: String,
    image: String,
    #[serde(default)]
    command: String,
}

async fn submit(v: Visitor, State(st): State<Shared>, Form(f): Form<SubmitForm>) -> Response {
    if let Some(r) = stale_form(&v, &f.csrf) {
        return r;
    }
    if let Err(e) = v.caller.at_least(Role::Operator) {
        return refused(e, &v);
    }
    let command: Vec<String> = if f.command.trim().is_empty() {
        Vec::new()
    } else {
        vec!["sh".into(), "-c".into(), f.command.clone()]
    };
    let spec = serde_json::json!({"image": f.image.trim(), "command": command});
    let spec: ContainerSpec = match serde_json::from_value(spec) {
        Ok(s) => s,
        Err(e) => {
            return pages::error(StatusCode::BAD_REQUEST, &format!("the job does not parse: {e}"), Some(&v));
        }
    };
    let req = SubmitJobRequest::for_node(f.node_id.trim(), spec);
    match jobs::submit_job(v.caller.clone(), State(st.clone()), Body(req)).await {
        Ok((_, info)) => Redirect::to(&format!("/console/jobs/{}", info.0.job_id)).into_response(),
        Err(e) => refused(e, &v),
    }
}

async fn cancel(
    v: Visitor,
    State(st): State<Shared>,
    Path(job_id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(r) = stale_form(&v, &f.csrf) {
        return r;
    }
    match jobs::cancel_job(v.caller.clone(), State(st.clone()), Path(job_id.clone())).await {
        Ok(_) => Redirect::to(&format!("/console/jobs/{job_id}")).into_response(),
        Err(e) => refused(e, &v),
    }
}

#[derive(Deserialize)]
struct LabelForm {
    #[serde(default)]
    csrf: String,
    /// `key=value`, several separated by commas or spaces.
    #[serde(default)]
    set: String,
    /// Keys, separated by commas or spaces.
    #[serde(default)]
    remove: String,
}

async fn label(
    v: Visitor,
    State(st): State<Shared>,
    Path(node_id): Path<String>,
    Form(f): Form<LabelForm>,
) -> Response {
    if let Some(r) = stale_form(&v, &f.csrf) {
        return r;
    }
    let words = |s: &str| {
        s.split([',', ' ']).map(str::trim).filter(|w| !w.is_empty()).map(str::to_owned).collect::<Vec<_>>()
    };
    let mut set = outpost_protocol::Labels::new();
    for pair in words(&f.set) {
        let Some((k, val)) = pair.split_once('=') else {
            return pages::error(StatusCode::BAD_REQUEST, &format!("{pair:?} is not key=value"), Some(&v));
        };
        set.insert(k.to_owned(), val.to_owned());
    }
    let req = outpost_protocol::LabelNodeRequest { set, remove: words(&f.remove) };
    match operator::label_node(v.caller.clone(), State(st.clone()), Path(node_id.clone()), Body(req)).await {
        Ok(_) => Redirect::to(&format!("/console/nodes/{node_id}")).into_response(),
        Err(e) => refused(e, &v),
    }
}

async fn deployments(v: Visitor, State(st): State<Shared>) -> Response {
    match st.store.list_deployments().await {
        Ok(all) => {
            let mut mine: Vec<_> =
                all.into_iter().map(|d| d.info).filter(|d| v.caller.sees(&d.org_id)).collect();
            mine.sort_by(|a, b| (&a.org_id, &a.name).cmp(&(&b.org_id, &b.name)));
            pages::deployments(&v, &mine).into_response()
        }
        Err(e) => refused(e.into(), &v),
    }
}

async fn deployment(
    v: Visitor,
    State(st): State<Shared>,
    Path((org_id, name)): Path<(String, String)>,
) -> Response {
    match crate::api::deploy::get(v.caller.clone(), State(st.clone()), Path((org_id, name))).await {
        Ok(d) => pages::deployment(&v, &d.0).into_response(),
        Err(e) => refused(e, &v),
    }
}

async fn events(v: Visitor, State(st): State<Shared>) -> Response {
    let q = crate::api::events::EventQuery {
        org_id: None,
        node_id: None,
        after_seq: None,
        cursor: None,
        newest: true,
        limit: Some(PAGE),
        wait_secs: None,
    };
    match crate::api::events::list_events(v.caller.clone(), State(st.clone()), Params(q)).await {
        Ok(list) => pages::events(&v, &list.0.events).into_response(),
        Err(e) => refused(e, &v),
    }
}

/// The organisation the settings page is about: the token's own, or the one the admin token
/// names with `?org=`.
#[derive(Deserialize)]
struct OrgQuery {
    #[serde(default)]
    org: Option<String>,
}

fn settings_org(v: &Visitor, asked: Option<String>) -> Option<String> {
    v.caller.org_filter().map(str::to_owned).or(asked.filter(|o| !o.is_empty()))
}

async fn settings(v: Visitor, State(st): State<Shared>, Query(q): Query<OrgQuery>) -> Response {
    let orgs = match operator::list_orgs(v.caller.clone(), State(st.clone())).await {
        Ok(o) => o.0,
        Err(e) => return refused(e, &v),
    };
    let Some(org_id) = settings_org(&v, q.org) else {
        return pages::settings(&v, &orgs, None, &[], None).into_response();
    };
    settings_page(&v, &st, &orgs, &org_id, None).await
}

/// The settings page of `org_id`: its settings (any role), its API tokens (admins).
async fn settings_page(
    v: &Visitor,
    st: &Shared,
    orgs: &[outpost_protocol::Org],
    org_id: &str,
    created: Option<&outpost_protocol::EnrollmentToken>,
) -> Response {
    let settings =
        match operator::org_settings(v.caller.clone(), State(st.clone()), Path(org_id.to_owned())).await {
            Ok(s) => s.0,
            Err(e) => return refused(e, v),
        };
    let tokens = if v.caller.at_least(outpost_protocol::Role::Admin).is_ok() {
        match crate::api::access::list_api_tokens(
            v.caller.clone(),
            State(st.clone()),
            Path(org_id.to_owned()),
        )
        .await
        {
            Ok(t) => t.0.tokens,
            Err(e) => return refused(e, v),
        }
    } else {
        Vec::new()
    };
    pages::settings(v, orgs, Some((org_id, &settings)), &tokens, created).into_response()
}

#[derive(Deserialize)]
struct OrgSettingsForm {
    #[serde(default)]
    csrf: String,
    org_id: String,
    revision: u64,
    #[serde(default)]
    default_profile: String,
    #[serde(default)]
    off_containers: Option<String>,
    #[serde(default)]
    off_inference: Option<String>,
    #[serde(default)]
    off_services: Option<String>,
}

async fn org_settings(v: Visitor, State(st): State<Shared>, Form(f): Form<OrgSettingsForm>) -> Response {
    if let Some(r) = stale_form(&v, &f.csrf) {
        return r;
    }
    use outpost_protocol::feature;
    let features_off = [
        (feature::CONTAINERS, &f.off_containers),
        (feature::INFERENCE, &f.off_inference),
        (feature::SERVICES, &f.off_services),
    ]
    .into_iter()
    .filter(|(_, box_)| box_.is_some())
    .map(|(name, _)| name.to_owned())
    .collect();
    let req = outpost_protocol::PutOrgSettings {
        default_profile: Some(f.default_profile).filter(|p| !p.is_empty()),
        features_off,
        revision: Some(f.revision),
    };
    if let Err(e) =
        operator::put_org_settings(v.caller.clone(), State(st.clone()), Path(f.org_id.clone()), Body(req))
            .await
    {
        return refused(e, &v);
    }
    let orgs =
        operator::list_orgs(v.caller.clone(), State(st.clone())).await.map(|o| o.0).unwrap_or_default();
    settings_page(&v, &st, &orgs, &f.org_id, None).await
}

#[derive(Deserialize)]
struct EnrollmentForm {
    #[serde(default)]
    csrf: String,
    org_id: String,
    /// Hours the token lives (default 1).
    #[serde(default)]
    hours: Option<u64>,
}

async fn enrollment_token(v: Visitor, State(st): State<Shared>, Form(f): Form<EnrollmentForm>) -> Response {
    if let Some(r) = stale_form(&v, &f.csrf) {
        return r;
    }
    let req = outpost_protocol::CreateTokenRequest { ttl_secs: f.hours.map(|h| h.saturating_mul(3600)) };
    match operator::create_token(v.caller.clone(), State(st.clone()), Path(f.org_id.clone()), Body(req)).await
    {
        Ok((_, token)) => {
            let orgs = operator::list_orgs(v.caller.clone(), State(st.clone()))
                .await
                .map(|o| o.0)
                .unwrap_or_default();
            settings_page(&v, &st, &orgs, &f.org_id, Some(&token.0)).await
        }
        Err(e) => refused(e, &v),
    }
}

async fn audit(v: Visitor, State(st): State<Shared>) -> Response {
    match operator::list_audit(v.caller.clone(), State(st.clone()), Params(AuditQuery { limit: Some(500) }))
        .await
    {
        Ok(a) => pages::audit(&v, &a.0.entries).into_response(),
        Err(e) => refused(e, &v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_token_cannot_push_other_sessions_out() {
        let sessions = Sessions::default();
        let (theirs, _) = sessions.open("someone-else".into(), 0);
        let mut mine = Vec::new();
        for i in 0..(MAX_SESSIONS_PER_TOKEN as u64 * 3) {
            mine.push(sessions.open("busy".into(), i).0);
        }
        assert!(sessions.get(&theirs, 100).is_some(), "another token's session survives");
        let alive = mine.iter().filter(|id| sessions.get(id, 100).is_some()).count();
        assert_eq!(alive, MAX_SESSIONS_PER_TOKEN, "a token keeps its newest sessions only");
        assert!(sessions.get(mine.last().expect("one"), 100).is_some(), "the newest is kept");
        assert!(sessions.get(&mine[0], 100).is_none(), "the oldest went first");
    }

    #[test]
    fn sessions_expire_and_close() {
        let sessions = Sessions::default();
        let (id, csrf) = sessions.open("t".into(), 0);
        assert_eq!(sessions.get(&id, 1).map(|(_, c)| c), Some(csrf));
        assert!(sessions.get(&id, SESSION_TTL.as_millis() as u64 + 1).is_none(), "expired");
        sessions.close(&id);
        assert!(sessions.get(&id, 1).is_none(), "closed");
    }
}
