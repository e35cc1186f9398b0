-- Outpost control plane, schema version 1: every record of the StateStore port.
-- Identifiers are text in the "C" collation: ordered by their bytes, as the embedded store
-- orders them, whatever the database's locale (pages and cursors depend on it).
-- Each table keeps the record as JSON (`doc`, what the sled store keeps as its value; type json,
-- not jsonb, which refuses the NUL character a job's output may hold) beside
-- the columns the queries select, order and constrain by. The invariants the control plane
-- relies on across replicas are constraints here, not process-local locks.

CREATE TABLE outpost_counters (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
-- The audit trail's sequence and the events' global cursor: taken by UPDATE ... RETURNING in
-- the transaction that stores the row, so they have no gaps and commit in order.
INSERT INTO outpost_counters (name, value) VALUES ('audit', 0), ('event_cursor', 0);

-- A value sealed with the replicas' store key (DATA_DIR/store.key): a replica whose key cannot
-- open it refuses to start instead of writing secrets another replica cannot read.
CREATE TABLE outpost_keys (
    name  text PRIMARY KEY,
    check_value text NOT NULL
);

-- The organisations' signing secrets are sealed (AES-256-GCM, the org id bound in) with the
-- store key inside `doc`: the database and its backups alone cannot sign a job.
CREATE TABLE orgs (
    org_id text COLLATE "C" PRIMARY KEY,
    doc    json NOT NULL
);

CREATE TABLE enrollment_tokens (
    token_sha256 text PRIMARY KEY,
    doc          json NOT NULL
);

CREATE TABLE nodes (
    node_id           text COLLATE "C" PRIMARY KEY,
    org_id            text COLLATE "C" NOT NULL,
    last_seen_unix_ms bigint,
    doc               json NOT NULL
);
CREATE INDEX nodes_by_org ON nodes (org_id, node_id);

-- The last job sequence number handed out per node.
CREATE TABLE job_seqs (
    node_id  text PRIMARY KEY,
    last_seq bigint NOT NULL CHECK (last_seq > 0)
);

CREATE TABLE jobs (
    job_id            text COLLATE "C" PRIMARY KEY,
    org_id            text COLLATE "C" NOT NULL,
    node_id           text COLLATE "C" NOT NULL,
    seq               bigint NOT NULL,
    state             text NOT NULL,
    submitted_unix_ms bigint NOT NULL,
    group_id          text COLLATE "C",
    failed            boolean NOT NULL,
    open_any          boolean NOT NULL,
    doc               json NOT NULL
);
CREATE INDEX jobs_newest ON jobs (submitted_unix_ms DESC, job_id DESC);
CREATE INDEX jobs_queued ON jobs (node_id, seq) WHERE state = 'queued';
CREATE INDEX jobs_by_state ON jobs (org_id, state);
CREATE INDEX jobs_by_group ON jobs (group_id) WHERE group_id IS NOT NULL;
CREATE INDEX jobs_open_any ON jobs (job_id) WHERE open_any;

-- One row per idempotency key: a result report is stored once, whichever replica took it.
CREATE TABLE results (
    idempotency_key text PRIMARY KEY,
    job_id          text NOT NULL,
    doc             json NOT NULL
);

CREATE TABLE cancels (
    node_id text COLLATE "C" NOT NULL,
    job_id  text COLLATE "C" NOT NULL,
    attempt bigint NOT NULL,
    doc     json NOT NULL,
    PRIMARY KEY (node_id, job_id, attempt)
);

CREATE TABLE deployments (
    org_id text COLLATE "C" NOT NULL,
    name   text COLLATE "C" NOT NULL,
    doc    json NOT NULL,
    PRIMARY KEY (org_id, name)
);

CREATE TABLE node_services (
    node_id text COLLATE "C" NOT NULL,
    service text COLLATE "C" NOT NULL,
    doc     json NOT NULL,
    PRIMARY KEY (node_id, service)
);

CREATE TABLE service_report_last (
    node_id  text PRIMARY KEY,
    last_seq bigint NOT NULL
);

CREATE TABLE node_audit (
    node_id text COLLATE "C" NOT NULL,
    seq     bigint NOT NULL,
    doc     json NOT NULL,
    PRIMARY KEY (node_id, seq)
);

CREATE TABLE events (
    cursor  bigint PRIMARY KEY,
    node_id text COLLATE "C" NOT NULL,
    seq     bigint NOT NULL,
    org_id  text COLLATE "C" NOT NULL,
    doc     json NOT NULL,
    UNIQUE (node_id, seq)
);

CREATE TABLE triggers (
    trigger_id        text COLLATE "C" PRIMARY KEY,
    org_id            text COLLATE "C" NOT NULL,
    name              text NOT NULL,
    created_unix_ms   bigint NOT NULL,
    doc               json NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE audit (
    seq    bigint PRIMARY KEY,
    org_id text,
    doc    json NOT NULL
);
CREATE INDEX audit_by_org ON audit (org_id, seq);

CREATE TABLE api_tokens (
    id      text PRIMARY KEY,
    org_id  text NOT NULL,
    name    text NOT NULL,
    revoked boolean NOT NULL,
    doc     json NOT NULL
);
-- A name is taken while a token of that name in the organisation is not revoked.
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (org_id, name) WHERE NOT revoked;
