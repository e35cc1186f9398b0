//! Enrollment: a node without a certificate trades a one-time, expiring token (scoped to an
//! organisation) and a CSR for a client certificate, the CA and the org's job-signing key.
//! Every attempt, granted or refused, is audited. The token is looked up by its SHA-256 only.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use outpost_protocol::{EnrollRequest, EnrollResponse, ErrorBody, NodeInfo, paths};

use super::{ApiError, ApiResult, Body, Shared};
use crate::pki::sha256_hex;
use crate::store::{TokenRefusal, check_token};

#[utoipa::path(post, path = paths::ENROLL, tag = "node", request_body = EnrollRequest,
    description = "Trade a one-time enrollment token and a PKCS#10 CSR for a client certificate (CN = node id), \
                   the CA to pin and the organisation's job-signing key. No client certificate needed.",
    responses((status = 200, body = EnrollResponse), (status = 400, body = ErrorBody),
        (status = 401, description = "token unknown, already used or expired", body = ErrorBody)))]
pub async fn enroll(
    State(st): State<Shared>,
    Body(req): Body<EnrollRequest>,
) -> ApiResult<Json<EnrollResponse>> {
    let token_sha = sha256_hex(req.token.trim().as_bytes());
    let agent = &req.agent_version;
    Ok(Json(enroll_core(&st, &token_sha, &req.csr_pem, &req.hostname, agent, None, req.announce).await?))
}

/// Spends the token (by its SHA-256) and registers the node with a certificate for `csr_pem`:
/// the one way a node is enrolled, online or from an offline request.
pub(super) async fn enroll_core(
    st: &Shared,
    token_sha: &str,
    csr_pem: &str,
    hostname: &str,
    agent_version: &str,
    facts: Option<outpost_protocol::Heartbeat>,
    announce: Option<outpost_protocol::Announce>,
) -> ApiResult<EnrollResponse> {
    // As the document's pattern and maxLength say: characters, not bytes; ASCII whitespace
    // around it (a hostname file's newline) is trimmed, nothing else may be a control character.
    let long = hostname.chars().count() > 253;
    let hostname = hostname.trim_matches(|c: char| c.is_ascii_whitespace());
    if hostname.is_empty() || long || hostname.chars().any(char::is_control) {
        return Err(ApiError::bad_request("bad_hostname", "hostname must be 1-253 printable characters"));
    }
    let now = st.clock.now_ms();
    let Some(token) = st.store.get_token(token_sha).await? else {
        return Err(refuse(st, TokenRefusal::Unknown, "-", hostname).await);
    };
    // Answer a spent or expired token before doing any work for it. `enroll_node` checks again
    // atomically, so two nodes racing with one token still get one enrollment.
    if let Err(refusal) = check_token(Some(&token), &token.org_id, now) {
        return Err(refuse(st, refusal, &token.org_id, hostname).await);
    }
    let org = st.store.get_org(&token.org_id).await?.ok_or_else(|| {
        ApiError::internal(
            "org_missing",
            format!("organisation {} of this token no longer exists", token.org_id),
        )
    })?;
    let node_id = format!("node-{}", uuid::Uuid::new_v4().simple());
    // A short life only for an agent that renews its certificate; an older one keeps a year.
    let renews = announce.as_ref().is_some_and(|a| a.has(outpost_protocol::capability::CERT_RENEWAL));
    let issued = if renews {
        st.authority.issuer().issue_client_cert_for(csr_pem, &node_id, st.node_cert_lifetime)
    } else {
        st.authority.issuer().issue_client_cert(csr_pem, &node_id)
    };
    let cert = match issued {
        Ok(cert) => cert,
        Err(e) => {
            let detail = format!("unusable CSR from {hostname:?} (org {}): {e}", org.org.id);
            st.audit("anonymous", Some(&org.org.id), "enroll.rejected", &detail).await;
            return Err(ApiError::bad_request(
                "bad_csr",
                format!("the certificate signing request is unusable: {e}; the token was not spent"),
            ));
        }
    };
    let node = NodeInfo {
        node_id: node_id.clone(),
        org_id: org.org.id.clone(),
        hostname: hostname.into(),
        enrolled_unix_ms: now,
        cert_sha256: cert.sha256.clone(),
        last_seen_unix_ms: None,
        last_heartbeat: facts,
        enrolled_announce: announce,
        operator_labels: Default::default(),
        labels: Default::default(),
        online: false,
        revoked_unix_ms: None,
        previous_cert_sha256: None,
    };
    if let Err(refusal) = st.store.enroll_node(token_sha, now, node).await? {
        return Err(refuse(st, refusal, &org.org.id, hostname).await);
    }
    let detail = format!("{node_id} ({hostname}, agent {agent_version}) in org {}", org.org.id);
    st.audit(&format!("node:{node_id}"), Some(&org.org.id), "node.enrolled", &detail).await;
    Ok(EnrollResponse {
        node_id,
        org_signing_key: crate::signing::effective(&org, now).0.clone(),
        org_id: org.org.id,
        cert_pem: cert.pem,
        ca_pem: st.ca_trust(now).0,
    })
}

/// Audits a refused enrollment and builds its 401.
async fn refuse(st: &Shared, refusal: TokenRefusal, org_id: &str, hostname: &str) -> ApiError {
    let (code, message, why) = match refusal {
        TokenRefusal::Used => (
            "token_used",
            "this enrollment token was already used; tokens are one-time, ask the operator for a new one",
            "token already used",
        ),
        TokenRefusal::Expired => (
            "token_expired",
            "this enrollment token has expired; ask the operator for a new one",
            "token expired",
        ),
        TokenRefusal::Unknown => (
            "token_unknown",
            "this enrollment token is not known here; check it was created on this control plane",
            "unknown token",
        ),
    };
    // A known token names its organisation, whose people see the refusal; an unknown one none.
    let org = (org_id != "-").then_some(org_id);
    st.audit("anonymous", org, "enroll.rejected", &format!("{why} (org {org_id}) from {hostname:?}")).await;
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}
