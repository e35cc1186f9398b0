//! Every HTTP route of API v1, in one place, so that the server's router, its OpenAPI document
//! and the clients cannot drift apart. `{name}` marks a path parameter (axum 0.8 syntax).

/// Operator: create or list organisations. Bearer token.
pub const ORGS: &str = "/v1/orgs";
/// Operator: create an enrollment token for an organisation. Bearer token.
pub const ORG_TOKENS: &str = "/v1/orgs/{org_id}/tokens";
/// Operator (admin role): create and list API tokens of an organisation.
pub const ORG_API_TOKENS: &str = "/v1/orgs/{org_id}/api-tokens";
/// Operator (admin role): revoke an API token.
pub const ORG_API_TOKEN: &str = "/v1/orgs/{org_id}/api-tokens/{token_id}";
/// Operator: an organisation's settings (viewer reads, admin changes).
pub const ORG_SETTINGS: &str = "/v1/orgs/{org_id}/settings";
/// Node, before it has a certificate: trade a one-time token and a CSR for a client certificate.
pub const ENROLL: &str = "/v1/enroll";
/// Node (mTLS): long-poll for jobs, acknowledging the ones already persisted.
pub const NODE_POLL: &str = "/v1/node/poll";
/// Node (mTLS): report a job result (idempotent).
pub const NODE_RESULTS: &str = "/v1/node/results";
/// Node (mTLS): heartbeat with inventory.
pub const NODE_HEARTBEAT: &str = "/v1/node/heartbeat";
/// Node (mTLS): deliver relay events, oldest first (idempotent by node and seq).
pub const NODE_EVENTS: &str = "/v1/node/events";
/// Node (mTLS): service status reports, oldest first (idempotent by node and seq).
pub const NODE_SERVICES: &str = "/v1/node/services";
/// Operator: create a deployment or a new revision of one (POST), list them (GET).
pub const DEPLOYMENTS: &str = "/v1/orgs/{org_id}/deployments";
/// Operator: a deployment with its per-node status.
pub const DEPLOYMENT: &str = "/v1/orgs/{org_id}/deployments/{name}";
/// Operator: pause, resume, abort or roll back a deployment (POST).
pub const DEPLOYMENT_ACTION: &str = "/v1/orgs/{org_id}/deployments/{name}/action";
/// Operator: enroll a node from its offline request file (POST).
pub const ORG_ENROLL_OFFLINE: &str = "/v1/orgs/{org_id}/enroll-offline";
/// Operator: sign a bundle for air-gapped nodes (POST).
pub const ORG_BUNDLES: &str = "/v1/orgs/{org_id}/bundles";
/// Operator: import a node's signed results bundle; answers with its acknowledgement (POST).
pub const BUNDLE_RESULTS: &str = "/v1/bundles/results";
/// Operator: list relay events (`?org_id=&node_id=&after_seq=&cursor=&newest=&limit=&wait_secs=`).
pub const EVENTS: &str = "/v1/events";
/// Operator: create (POST) or list (GET) triggers.
pub const TRIGGERS: &str = "/v1/triggers";
/// Operator: one trigger (GET) or remove it (DELETE).
pub const TRIGGER: &str = "/v1/triggers/{trigger_id}";
/// Operator: submit (POST) or list (GET) jobs.
pub const JOBS: &str = "/v1/jobs";
/// Operator: one job with its result.
pub const JOB: &str = "/v1/jobs/{job_id}";
/// Operator: cancel a job (POST).
pub const JOB_CANCEL: &str = "/v1/jobs/{job_id}/cancel";
/// Operator: a job's output, live from its node or the result's tails (GET).
pub const JOB_LOGS: &str = "/v1/jobs/{job_id}/logs";
/// Node (mTLS): a piece of a job's log stream the control plane asked for.
pub const NODE_LOGS: &str = "/v1/node/logs";
/// Operator: submit a job to each node a selector matches (POST).
pub const JOB_GROUPS: &str = "/v1/job-groups";
/// Operator: one job group with its jobs.
pub const JOB_GROUP: &str = "/v1/job-groups/{group_id}";
/// Operator: list nodes.
pub const NODES: &str = "/v1/nodes";
/// Operator: one node.
pub const NODE: &str = "/v1/nodes/{node_id}";
/// Operator: set or remove a node's operator labels (POST).
pub const NODE_LABELS: &str = "/v1/nodes/{node_id}/labels";
/// Node: the next entries of the node's audit log (POST), stored per node where they continue
/// the stored chain.
pub const NODE_AUDIT_UPLINK: &str = "/v1/node/audit";
/// Node: renew the node's client certificate (POST, mutual TLS with the current one).
pub const NODE_CERTIFICATE: &str = "/v1/node/certificate";
/// Node: what the node should trust now (GET): CAs and the org's signing keys.
pub const NODE_TRUST: &str = "/v1/node/trust";
/// Admin: start a CA rotation (POST).
pub const CA_ROTATE: &str = "/v1/ca/rotate";
/// Admin: start a rotation of an organisation's job-signing key (POST).
pub const ORG_KEY_ROTATE: &str = "/v1/orgs/{org_id}/signing-key/rotate";
/// Operator: revoke a node (POST): its certificate is refused from then on.
pub const NODE_REVOKE: &str = "/v1/nodes/{node_id}/revoke";
/// Operator: a node's own audit log as its results bundles brought it (`?after=SEQ&limit=N`).
pub const NODE_AUDIT: &str = "/v1/nodes/{node_id}/audit";
/// Operator: the audit trail.
pub const AUDIT: &str = "/v1/audit";
/// Anyone: liveness.
pub const HEALTH: &str = "/v1/health";
/// Anyone: the OpenAPI document of this API.
pub const OPENAPI: &str = "/v1/openapi.json";

/// Substitute one `{name}` parameter of a route template.
pub fn fill(template: &str, name: &str, value: &str) -> String {
    template.replace(&format!("{{{name}}}"), value)
}
