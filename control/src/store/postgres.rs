//! The PostgreSQL adapter of the `StateStore` port, for several stateless control-plane
//! replicas over one database (docs/scaling.md).
//!
//! Each record is kept as JSON beside the columns its queries select, order and constrain by
//! (the schema is `control/migrations/`). Every operation that reads, changes and writes a
//! record does so in one transaction holding the record's row lock (`SELECT ... FOR UPDATE`),
//! so two replicas never overwrite each other's change; what must hold across replicas is a
//! constraint or a lock of the database, never of the process:
//! - a job sequence number is handed out once per node (`job_seqs`, one row per node, taken
//!   with `UPDATE ... RETURNING`), and whatever uses one ([`StateStore::submit_job`],
//!   [`StateStore::reassign_job_to`], [`StateStore::offer_service`]) holds that row from taking
//!   the number until what it numbers is stored, so a node sees its jobs and services in
//!   sequence order whichever replica made them;
//! - a result report is stored once per idempotency key (`results` primary key), in the
//!   transaction that finishes its job;
//! - an event is stored once per node and seq (`events` unique key), and the audit trail's
//!   sequence and the global event cursor are counters taken in the transaction that stores the
//!   row (no gaps, commit order);
//! - an enrollment token is spent once: the token's row is locked while the node is stored.
//!
//! Replicas learn of work for a node they hold a poll of through `NOTIFY` (see [`listen`]).

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use outpost_protocol::{
    ApiTokenInfo, AuditEntry, CancelAttempt, Heartbeat, JobInfo, JobState, Labels, NodeInfo, ObjectEvent,
    Org, ResultReport, StoredEvent, Trigger,
};
use serde::de::DeserializeOwned;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{GenericClient, NoTls, Row};

use super::{
    ApiTokenRecord, CANCELLED_BY_OPERATOR, CancelOutcome, EventFilter, EventOrder, EventTally, EventsOutcome,
    JobFilter, JobRecord, OrgRecord, ResultFate, ResultOutcome, StateStore, StoreError, StoreFuture,
    TokenRecord, TokenRefusal, accept_job, apply_cancel, cancel_of, change_labels, check_token, finish_job,
    is_open_any, result_fate, sort_api_tokens, sort_triggers, stored_event, take_window,
};

/// The schema this binary reads and writes: the highest migration it carries.
pub const SCHEMA_VERSION: i32 = 2;

/// Every migration, in order: version and SQL. A migration never changes once released.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_initial.sql")),
    (2, include_str!("../../migrations/0002_node_labels.sql")),
];

/// The advisory lock `migrate` holds, so that two replicas started at once do not both apply.
const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7401;

/// The channel a replica announces work for a node on (the payload is the node id).
pub const NODE_CHANNEL: &str = "outpost_node";
/// The channel a replica announces stored events on.
pub const EVENTS_CHANNEL: &str = "outpost_events";

/// Most connections one replica holds to the database.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// The fewest that work: the rollout pass holds one for its lock and needs another to read.
pub const MIN_POOL_SIZE: usize = 4;
/// How long a store-wide lock is waited for before the wait fails (see `exclusive`).
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// How long a request waits for a connection, or for one to be made, before it fails (503).
const POOL_WAIT: Duration = Duration::from_secs(5);

/// How to reach the database.
#[derive(Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// `postgres://USER@HOST:PORT/DB` or the key=value form (`host=/run/postgresql dbname=…`);
    /// a host starting with `/` is a unix socket directory.
    pub url: String,
    /// The password, when not in the URL (from a file or the environment).
    pub password: Option<String>,
    pub pool_size: usize,
    /// The CA certificates (PEM) the database server's certificate must chain to: with them
    /// every connection is TLS 1.3, the server's name checked (`sslmode=require` in the url
    /// refuses a server without TLS). Without them: no TLS (a unix socket or a private network).
    pub ca_pem: Option<String>,
    /// The key that seals the organisations' signing secrets (`DATA_DIR/store.key`); the same
    /// on every replica. Serving needs it; `migrate` does not.
    pub secret_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL (it may carry a password) nor the password.
        f.debug_struct("PgOptions").field("pool_size", &self.pool_size).finish_non_exhaustive()
    }
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), password: None, pool_size: DEFAULT_POOL_SIZE, ca_pem: None, secret_key: None }
    }

    /// Whether the url parses and the CA certificates load (the error says why); connects to
    /// nothing.
    pub fn check(&self) -> Result<(), StoreError> {
        self.config()?;
        self.tls().map(drop)
    }

    /// The TLS connector, when CA certificates are given.
    fn tls(&self) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
        let Some(ca) = &self.ca_pem else { return Ok(None) };
        let config = crate::tls::client_config(ca, None)
            .map_err(|e| StoreError::Backend(format!("the store's ca_file: {e}")))?;
        Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
    }

    /// A connection of its own (the notification listener), with its driver.
    pub(super) async fn connect_one(&self) -> Result<(tokio_postgres::Client, Driver), StoreError> {
        let config = self.config()?;
        Ok(match self.tls()? {
            Some(tls) => {
                let (client, conn) = config.connect(tls).await.map_err(backend)?;
                (client, Driver::Tls(Box::new(conn)))
            }
            None => {
                let (client, conn) = config.connect(NoTls).await.map_err(backend)?;
                (client, Driver::Plain(Box::new(conn)))
            }
        })
    }

    fn config(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config = tokio_postgres::Config::from_str(&self.url).map_err(|e| {
            StoreError::Backend(format!("the store url is not a PostgreSQL connection string: {e}"))
        })?;
        if let Some(password) = &self.password {
            config.password(password.trim_end_matches(['\n', '\r']));
        }
        if config.get_application_name().is_none() {
            config.application_name("outpost-control");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(POOL_WAIT);
        }
        // A database that vanished without closing the connection (a cut network, a failed
        // over host) is noticed within about a minute, not the kernel's two hours.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        config.keepalives_interval(Duration::from_secs(10));
        config.keepalives_retries(3);
        config.tcp_user_timeout(Duration::from_secs(60));
        Ok(config)
    }

    /// `user@host:port/db`, for logs and errors: never a password.
    pub fn describe(&self) -> String {
        let Ok(config) = tokio_postgres::Config::from_str(&self.url) else {
            return "an unparsable PostgreSQL url".to_owned();
        };
        let host = config
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".to_owned());
        let port = config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{host}:{port}/{}",
            config.get_user().unwrap_or("(user)"),
            config.get_dbname().unwrap_or("(database)")
        )
    }
}

/// The state store in a PostgreSQL database. Cheap to clone (a pool of connections).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    options: PgOptions,
    /// Seals and opens the organisations' signing secrets.
    sealer: Option<Sealer>,
}

/// What [`PgStore::migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub from: i32,
    pub to: i32,
}

/// The server's message, or the client's (neither holds the password).
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("PostgreSQL: {} ({})", db.message(), db.code().code()),
        None => format!("PostgreSQL: {e}"),
    }
}

/// A server's refusal is the store's answer; a lost or refused connection, and a server that
/// cannot take one now (starting, shutting down, failing over, out of connections), is
/// `Unreachable`: worth waiting for.
fn backend(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else { return StoreError::Unreachable(pg_message(&e)) };
    let code = db.code();
    let passing = code.code().starts_with("08")
        || [
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::TOO_MANY_CONNECTIONS,
        ]
        .contains(code);
    if passing { StoreError::Unreachable(pg_message(&e)) } else { StoreError::Backend(pg_message(&e)) }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => backend(e),
        deadpool_postgres::PoolError::Timeout(_) => {
            StoreError::Unreachable("PostgreSQL: no connection to the database within 5 s".into())
        }
        other => StoreError::Unreachable(format!("PostgreSQL: {other}")),
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// A u64 as PostgreSQL's bigint (every value the control plane stores is far below 2^63).
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A sequence number a node sent, as bigint; beyond 2^63 - 1 it is refused, never clamped
/// (two clamped numbers would count as one).
fn node_seq(what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v)
        .map_err(|_| StoreError::Backend(format!("{what} {v} is beyond what the store keeps (2^63 - 1)")))
}

fn unbig(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Accepted => "accepted",
        JobState::Finished => "finished",
        JobState::Cancelled => "cancelled",
    }
}

fn doc<T: DeserializeOwned>(row: &Row, idx: usize, what: &str) -> Result<T, StoreError> {
    row.try_get::<_, Json<T>>(idx)
        .map(|j| j.0)
        .map_err(|e| StoreError::Corrupt { key: what.to_owned(), reason: e.to_string() })
}

fn docs<T: DeserializeOwned>(rows: &[Row], what: &str) -> Result<Vec<T>, StoreError> {
    rows.iter().map(|r| doc(r, 0, what)).collect()
}

async fn one<C: GenericClient, T: DeserializeOwned>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    what: &str,
) -> Result<Option<T>, StoreError> {
    let row = c.query_opt(sql, params).await.map_err(backend)?;
    row.map(|r| doc(&r, 0, what)).transpose()
}

async fn all<C: GenericClient, T: DeserializeOwned>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    what: &str,
) -> Result<Vec<T>, StoreError> {
    let rows = c.query(sql, params).await.map_err(backend)?;
    docs(&rows, what)
}

/// Writes a job's row: every column from the record.
async fn put_job<C: GenericClient>(c: &C, job: &JobRecord) -> Result<(), StoreError> {
    write_job(
        c,
        job,
        "ON CONFLICT (job_id) DO UPDATE SET org_id = $2, node_id = $3, seq = $4, state = $5,
             submitted_unix_ms = $6, group_id = $7, failed = $8, open_any = $9, doc = $10",
    )
    .await
    .map(drop)
}

/// Inserts a new job; false when its id is taken.
async fn insert_new_job<C: GenericClient>(c: &C, job: &JobRecord) -> Result<bool, StoreError> {
    Ok(write_job(c, job, "ON CONFLICT (job_id) DO NOTHING").await? == 1)
}

/// A job's row, every column from the record, with `on_conflict` deciding what a taken id
/// does; the rows written.
async fn write_job<C: GenericClient>(c: &C, job: &JobRecord, on_conflict: &str) -> Result<u64, StoreError> {
    let i = &job.info;
    let sql = format!(
        "INSERT INTO jobs (job_id, org_id, node_id, seq, state, submitted_unix_ms, group_id, failed, open_any, doc)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) {on_conflict}"
    );
    c.execute(
        sql.as_str(),
        &[
            &i.job_id,
            &i.org_id,
            &i.node_id,
            &big(i.seq),
            &state_name(i.state),
            &big(i.submitted_unix_ms),
            &i.group_id,
            &super::job_failed(i),
            &is_open_any(i),
            &Json(job),
        ],
    )
    .await
    .map_err(backend)
}

async fn put_cancel<C: GenericClient>(c: &C, node_id: &str, stop: &CancelAttempt) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO cancels (node_id, job_id, attempt, doc) VALUES ($1, $2, $3, $4)
         ON CONFLICT (node_id, job_id, attempt) DO UPDATE SET doc = $4",
        &[&node_id, &stop.job_id, &i64::from(stop.attempt), &Json(stop)],
    )
    .await
    .map_err(backend)?;
    Ok(())
}

async fn put_node<C: GenericClient>(c: &C, node: &NodeInfo) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO nodes (node_id, org_id, last_seen_unix_ms, doc, labels) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (node_id) DO UPDATE SET org_id = $2, last_seen_unix_ms = $3, doc = $4, labels = $5",
        &[&node.node_id, &node.org_id, &node.last_seen_unix_ms.map(big), &Json(node), &label_index(node)],
    )
    .await
    .map_err(backend)?;
    Ok(())
}

/// The `labels` column of a node's row: `key=value` per effective label; `None` (not indexed:
/// read by every filtered listing) when one holds NUL, which text cannot.
fn label_index(node: &NodeInfo) -> Option<Vec<String>> {
    let labels = node.effective_labels();
    if labels.iter().any(|(k, v)| k.contains('\0') || v.contains('\0')) {
        return None;
    }
    Some(labels.iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// What a service record's `pending_seq` column holds: the unacknowledged change's number, or 0.
fn pending_seq(rec: &super::NodeServiceRecord) -> i64 {
    rec.desired.as_ref().filter(|_| rec.unacknowledged()).map_or(0, |d| big(d.seq))
}

async fn put_node_service<C: GenericClient>(c: &C, rec: &super::NodeServiceRecord) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO node_services (node_id, service, doc, pending_seq) VALUES ($1, $2, $3, $4)
         ON CONFLICT (node_id, service) DO UPDATE SET doc = $3, pending_seq = $4",
        &[&rec.node_id, &rec.service, &Json(rec), &pending_seq(rec)],
    )
    .await
    .map_err(backend)?;
    Ok(())
}

/// One service record of a node under its row lock; `None` when there is none yet.
async fn locked_service<C: GenericClient>(
    c: &C,
    node_id: &str,
    service: &str,
) -> Result<Option<super::NodeServiceRecord>, StoreError> {
    one(
        c,
        "SELECT doc FROM node_services WHERE node_id = $1 AND service = $2 FOR UPDATE",
        &[&node_id, &service],
        "node service",
    )
    .await
}

/// Sets a service's desired state on a node (creating its record), keeping what the node
/// acknowledged and reported; the row stays locked until the transaction ends.
async fn desire_service<C: GenericClient>(
    c: &C,
    node_id: &str,
    service: &str,
    desired: super::DesiredService,
) -> Result<(), StoreError> {
    let found = locked_service(c, node_id, service).await?;
    let mut rec = found.unwrap_or_else(|| super::NodeServiceRecord::new(node_id, service));
    rec.desired = Some(desired);
    put_node_service(c, &rec).await
}

/// An org's record as stored (secrets sealed) under its row lock; `NotFound` without one.
async fn locked_org<C: GenericClient>(c: &C, org_id: &str) -> Result<OrgRecord, StoreError> {
    one(c, "SELECT doc FROM orgs WHERE org_id = $1 FOR UPDATE", &[&org_id], "org")
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("org {org_id}")))
}

/// Serialises the transactions of one node's append-only logs (audit, events, service
/// reports) across replicas; released at commit.
async fn lock_node_log<C: GenericClient>(c: &C, log: &str, node_id: &str) -> Result<(), StoreError> {
    c.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&format!("{log}|{node_id}")])
        .await
        .map_err(backend)?;
    Ok(())
}

/// The node's next job sequence number; its `job_seqs` row stays locked until the transaction
/// ends (a rolled-back transaction hands the number back).
async fn take_seq<C: GenericClient>(c: &C, node_id: &str) -> Result<u64, StoreError> {
    let row = c
        .query_one(
            "INSERT INTO job_seqs (node_id, last_seq) VALUES ($1, 1)
             ON CONFLICT (node_id) DO UPDATE SET last_seq = job_seqs.last_seq + 1
             RETURNING last_seq",
            &[&node_id],
        )
        .await
        .map_err(backend)?;
    Ok(unbig(row.get(0)))
}

async fn next_counter<C: GenericClient>(c: &C, name: &str) -> Result<u64, StoreError> {
    let row = c
        .query_one("UPDATE outpost_counters SET value = value + 1 WHERE name = $1 RETURNING value", &[&name])
        .await
        .map_err(backend)?;
    Ok(unbig(row.get(0)))
}

async fn notify<C: GenericClient>(c: &C, channel: &str, payload: &str) -> Result<(), StoreError> {
    c.execute("SELECT pg_notify($1, $2)", &[&channel, &payload]).await.map_err(backend)?;
    Ok(())
}

impl PgStore {
    /// Connects to a database that `outpost-control migrate` has brought to this binary's
    /// schema; refuses one without the schema, behind it, or newer than this binary.
    pub async fn connect(options: PgOptions) -> Result<Self, StoreError> {
        let store = Self::pool(options)?;
        let version = store.schema_version().await?;
        match version {
            None => Err(StoreError::Backend(format!(
                "the database {} holds no Outpost schema; run `outpost-control migrate` first",
                store.options.describe()
            ))),
            Some(v) if v > SCHEMA_VERSION => Err(newer_schema(v)),
            Some(v) if v < SCHEMA_VERSION => Err(StoreError::Backend(format!(
                "the database {} has schema version {v}, this binary needs {SCHEMA_VERSION}; \
                 run `outpost-control migrate` (with this binary) first",
                store.options.describe()
            ))),
            Some(_) => {
                store.check_key().await?;
                Ok(store)
            }
        }
    }

    /// Refuses a store key other than the one the database's secrets are sealed with (the
    /// first replica to connect records which).
    async fn check_key(&self) -> Result<(), StoreError> {
        let sealer = self.sealer()?;
        let client = self.client().await?;
        let sealed = sealer.seal(KEY_CHECK, KEY_CHECK)?;
        client
            .execute(
                "INSERT INTO outpost_keys (name, check_value) VALUES ('org-secrets', $1) ON CONFLICT (name) DO NOTHING",
                &[&sealed],
            )
            .await
            .map_err(backend)?;
        let row = client
            .query_one("SELECT check_value FROM outpost_keys WHERE name = 'org-secrets'", &[])
            .await
            .map_err(backend)?;
        match sealer.open(KEY_CHECK, &row.get::<_, String>(0)) {
            Ok(text) if text == KEY_CHECK => Ok(()),
            _ => Err(StoreError::Backend(format!(
                "this replica's store key (DATA_DIR/store.key) is not the one the secrets in {} are sealed with: \
                 copy store.key from the data directory of the replica that first served it",
                self.options.describe()
            ))),
        }
    }

    fn sealer(&self) -> Result<&Sealer, StoreError> {
        self.sealer.as_ref().ok_or_else(|| {
            StoreError::Backend("no store key to seal the organisations' signing secrets with".into())
        })
    }

    /// An org record as stored: its secrets sealed.
    fn seal_org(&self, org: &OrgRecord) -> Result<OrgRecord, StoreError> {
        let sealer = self.sealer()?;
        let mut sealed = org.clone();
        sealed.signing_secret_hex = sealer.seal(&org.org.id, &org.signing_secret_hex)?;
        if let Some(next) = sealed.keys.next.as_mut() {
            next.secret_hex = sealer.seal(&org.org.id, &next.secret_hex)?;
        }
        Ok(sealed)
    }

    /// An org record as read: its secrets opened.
    fn open_org(&self, mut org: OrgRecord) -> Result<OrgRecord, StoreError> {
        let sealer = self.sealer()?;
        let id = org.org.id.clone();
        let open = |text: &str| {
            sealer
                .open(&id, text)
                .map_err(|why| StoreError::Corrupt { key: format!("org {id}"), reason: why })
        };
        org.signing_secret_hex = open(&org.signing_secret_hex)?;
        if let Some(next) = org.keys.next.as_mut() {
            next.secret_hex = open(&next.secret_hex)?;
        }
        Ok(org)
    }

    fn pool(options: PgOptions) -> Result<Self, StoreError> {
        let config = options.config()?;
        let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match options.tls()? {
            Some(tls) => Manager::from_config(config, tls, recycling),
            None => Manager::from_config(config, NoTls, recycling),
        };
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(MIN_POOL_SIZE))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .recycle_timeout(Some(POOL_WAIT))
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot set up the PostgreSQL pool: {e}")))?;
        let sealer = options.secret_key.map(Sealer::new).transpose()?;
        Ok(Self { pool, options, sealer })
    }

    /// Applies the migrations the database lacks, each in its own transaction, under an
    /// advisory lock (two replicas started at once apply them once). Refuses a database whose
    /// schema is newer than this binary.
    pub async fn migrate(options: PgOptions) -> Result<Migrated, StoreError> {
        let store = Self::pool(options)?;
        let mut client = store.client().await?;
        client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(backend)?;
        let outcome = Self::migrate_locked(&mut client).await;
        let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
        let outcome = outcome?;
        unlocked.map_err(backend)?;
        Ok(outcome)
    }

    async fn migrate_locked(client: &mut Object) -> Result<Migrated, StoreError> {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS outpost_schema (
                     version         integer PRIMARY KEY,
                     applied_unix_ms bigint NOT NULL,
                     applied_by      text NOT NULL
                 )",
            )
            .await
            .map_err(backend)?;
        let from: i32 = client
            .query_one("SELECT coalesce(max(version), 0) FROM outpost_schema", &[])
            .await
            .map_err(backend)?
            .get(0);
        if from > SCHEMA_VERSION {
            return Err(newer_schema(from));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > from) {
            let tx = client.transaction().await.map_err(backend)?;
            tx.batch_execute(sql).await.map_err(|e| {
                StoreError::Backend(format!("migration {version} failed: {}", pg_message(&e)))
            })?;
            let now = big(crate::clock::Clock::system().now_ms());
            let by = format!("outpost-control {}", env!("CARGO_PKG_VERSION"));
            tx.execute(
                "INSERT INTO outpost_schema (version, applied_unix_ms, applied_by) VALUES ($1, $2, $3)",
                &[version, &now, &by],
            )
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            tracing::info!(version, "store schema migrated");
        }
        Ok(Migrated { from, to: SCHEMA_VERSION.max(from) })
    }

    /// The schema version the database is at; `None` when it holds no Outpost schema.
    pub async fn schema_version(&self) -> Result<Option<i32>, StoreError> {
        let client = self.client().await?;
        match client.query_one("SELECT max(version) FROM outpost_schema", &[]).await {
            Ok(row) => Ok(row.get(0)),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(None),
            Err(e) => Err(backend(e)),
        }
    }

    /// `user@host:port/db` of this store (never the password).
    pub fn describe(&self) -> String {
        self.options.describe()
    }

    /// How this store reaches its database.
    pub fn options(&self) -> &PgOptions {
        &self.options
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }
}

fn newer_schema(v: i32) -> StoreError {
    StoreError::Backend(format!(
        "the database has schema version {v}, newer than this binary's {SCHEMA_VERSION}: \
         a newer outpost-control migrated it; run that version (downgrading the schema is not supported)"
    ))
}

impl PgStore {
    /// Changes one node's record under its row lock; the record as stored afterwards.
    fn modify_node(
        &self,
        node_id: &str,
        change: impl FnOnce(&mut NodeInfo) + Send + 'static,
    ) -> StoreFuture<'_, NodeInfo> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let mut node: NodeInfo =
                one(&*tx, "SELECT doc FROM nodes WHERE node_id = $1 FOR UPDATE", &[&node_id], "node")
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("node {node_id}")))?;
            change(&mut node);
            put_node(&*tx, &node).await?;
            tx.commit().await.map_err(backend)?;
            Ok(node)
        })
    }

    /// Reads, changes and writes one job under its row lock; `None` without such a job.
    async fn locked_job<C: GenericClient>(c: &C, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        one(c, "SELECT doc FROM jobs WHERE job_id = $1 FOR UPDATE", &[&job_id], "job").await
    }
}

impl StateStore for PgStore {
    fn insert_org(&self, org: OrgRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            let sealed = self.seal_org(&org)?;
            let n = c
                .execute(
                    "INSERT INTO orgs (org_id, doc) VALUES ($1, $2) ON CONFLICT (org_id) DO NOTHING",
                    &[&org.org.id, &Json(&sealed)],
                )
                .await
                .map_err(backend)?;
            if n == 0 {
                return Err(StoreError::AlreadyExists(format!("org {}", org.org.id)));
            }
            Ok(())
        })
    }

    fn get_org(&self, org_id: &str) -> StoreFuture<'_, Option<OrgRecord>> {
        let org_id = org_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            let found: Option<OrgRecord> =
                one(&**c, "SELECT doc FROM orgs WHERE org_id = $1", &[&org_id], "org").await?;
            found.map(|o| self.open_org(o)).transpose()
        })
    }

    fn list_orgs(&self) -> StoreFuture<'_, Vec<Org>> {
        Box::pin(async move {
            let c = self.client().await?;
            let orgs: Vec<OrgRecord> = all(&**c, "SELECT doc FROM orgs ORDER BY org_id", &[], "org").await?;
            Ok(orgs.into_iter().map(|r| r.org).collect())
        })
    }

    fn put_org_settings(
        &self,
        org_id: &str,
        settings: outpost_protocol::OrgSettings,
    ) -> StoreFuture<'_, bool> {
        let org_id = org_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            // The secrets stay sealed as they are: only the settings change.
            let mut rec = locked_org(&*tx, &org_id).await?;
            if rec.settings.revision + 1 != settings.revision {
                return Ok(false);
            }
            rec.settings = settings;
            tx.execute("UPDATE orgs SET doc = $2 WHERE org_id = $1", &[&org_id, &Json(&rec)])
                .await
                .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            Ok(true)
        })
    }

    fn swap_org_keys(&self, before: &OrgRecord, after: &OrgRecord) -> StoreFuture<'_, bool> {
        let (before, after) = (before.clone(), after.clone());
        Box::pin(async move {
            let org_id = after.org.id.clone();
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let mut rec = self.open_org(locked_org(&*tx, &org_id).await?)?;
            if !super::same_keys(&rec, &before) {
                return Ok(false);
            }
            super::copy_keys(&mut rec, &after);
            let sealed = self.seal_org(&rec)?;
            tx.execute("UPDATE orgs SET doc = $2 WHERE org_id = $1", &[&org_id, &Json(&sealed)])
                .await
                .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            Ok(true)
        })
    }

    fn insert_token(&self, token: TokenRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO enrollment_tokens (token_sha256, doc) VALUES ($1, $2)
                 ON CONFLICT (token_sha256) DO UPDATE SET doc = $2",
                &[&token.token_sha256, &Json(&token)],
            )
            .await
            .map_err(backend)?;
            Ok(())
        })
    }

    fn get_token(&self, token_sha256: &str) -> StoreFuture<'_, Option<TokenRecord>> {
        let key = token_sha256.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            one(&**c, "SELECT doc FROM enrollment_tokens WHERE token_sha256 = $1", &[&key], "token").await
        })
    }

    fn enroll_node(
        &self,
        token_sha256: &str,
        now_ms: u64,
        node: NodeInfo,
    ) -> StoreFuture<'_, Result<(), TokenRefusal>> {
        let key = token_sha256.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            // The token's row stays locked until the node is stored: a second replica spending
            // the same token waits, then finds it used.
            let token: Option<TokenRecord> = one(
                &*tx,
                "SELECT doc FROM enrollment_tokens WHERE token_sha256 = $1 FOR UPDATE",
                &[&key],
                "token",
            )
            .await?;
            if let Err(refusal) = check_token(token.as_ref(), &node.org_id, now_ms) {
                return Ok(Err(refusal));
            }
            if let Some(mut token) = token {
                token.used_unix_ms = Some(now_ms);
                token.used_by_node = Some(node.node_id.clone());
                tx.execute(
                    "UPDATE enrollment_tokens SET doc = $2 WHERE token_sha256 = $1",
                    &[&key, &Json(&token)],
                )
                .await
                .map_err(backend)?;
            }
            put_node(&*tx, &node).await?;
            tx.commit().await.map_err(backend)?;
            Ok(Ok(()))
        })
    }

    fn get_node(&self, node_id: &str) -> StoreFuture<'_, Option<NodeInfo>> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            one(&**c, "SELECT doc FROM nodes WHERE node_id = $1", &[&node_id], "node").await
        })
    }

    fn list_nodes(&self) -> StoreFuture<'_, Vec<NodeInfo>> {
        Box::pin(async move {
            let c = self.client().await?;
            all(&**c, "SELECT doc FROM nodes ORDER BY node_id", &[], "node").await
        })
    }

    fn page_nodes(
        &self,
        org_id: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> StoreFuture<'_, Vec<NodeInfo>> {
        let org_id = org_id.map(str::to_owned);
        Box::pin(async move {
            let c = self.client().await?;
            all(
                &**c,
                "SELECT doc FROM nodes WHERE ($1::text IS NULL OR org_id = $1)
                 ORDER BY node_id OFFSET $2 LIMIT $3",
                &[&org_id, &big(offset as u64), &big(limit as u64)],
                "node",
            )
            .await
        })
    }

    fn find_nodes(
        &self,
        org_id: Option<&str>,
        after: Option<&str>,
        label: Option<(String, String)>,
        keep: super::NodeFilter,
        limit: usize,
    ) -> StoreFuture<'_, Vec<NodeInfo>> {
        const BATCH: i64 = 512;
        let org_id = org_id.map(str::to_owned);
        let mut after = after.map(str::to_owned);
        // The `labels` column (migration 2; written with every node record) holds `key=value` per effective label,
        // NULL for a node whose labels it cannot hold (those are always read). Text cannot hold
        // NUL either: a label with one is looked for by a scan.
        let label = label
            .filter(|(k, v)| !k.contains('\0') && !v.contains('\0'))
            .map(|(k, v)| vec![format!("{k}={v}")]);
        Box::pin(async move {
            let c = self.client().await?;
            let mut out = Vec::new();
            while out.len() < limit {
                let rows = match &label {
                    // Through the label index: only the nodes that carry the label.
                    Some(label) => {
                        c.query(
                            "SELECT node_id, doc::text FROM nodes
                             WHERE (labels @> $4 OR labels IS NULL) AND ($1::text IS NULL OR org_id = $1)
                             AND ($2::text IS NULL OR node_id > $2)
                             ORDER BY node_id LIMIT $3",
                            &[&org_id, &after, &BATCH, label],
                        )
                        .await
                    }
                    None => {
                        c.query(
                            "SELECT node_id, doc::text FROM nodes
                             WHERE ($1::text IS NULL OR org_id = $1) AND ($2::text IS NULL OR node_id > $2)
                             ORDER BY node_id LIMIT $3",
                            &[&org_id, &after, &BATCH],
                        )
                        .await
                    }
                }
                .map_err(backend)?;
                for row in &rows {
                    let id: String = row.get(0);
                    let text: String = row.get(1);
                    let corrupt = |e: serde_json::Error| StoreError::Corrupt {
                        key: format!("node {id}"),
                        reason: e.to_string(),
                    };
                    if super::node_record_kept(&keep, text.as_bytes()).map_err(corrupt)? {
                        out.push(serde_json::from_str(&text).map_err(corrupt)?);
                        if out.len() == limit {
                            break;
                        }
                    }
                }
                if (rows.len() as i64) < BATCH {
                    break;
                }
                after = rows.last().map(|r| r.get(0));
            }
            Ok(out)
        })
    }

    fn node_presence(&self, org_id: Option<&str>) -> StoreFuture<'_, Vec<super::NodePresence>> {
        let org_id = org_id.map(str::to_owned);
        Box::pin(async move {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT node_id, last_seen_unix_ms FROM nodes
                     WHERE ($1::text IS NULL OR org_id = $1) ORDER BY node_id",
                    &[&org_id],
                )
                .await
                .map_err(backend)?;
            Ok(rows
                .iter()
                .map(|r| super::NodePresence {
                    node_id: r.get(0),
                    last_seen_unix_ms: r.get::<_, Option<i64>>(1).map(unbig),
                })
                .collect())
        })
    }

    fn record_heartbeat(
        &self,
        node_id: &str,
        heartbeat: Heartbeat,
        seen_ms: Option<u64>,
    ) -> StoreFuture<'_, ()> {
        let changed = self.modify_node(node_id, move |node| {
            if seen_ms.is_some() {
                node.last_seen_unix_ms = seen_ms;
            }
            node.last_heartbeat = Some(heartbeat);
        });
        Box::pin(async move { changed.await.map(drop) })
    }

    fn next_job_seq(&self, node_id: &str) -> StoreFuture<'_, u64> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            take_seq(&**c, &node_id).await
        })
    }

    fn submit_job(&self, node_id: &str, make: super::MakeJob) -> StoreFuture<'_, Option<JobRecord>> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            // The node's row in job_seqs stays locked until the job is committed: another
            // replica's submit for the node waits, so the node's jobs become visible in
            // sequence order, and a failed insert hands the number back (no gap).
            let job = make(take_seq(&*tx, &node_id).await?)?;
            if !insert_new_job(&*tx, &job).await? {
                return Ok(None);
            }
            notify(&*tx, NODE_CHANNEL, &job.info.node_id).await?;
            tx.commit().await.map_err(backend)?;
            Ok(Some(job))
        })
    }

    fn insert_job(&self, job: JobRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            if !insert_new_job(&*tx, &job).await? {
                return Err(StoreError::AlreadyExists(format!("job {}", job.info.job_id)));
            }
            notify(&*tx, NODE_CHANNEL, &job.info.node_id).await?;
            tx.commit().await.map_err(backend)?;
            Ok(())
        })
    }

    fn get_job(&self, job_id: &str) -> StoreFuture<'_, Option<JobRecord>> {
        let job_id = job_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            one(&**c, "SELECT doc FROM jobs WHERE job_id = $1", &[&job_id], "job").await
        })
    }

    fn list_jobs(&self, filter: JobFilter) -> StoreFuture<'_, Vec<JobInfo>> {
        Box::pin(async move {
            let c = self.client().await?;
            let state = filter.state.map(state_name);
            let jobs: Vec<JobRecord> = all(
                &**c,
                "SELECT doc FROM jobs
                 WHERE ($1::text IS NULL OR org_id = $1) AND ($2::text IS NULL OR node_id = $2)
                   AND ($3::text IS NULL OR state = $3) AND ($4::text IS NULL OR group_id = $4)
                   AND (NOT $5 OR failed)
                 ORDER BY submitted_unix_ms DESC, job_id DESC LIMIT $6",
                &[
                    &filter.org_id,
                    &filter.node_id,
                    &state,
                    &filter.group_id,
                    &filter.failed,
                    &big(filter.limit as u64),
                ],
                "job",
            )
            .await?;
            Ok(jobs.into_iter().map(|j| j.info).filter(|i| filter.matches(i)).collect())
        })
    }

    fn job_counts(&self, org_id: Option<&str>) -> StoreFuture<'_, super::JobCounts> {
        let org_id = org_id.map(str::to_owned);
        Box::pin(async move {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT state, count(*) FROM jobs WHERE ($1::text IS NULL OR org_id = $1) GROUP BY state",
                    &[&org_id],
                )
                .await
                .map_err(backend)?;
            let mut counts = super::JobCounts::default();
            for row in rows {
                let name: String = row.get(0);
                let state = [JobState::Queued, JobState::Accepted, JobState::Finished, JobState::Cancelled]
                    .into_iter()
                    .find(|s| state_name(*s) == name)
                    .ok_or_else(|| StoreError::Corrupt {
                        key: "jobs.state".into(),
                        reason: format!("{name:?} is not a job state"),
                    })?;
                counts.add(state, unbig(row.get(1)));
            }
            Ok(counts)
        })
    }

    fn queued_jobs(&self, node_id: &str, max: usize) -> StoreFuture<'_, Vec<JobRecord>> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            all(
                &**c,
                "SELECT doc FROM jobs WHERE node_id = $1 AND state = 'queued' ORDER BY seq LIMIT $2",
                &[&node_id, &big(max as u64)],
                "job",
            )
            .await
        })
    }

    fn ack_jobs(&self, node_id: &str, job_ids: Vec<String>, now_ms: u64) -> StoreFuture<'_, ()> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let mut jobs: Vec<JobRecord> = all(
                &*tx,
                "SELECT doc FROM jobs WHERE job_id = ANY($1) ORDER BY job_id FOR UPDATE",
                &[&job_ids],
                "job",
            )
            .await?;
            for job in &mut jobs {
                if accept_job(job, &node_id, now_ms) {
                    put_job(&*tx, job).await?;
                }
            }
            tx.commit().await.map_err(backend)?;
            Ok(())
        })
    }

    fn store_result(&self, node_id: &str, report: ResultReport) -> StoreFuture<'_, ResultOutcome> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let Some(mut job) = Self::locked_job(&*tx, &report.job_id).await? else {
                return Ok(ResultOutcome::NotYours);
            };
            let fate = result_fate(&job, &node_id, &report);
            if fate == ResultFate::NotYours {
                return Ok(ResultOutcome::NotYours);
            }
            let stored = tx
                .execute(
                    "INSERT INTO results (idempotency_key, job_id, doc) VALUES ($1, $2, $3)
                     ON CONFLICT (idempotency_key) DO NOTHING",
                    &[&report.idempotency_key, &report.job_id, &Json(&report)],
                )
                .await
                .map_err(backend)?;
            if stored == 0 {
                return Ok(ResultOutcome::Duplicate);
            }
            tx.execute(
                "DELETE FROM cancels WHERE node_id = $1 AND job_id = $2 AND attempt = $3",
                &[&node_id, &report.job_id, &i64::from(report.attempt)],
            )
            .await
            .map_err(backend)?;
            finish_job(&mut job, fate, report);
            put_job(&*tx, &job).await?;
            tx.commit().await.map_err(backend)?;
            Ok(match fate {
                ResultFate::Current => ResultOutcome::Stored,
                _ => ResultOutcome::Superseded,
            })
        })
    }

    fn revoke_node(&self, node_id: &str, now_ms: u64) -> StoreFuture<'_, NodeInfo> {
        self.modify_node(node_id, move |node| {
            node.revoked_unix_ms.get_or_insert(now_ms);
        })
    }

    fn renew_node_cert(
        &self,
        node_id: &str,
        presented_sha256: &str,
        new_sha256: &str,
    ) -> StoreFuture<'_, NodeInfo> {
        let (presented, new) = (presented_sha256.to_owned(), new_sha256.to_owned());
        self.modify_node(node_id, move |node| super::renewed_cert(node, &presented, &new))
    }

    fn forget_previous_cert(&self, node_id: &str) -> StoreFuture<'_, NodeInfo> {
        self.modify_node(node_id, |node| node.previous_cert_sha256 = None)
    }

    fn update_node_labels(
        &self,
        node_id: &str,
        set: Labels,
        remove: Vec<String>,
    ) -> StoreFuture<'_, NodeInfo> {
        self.modify_node(node_id, move |node| change_labels(node, set, &remove))
    }

    fn reassign_job(&self, job_id: &str, expected_attempt: u32, next: JobRecord) -> StoreFuture<'_, bool> {
        let job_id = job_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let Some(job) = Self::locked_job(&*tx, &job_id).await? else { return Ok(false) };
            if job.info.attempt != expected_attempt || !is_open_any(&job.info) {
                return Ok(false);
            }
            let reason = format!("superseded by attempt {} on node {}", next.info.attempt, next.info.node_id);
            let stop = cancel_of(&job.info, &reason);
            put_cancel(&*tx, &job.info.node_id, &stop).await?;
            put_job(&*tx, &next).await?;
            notify(&*tx, NODE_CHANNEL, &job.info.node_id).await?;
            notify(&*tx, NODE_CHANNEL, &next.info.node_id).await?;
            tx.commit().await.map_err(backend)?;
            Ok(true)
        })
    }

    fn reassign_job_to(
        &self,
        job_id: &str,
        expected_attempt: u32,
        node_id: &str,
        make: super::MakeJob,
    ) -> StoreFuture<'_, bool> {
        let (job_id, node_id) = (job_id.to_owned(), node_id.to_owned());
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let Some(job) = Self::locked_job(&*tx, &job_id).await? else { return Ok(false) };
            if job.info.attempt != expected_attempt || !is_open_any(&job.info) {
                return Ok(false);
            }
            // The new node's number is held until the attempt is committed (see submit_job).
            let seq = take_seq(&*tx, &node_id).await?;
            let next = make(seq)?;
            let reason = format!("superseded by attempt {} on node {}", next.info.attempt, next.info.node_id);
            let stop = cancel_of(&job.info, &reason);
            put_cancel(&*tx, &job.info.node_id, &stop).await?;
            put_job(&*tx, &next).await?;
            notify(&*tx, NODE_CHANNEL, &job.info.node_id).await?;
            notify(&*tx, NODE_CHANNEL, &next.info.node_id).await?;
            tx.commit().await.map_err(backend)?;
            Ok(true)
        })
    }

    fn offer_service(&self, node_id: &str, service: &str, make: super::MakeDesired) -> StoreFuture<'_, ()> {
        let (node_id, service) = (node_id.to_owned(), service.to_owned());
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let seq = take_seq(&*tx, &node_id).await?;
            desire_service(&*tx, &node_id, &service, make(seq)?).await?;
            notify(&*tx, NODE_CHANNEL, &node_id).await?;
            tx.commit().await.map_err(backend)?;
            Ok(())
        })
    }

    fn pending_work(&self, node_ids: Vec<String>) -> StoreFuture<'_, Vec<(String, super::PendingWork)>> {
        Box::pin(async move {
            let c = self.client().await?;
            let mut found = Vec::new();
            // One statement per chunk, each part served by an index on node_id.
            for chunk in node_ids.chunks(2_000) {
                let rows = c
                    .query(
                        "SELECT node_id, NULL FROM jobs WHERE state = 'queued' AND node_id = ANY($1)
                             GROUP BY node_id
                         UNION ALL
                         SELECT node_id, 'c:' || job_id || '/' || attempt FROM cancels
                             WHERE node_id = ANY($1)
                         UNION ALL
                         SELECT node_id, 's:' || pending_seq FROM node_services
                             WHERE node_id = ANY($1) AND pending_seq > 0",
                        &[&chunk],
                    )
                    .await
                    .map_err(backend)?;
                for row in rows {
                    let node_id: String = row.try_get(0).map_err(backend)?;
                    let key: Option<String> = row.try_get(1).map_err(backend)?;
                    found.push((node_id, key.map_or(super::PendingWork::Jobs, super::PendingWork::Sent)));
                }
                // Records written before schema 2 say nothing in the column: judged whole.
                let unknown: Vec<super::NodeServiceRecord> = all(
                    &**c,
                    "SELECT doc FROM node_services WHERE node_id = ANY($1) AND pending_seq IS NULL",
                    &[&chunk],
                    "node service",
                )
                .await?;
                for r in unknown {
                    if let Some(d) = r.desired.as_ref().filter(|_| r.unacknowledged()) {
                        found.push((r.node_id.clone(), super::PendingWork::Sent(format!("s:{}", d.seq))));
                    }
                }
            }
            Ok(found)
        })
    }

    fn announce(&self, node_id: &str) -> StoreFuture<'_, ()> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let client = self.client().await?;
            notify(&**client, NODE_CHANNEL, &node_id).await
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let client = self.client().await?;
            client.execute("SELECT 1", &[]).await.map_err(backend)?;
            Ok(())
        })
    }

    fn exclusive(&self, name: &'static str) -> StoreFuture<'_, Option<super::ExclusiveGuard>> {
        Box::pin(async move {
            // The guard exists before the transaction begins: whatever happens from here (an
            // error, the caller giving up while the lock is awaited), its drop ends it.
            let mut held = Held { client: Some(self.client().await?), locked: false };
            let Some(client) = held.client.as_ref() else {
                return Err(StoreError::Backend("the lock's connection is gone".into()));
            };
            // A transaction-scoped advisory lock: released by the ROLLBACK the guard sends when
            // dropped, or by the server when the connection is lost. Waiting for it ends after
            // LOCK_WAIT (another replica's pass runs long): the caller tries again later.
            client
                .batch_execute(&format!(
                    "BEGIN; SET LOCAL lock_timeout = '{}ms'; SET LOCAL idle_in_transaction_session_timeout = 0; \
                     SELECT pg_advisory_xact_lock(hashtextextended('outpost.{name}', 0))",
                    LOCK_WAIT.as_millis()
                ))
                .await
                .map_err(backend)?;
            held.locked = true;
            let guard: super::ExclusiveGuard = Box::new(held);
            Ok(Some(guard))
        })
    }

    fn open_any_jobs(&self) -> StoreFuture<'_, Vec<JobRecord>> {
        Box::pin(async move {
            let c = self.client().await?;
            let jobs: Vec<JobRecord> =
                all(&**c, "SELECT doc FROM jobs WHERE open_any ORDER BY job_id", &[], "job").await?;
            Ok(jobs.into_iter().filter(|j| is_open_any(&j.info)).collect())
        })
    }

    fn cancel_job(&self, job_id: &str, now_ms: u64) -> StoreFuture<'_, CancelOutcome> {
        let job_id = job_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let Some(mut job) = Self::locked_job(&*tx, &job_id).await? else {
                return Ok(CancelOutcome::NotFound);
            };
            let (outcome, ask_node) = apply_cancel(&mut job, now_ms);
            if ask_node {
                let stop = cancel_of(&job.info, CANCELLED_BY_OPERATOR);
                put_cancel(&*tx, &job.info.node_id, &stop).await?;
                notify(&*tx, NODE_CHANNEL, &job.info.node_id).await?;
            }
            put_job(&*tx, &job).await?;
            tx.commit().await.map_err(backend)?;
            Ok(outcome)
        })
    }

    fn pending_cancels(&self, node_id: &str, max: usize) -> StoreFuture<'_, Vec<CancelAttempt>> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            all(
                &**c,
                "SELECT doc FROM cancels WHERE node_id = $1 ORDER BY job_id, attempt LIMIT $2",
                &[&node_id, &big(max as u64)],
                "cancel",
            )
            .await
        })
    }

    fn put_deployment(&self, d: super::DeploymentRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO deployments (org_id, name, doc) VALUES ($1, $2, $3)
                 ON CONFLICT (org_id, name) DO UPDATE SET doc = $3",
                &[&d.info.org_id, &d.info.name, &Json(&d)],
            )
            .await
            .map_err(backend)?;
            Ok(())
        })
    }

    fn get_deployment(&self, org_id: &str, name: &str) -> StoreFuture<'_, Option<super::DeploymentRecord>> {
        let (org_id, name) = (org_id.to_owned(), name.to_owned());
        Box::pin(async move {
            let c = self.client().await?;
            one(
                &**c,
                "SELECT doc FROM deployments WHERE org_id = $1 AND name = $2",
                &[&org_id, &name],
                "deployment",
            )
            .await
        })
    }

    fn list_deployments(&self) -> StoreFuture<'_, Vec<super::DeploymentRecord>> {
        Box::pin(async move {
            let c = self.client().await?;
            all(&**c, "SELECT doc FROM deployments ORDER BY org_id, name", &[], "deployment").await
        })
    }

    fn set_service_desired(
        &self,
        node_id: &str,
        service: &str,
        desired: super::DesiredService,
    ) -> StoreFuture<'_, ()> {
        let (node_id, service) = (node_id.to_owned(), service.to_owned());
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            desire_service(&*tx, &node_id, &service, desired).await?;
            tx.commit().await.map_err(backend)?;
            Ok(())
        })
    }

    fn list_node_services(&self, node_id: Option<&str>) -> StoreFuture<'_, Vec<super::NodeServiceRecord>> {
        let node_id = node_id.map(str::to_owned);
        Box::pin(async move {
            let c = self.client().await?;
            all(
                &**c,
                "SELECT doc FROM node_services WHERE ($1::text IS NULL OR node_id = $1) ORDER BY node_id, service",
                &[&node_id],
                "node service",
            )
            .await
        })
    }

    fn ack_node_services(
        &self,
        node_id: &str,
        acks: Vec<outpost_protocol::ServiceAck>,
    ) -> StoreFuture<'_, ()> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            // The same per-node lock as the node's service reports: the two lock the node's
            // service rows in different orders, so they must not run at once.
            lock_node_log(&*tx, "service_reports", &node_id).await?;
            for a in acks {
                if let Some(mut r) = locked_service(&*tx, &node_id, &a.service).await? {
                    r.acked_seq = r.acked_seq.max(a.seq);
                    put_node_service(&*tx, &r).await?;
                }
            }
            tx.commit().await.map_err(backend)?;
            Ok(())
        })
    }

    fn append_node_audit(
        &self,
        node_id: &str,
        entries: Vec<outpost_protocol::AuditRecord>,
    ) -> StoreFuture<'_, super::NodeAuditOutcome> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            lock_node_log(&*tx, "node_audit", &node_id).await?;
            let last: Option<outpost_protocol::AuditRecord> = one(
                &*tx,
                "SELECT doc FROM node_audit WHERE node_id = $1 ORDER BY seq DESC LIMIT 1",
                &[&node_id],
                "node audit",
            )
            .await?;
            let head =
                last.map(|e| (e.seq, e.sha256)).unwrap_or((0, outpost_protocol::AUDIT_GENESIS.to_owned()));
            match super::continue_node_audit((head.0, &head.1), entries) {
                Err(why) => Ok(super::NodeAuditOutcome { stored: 0, up_to_seq: head.0, refused: Some(why) }),
                Ok(fresh) => {
                    let up_to_seq = fresh.last().map_or(head.0, |e| e.seq);
                    let stored = fresh.len() as u32;
                    for e in &fresh {
                        tx.execute(
                            "INSERT INTO node_audit (node_id, seq, doc) VALUES ($1, $2, $3)",
                            &[&node_id, &node_seq("audit seq", e.seq)?, &Json(e)],
                        )
                        .await
                        .map_err(backend)?;
                    }
                    tx.commit().await.map_err(backend)?;
                    Ok(super::NodeAuditOutcome { stored, up_to_seq, refused: None })
                }
            }
        })
    }

    fn node_audit(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<outpost_protocol::AuditRecord>> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            all(
                &**c,
                "SELECT doc FROM node_audit WHERE node_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&node_id, &big(after_seq), &big(limit as u64)],
                "node audit",
            )
            .await
        })
    }

    fn store_service_reports(
        &self,
        node_id: &str,
        reports: Vec<outpost_protocol::ServiceReport>,
    ) -> StoreFuture<'_, u64> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            lock_node_log(&*tx, "service_reports", &node_id).await?;
            let last = tx
                .query_opt("SELECT last_seq FROM service_report_last WHERE node_id = $1", &[&node_id])
                .await
                .map_err(backend)?
                .map_or(0, |r| unbig(r.get(0)));
            let (fresh, last) = super::fresh_service_reports(last, reports);
            for r in fresh {
                let found = locked_service(&*tx, &node_id, &r.service).await?;
                let mut rec = found.unwrap_or_else(|| super::NodeServiceRecord::new(&node_id, &r.service));
                super::apply_service_report(&mut rec, r);
                put_node_service(&*tx, &rec).await?;
            }
            tx.execute(
                "INSERT INTO service_report_last (node_id, last_seq) VALUES ($1, $2)
                 ON CONFLICT (node_id) DO UPDATE SET last_seq = $2",
                &[&node_id, &node_seq("service report seq", last)?],
            )
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            Ok(last)
        })
    }

    fn store_events(
        &self,
        node_id: &str,
        org_id: &str,
        events: Vec<ObjectEvent>,
        now_ms: u64,
    ) -> StoreFuture<'_, EventsOutcome> {
        let (node_id, org_id) = (node_id.to_owned(), org_id.to_owned());
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            lock_node_log(&*tx, "events", &node_id).await?;
            let last = tx
                .query_one("SELECT coalesce(max(seq), 0) FROM events WHERE node_id = $1", &[&node_id])
                .await
                .map_err(backend)?;
            let mut tally = EventTally::new(unbig(last.get(0)));
            for event in events {
                let seq = node_seq("event seq", event.seq)?;
                let seen = tx
                    .query_opt("SELECT 1 FROM events WHERE node_id = $1 AND seq = $2", &[&node_id, &seq])
                    .await
                    .map_err(backend)?;
                if seen.is_some() {
                    tally.duplicate(event.seq);
                    continue;
                }
                tally.stored(event.seq);
                let cursor = next_counter(&*tx, "event_cursor").await?;
                let stored = stored_event(cursor, &node_id, &org_id, now_ms, event);
                tx.execute(
                    "INSERT INTO events (cursor, node_id, seq, org_id, doc) VALUES ($1, $2, $3, $4, $5)",
                    &[&big(cursor), &node_id, &seq, &org_id, &Json(&stored)],
                )
                .await
                .map_err(backend)?;
            }
            if tally.outcome.stored > 0 {
                notify(&*tx, EVENTS_CHANNEL, &node_id).await?;
            }
            tx.commit().await.map_err(backend)?;
            Ok(tally.outcome)
        })
    }

    fn list_events(&self, filter: EventFilter) -> StoreFuture<'_, Vec<StoredEvent>> {
        Box::pin(async move {
            let c = self.client().await?;
            let limit = big(filter.limit as u64);
            let direction = if filter.newest { "DESC" } else { "ASC" };
            let mut found: Vec<StoredEvent> = match &filter.order {
                EventOrder::BySeq { node_id, after_seq } => {
                    let sql = format!(
                        "SELECT doc FROM events WHERE node_id = $1 AND seq > $2
                           AND ($3::text IS NULL OR org_id = $3)
                         ORDER BY seq {direction} LIMIT $4"
                    );
                    all(&**c, &sql, &[node_id, &big(*after_seq), &filter.org_id, &limit], "event").await?
                }
                EventOrder::ByCursor { node_id, after_cursor } => {
                    let sql = format!(
                        "SELECT doc FROM events WHERE cursor > $1 AND ($2::text IS NULL OR node_id = $2)
                           AND ($3::text IS NULL OR org_id = $3)
                         ORDER BY cursor {direction} LIMIT $4"
                    );
                    all(&**c, &sql, &[&big(*after_cursor), node_id, &filter.org_id, &limit], "event").await?
                }
            };
            if filter.newest {
                found.reverse();
            }
            found.retain(|e| filter.matches(e));
            Ok(take_window(found, filter.newest, filter.limit))
        })
    }

    fn add_triggered_job(&self, node_id: &str, seq: u64, job_id: &str) -> StoreFuture<'_, ()> {
        let (node_id, job_id) = (node_id.to_owned(), job_id.to_owned());
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let mut event: StoredEvent = one(
                &*tx,
                "SELECT doc FROM events WHERE node_id = $1 AND seq = $2 FOR UPDATE",
                &[&node_id, &big(seq)],
                "event",
            )
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("event {seq} of node {node_id}")))?;
            if !event.triggered_jobs.contains(&job_id) {
                event.triggered_jobs.push(job_id);
                tx.execute(
                    "UPDATE events SET doc = $3 WHERE node_id = $1 AND seq = $2",
                    &[&node_id, &big(seq), &Json(&event)],
                )
                .await
                .map_err(backend)?;
            }
            tx.commit().await.map_err(backend)?;
            Ok(())
        })
    }

    fn insert_trigger(&self, trigger: Trigger) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            let inserted = c
                .execute(
                    "INSERT INTO triggers (trigger_id, org_id, name, created_unix_ms, doc) VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &trigger.trigger_id,
                        &trigger.org_id,
                        &trigger.name,
                        &big(trigger.created_unix_ms),
                        &Json(&trigger),
                    ],
                )
                .await;
            match inserted {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => {
                    let by_id = e.as_db_error().and_then(|d| d.constraint()) == Some("triggers_pkey");
                    Err(StoreError::AlreadyExists(if by_id {
                        format!("trigger {}", trigger.trigger_id)
                    } else {
                        format!("trigger named {:?} in org {}", trigger.name, trigger.org_id)
                    }))
                }
                Err(e) => Err(backend(e)),
            }
        })
    }

    fn list_triggers(&self, org_id: Option<&str>) -> StoreFuture<'_, Vec<Trigger>> {
        let org_id = org_id.map(str::to_owned);
        Box::pin(async move {
            let c = self.client().await?;
            let mut out: Vec<Trigger> = all(
                &**c,
                "SELECT doc FROM triggers WHERE ($1::text IS NULL OR org_id = $1)",
                &[&org_id],
                "trigger",
            )
            .await?;
            sort_triggers(&mut out);
            Ok(out)
        })
    }

    fn get_trigger(&self, trigger_id: &str) -> StoreFuture<'_, Option<Trigger>> {
        let id = trigger_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            one(&**c, "SELECT doc FROM triggers WHERE trigger_id = $1", &[&id], "trigger").await
        })
    }

    fn delete_trigger(&self, trigger_id: &str) -> StoreFuture<'_, bool> {
        let id = trigger_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            let n = c.execute("DELETE FROM triggers WHERE trigger_id = $1", &[&id]).await.map_err(backend)?;
            Ok(n > 0)
        })
    }

    fn append_audit(
        &self,
        actor: &str,
        org_id: Option<&str>,
        action: &str,
        detail: &str,
        now_ms: u64,
    ) -> StoreFuture<'_, AuditEntry> {
        let (actor, action, detail) = (actor.to_owned(), action.to_owned(), detail.to_owned());
        let org_id = org_id.map(str::to_owned);
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let seq = next_counter(&*tx, "audit").await?;
            let entry = AuditEntry { seq, unix_ms: now_ms, actor, action, detail, org_id };
            tx.execute(
                "INSERT INTO audit (seq, org_id, doc) VALUES ($1, $2, $3)",
                &[&big(seq), &entry.org_id, &Json(&entry)],
            )
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            Ok(entry)
        })
    }

    fn list_audit(&self, org_id: Option<&str>, limit: usize) -> StoreFuture<'_, Vec<AuditEntry>> {
        let org_id = org_id.map(str::to_owned);
        Box::pin(async move {
            let c = self.client().await?;
            let mut out: Vec<AuditEntry> = all(
                &**c,
                "SELECT doc FROM audit WHERE ($1::text IS NULL OR org_id = $1) ORDER BY seq DESC LIMIT $2",
                &[&org_id, &big(limit as u64)],
                "audit entry",
            )
            .await?;
            out.reverse();
            Ok(out)
        })
    }

    fn insert_api_token(&self, token: ApiTokenRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            let i = &token.info;
            let inserted = c
                .execute(
                    "INSERT INTO api_tokens (id, org_id, name, revoked, doc) VALUES ($1, $2, $3, $4, $5)",
                    &[&i.id, &i.org_id, &i.name, &i.revoked_unix_ms.is_some(), &Json(&token)],
                )
                .await;
            match inserted {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => {
                    let by_id = e.as_db_error().and_then(|d| d.constraint()) == Some("api_tokens_pkey");
                    Err(StoreError::AlreadyExists(if by_id {
                        format!("API token {}", i.id)
                    } else {
                        format!("API token named {:?} in org {}", i.name, i.org_id)
                    }))
                }
                Err(e) => Err(backend(e)),
            }
        })
    }

    fn get_api_token(&self, token_id: &str) -> StoreFuture<'_, Option<ApiTokenRecord>> {
        let id = token_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            one(&**c, "SELECT doc FROM api_tokens WHERE id = $1", &[&id], "API token").await
        })
    }

    fn list_api_tokens(&self, org_id: &str) -> StoreFuture<'_, Vec<ApiTokenInfo>> {
        let org_id = org_id.to_owned();
        Box::pin(async move {
            let c = self.client().await?;
            let tokens: Vec<ApiTokenRecord> =
                all(&**c, "SELECT doc FROM api_tokens WHERE org_id = $1", &[&org_id], "API token").await?;
            let mut out: Vec<ApiTokenInfo> = tokens.into_iter().map(|t| t.info).collect();
            sort_api_tokens(&mut out);
            Ok(out)
        })
    }

    fn revoke_api_token(&self, token_id: &str, now_ms: u64) -> StoreFuture<'_, Option<ApiTokenInfo>> {
        let id = token_id.to_owned();
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(backend)?;
            let found: Option<ApiTokenRecord> =
                one(&*tx, "SELECT doc FROM api_tokens WHERE id = $1 FOR UPDATE", &[&id], "API token").await?;
            let Some(mut token) = found else { return Ok(None) };
            token.info.revoked_unix_ms.get_or_insert(now_ms);
            tx.execute("UPDATE api_tokens SET revoked = true, doc = $2 WHERE id = $1", &[&id, &Json(&token)])
                .await
                .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            Ok(Some(token.info))
        })
    }
}

/// What another replica (or this one) announced through the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// Work for this node: a job submitted, re-placed or cancelled.
    Node(&'a str),
    /// A node's events were stored.
    Events,
    /// Notices may have been missed (the listening connection was down): look again at
    /// everything held.
    Resync,
}

/// Listens on a connection of its own for the notices replicas send at commit, and hands each
/// to `on`, until `shutdown`. A lost connection is made again with backoff (1 s doubling to
/// 30 s), followed by a [`Notice::Resync`], so a notice lost meanwhile costs a held poll at
/// most the time until the listener is back.
pub async fn listen(
    options: PgOptions,
    shutdown: tokio_util::sync::CancellationToken,
    on: std::sync::Arc<dyn Fn(Notice<'_>) + Send + Sync>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = std::time::Instant::now();
        let ended = tokio::select! {
            () = shutdown.cancelled() => return,
            ended = listen_once(&options, &on) => ended,
        };
        if started.elapsed() > Duration::from_secs(60) {
            // It had been listening a while: this is a new outage, not the same one.
            backoff = Duration::from_secs(1);
        }
        match ended {
            Ok(()) => tracing::warn!(db = %options.describe(), "the store's notification connection closed"),
            Err(e) => {
                tracing::warn!(db = %options.describe(), error = %e, "the store's notification connection failed")
            }
        }
        // Polls held meanwhile are woken to look again, whether or not the connection returns.
        on(Notice::Resync);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn listen_once(
    options: &PgOptions,
    on: &std::sync::Arc<dyn Fn(Notice<'_>) + Send + Sync>,
) -> Result<(), StoreError> {
    let (client, mut connection) = options.connect_one().await?;
    let deliver = std::sync::Arc::clone(on);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => match n.channel() {
                    NODE_CHANNEL => deliver(Notice::Node(n.payload())),
                    EVENTS_CHANNEL => deliver(Notice::Events),
                    _ => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(backend(e)),
                None => return Ok(()),
            }
        }
    });
    let listening = client.batch_execute(&format!("LISTEN {NODE_CHANNEL}; LISTEN {EVENTS_CHANNEL}")).await;
    if let Err(e) = listening {
        driver.abort();
        return Err(backend(e));
    }
    tracing::info!("listening for other replicas' notices");
    // Anything committed before LISTEN took effect was not heard.
    on(Notice::Resync);
    let ended = driver.await.unwrap_or_else(|e| Err(StoreError::Backend(format!("listener task: {e}"))));
    drop(client);
    ended
}

/// A connection inside a transaction that holds an advisory lock (see `exclusive`).
struct Held {
    client: Option<Object>,
    /// Whether the lock was taken; before that the transaction's state is unknown.
    locked: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else { return };
        if !self.locked {
            // Given up while beginning or waiting: never back to the pool; closing the
            // connection ends the transaction and the wait on the server.
            drop(Object::take(client));
            return;
        }
        match tokio::runtime::Handle::try_current() {
            // Ended before the connection goes back to the pool.
            Ok(runtime) => {
                runtime.spawn(async move {
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        // Never back to the pool in an unknown state: closing it ends the lock.
                        drop(Object::take(client));
                    }
                });
            }
            Err(_) => drop(Object::take(client)),
        }
    }
}

impl PgStore {
    /// Every record, in the dump's canonical order (see [`super::StoreDump`]).
    pub async fn dump(&self) -> Result<super::StoreDump, StoreError> {
        let mut c = self.client().await?;
        // One snapshot of the whole database.
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(backend)?;
        let t = &*tx;
        let pairs = |rows: Vec<Row>| -> Vec<(String, u64)> {
            rows.iter().map(|r| (r.get::<_, String>(0), unbig(r.get(1)))).collect()
        };
        let counter = |name: &'static str| async move {
            t.query_one("SELECT value FROM outpost_counters WHERE name = $1", &[&name])
                .await
                .map(|r| unbig(r.get(0)))
                .map_err(backend)
        };
        let mut dump = super::StoreDump {
            orgs: all::<_, OrgRecord>(t, "SELECT doc FROM orgs", &[], "org")
                .await?
                .into_iter()
                .map(|o| self.open_org(o))
                .collect::<Result<_, _>>()?,
            tokens: all(t, "SELECT doc FROM enrollment_tokens", &[], "token").await?,
            nodes: all(t, "SELECT doc FROM nodes", &[], "node").await?,
            seqs: pairs(t.query("SELECT node_id, last_seq FROM job_seqs", &[]).await.map_err(backend)?),
            jobs: all(t, "SELECT doc FROM jobs", &[], "job").await?,
            results: all(t, "SELECT doc FROM results", &[], "result").await?,
            deployments: all(t, "SELECT doc FROM deployments", &[], "deployment").await?,
            node_services: all(t, "SELECT doc FROM node_services", &[], "node service").await?,
            service_report_last: pairs(
                t.query("SELECT node_id, last_seq FROM service_report_last", &[]).await.map_err(backend)?,
            ),
            events: all(t, "SELECT doc FROM events", &[], "event").await?,
            event_cursor: counter("event_cursor").await?,
            triggers: all(t, "SELECT doc FROM triggers", &[], "trigger").await?,
            audit: all(t, "SELECT doc FROM audit", &[], "audit entry").await?,
            audit_seq: counter("audit").await?,
            api_tokens: all(t, "SELECT doc FROM api_tokens", &[], "API token").await?,
            ..Default::default()
        };
        for row in t.query("SELECT node_id, doc FROM cancels", &[]).await.map_err(backend)? {
            dump.cancels.push((row.get(0), doc(&row, 1, "cancel")?));
        }
        for row in t.query("SELECT node_id, doc FROM node_audit", &[]).await.map_err(backend)? {
            dump.node_audit.push((row.get(0), doc(&row, 1, "node audit")?));
        }
        tx.commit().await.map_err(backend)?;
        Ok(dump.canonical())
    }

    /// Writes every record of `dump` into this store, which must hold nothing, in one
    /// transaction: a failure leaves it empty.
    pub async fn import(&self, dump: &super::StoreDump) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(backend)?;
        let t = &*tx;
        // Nobody else writes meanwhile (a replica started too early waits, then sees it all).
        t.batch_execute(
            "LOCK TABLE orgs, enrollment_tokens, nodes, job_seqs, jobs, results, cancels, deployments, \
             node_services, service_report_last, node_audit, events, triggers, audit, api_tokens, \
             outpost_counters IN EXCLUSIVE MODE",
        )
        .await
        .map_err(backend)?;
        let held: i64 = t
            .query_one(
                "SELECT (SELECT count(*) FROM orgs) + (SELECT count(*) FROM enrollment_tokens)
                      + (SELECT count(*) FROM nodes) + (SELECT count(*) FROM job_seqs) + (SELECT count(*) FROM jobs)
                      + (SELECT count(*) FROM results) + (SELECT count(*) FROM cancels)
                      + (SELECT count(*) FROM deployments) + (SELECT count(*) FROM node_services)
                      + (SELECT count(*) FROM service_report_last) + (SELECT count(*) FROM node_audit)
                      + (SELECT count(*) FROM events) + (SELECT count(*) FROM triggers) + (SELECT count(*) FROM audit)
                      + (SELECT count(*) FROM api_tokens)",
                &[],
            )
            .await
            .map_err(backend)?
            .get(0);
        if held > 0 {
            return Err(StoreError::AlreadyExists(format!("{held} records in the target database")));
        }
        for org in &dump.orgs {
            let sealed = self.seal_org(org)?;
            t.execute("INSERT INTO orgs (org_id, doc) VALUES ($1, $2)", &[&org.org.id, &Json(&sealed)])
                .await
                .map_err(backend)?;
        }
        for token in &dump.tokens {
            t.execute(
                "INSERT INTO enrollment_tokens (token_sha256, doc) VALUES ($1, $2)",
                &[&token.token_sha256, &Json(token)],
            )
            .await
            .map_err(backend)?;
        }
        for node in &dump.nodes {
            put_node(t, node).await?;
        }
        for (node_id, seq) in &dump.seqs {
            t.execute("INSERT INTO job_seqs (node_id, last_seq) VALUES ($1, $2)", &[node_id, &big(*seq)])
                .await
                .map_err(backend)?;
        }
        for job in &dump.jobs {
            put_job(t, job).await?;
        }
        for report in &dump.results {
            t.execute(
                "INSERT INTO results (idempotency_key, job_id, doc) VALUES ($1, $2, $3)",
                &[&report.idempotency_key, &report.job_id, &Json(report)],
            )
            .await
            .map_err(backend)?;
        }
        for (node_id, stop) in &dump.cancels {
            put_cancel(t, node_id, stop).await?;
        }
        for d in &dump.deployments {
            t.execute(
                "INSERT INTO deployments (org_id, name, doc) VALUES ($1, $2, $3)",
                &[&d.info.org_id, &d.info.name, &Json(d)],
            )
            .await
            .map_err(backend)?;
        }
        for rec in &dump.node_services {
            put_node_service(t, rec).await?;
        }
        for (node_id, last) in &dump.service_report_last {
            t.execute(
                "INSERT INTO service_report_last (node_id, last_seq) VALUES ($1, $2)",
                &[node_id, &big(*last)],
            )
            .await
            .map_err(backend)?;
        }
        for (node_id, entry) in &dump.node_audit {
            t.execute(
                "INSERT INTO node_audit (node_id, seq, doc) VALUES ($1, $2, $3)",
                &[node_id, &big(entry.seq), &Json(entry)],
            )
            .await
            .map_err(backend)?;
        }
        for e in &dump.events {
            t.execute(
                "INSERT INTO events (cursor, node_id, seq, org_id, doc) VALUES ($1, $2, $3, $4, $5)",
                &[&big(e.cursor), &e.node_id, &big(e.event.seq), &e.org_id, &Json(e)],
            )
            .await
            .map_err(backend)?;
        }
        for trigger in &dump.triggers {
            t.execute(
                "INSERT INTO triggers (trigger_id, org_id, name, created_unix_ms, doc) VALUES ($1, $2, $3, $4, $5)",
                &[&trigger.trigger_id, &trigger.org_id, &trigger.name, &big(trigger.created_unix_ms), &Json(trigger)],
            )
            .await
            .map_err(backend)?;
        }
        for entry in &dump.audit {
            t.execute(
                "INSERT INTO audit (seq, org_id, doc) VALUES ($1, $2, $3)",
                &[&big(entry.seq), &entry.org_id, &Json(entry)],
            )
            .await
            .map_err(backend)?;
        }
        for token in &dump.api_tokens {
            let i = &token.info;
            t.execute(
                "INSERT INTO api_tokens (id, org_id, name, revoked, doc) VALUES ($1, $2, $3, $4, $5)",
                &[&i.id, &i.org_id, &i.name, &i.revoked_unix_ms.is_some(), &Json(token)],
            )
            .await
            .map_err(backend)?;
        }
        for (name, value) in [("audit", dump.audit_seq), ("event_cursor", dump.event_cursor)] {
            t.execute("UPDATE outpost_counters SET value = $2 WHERE name = $1", &[&name, &big(value)])
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(())
    }
}

/// A connection's driver, over TLS or not.
pub(super) enum Driver {
    Plain(Box<tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>>),
    Tls(
        Box<
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
                    tokio_postgres::Socket,
                >>::Stream,
            >,
        >,
    ),
}

impl Driver {
    pub(super) fn poll_message(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<tokio_postgres::AsyncMessage, tokio_postgres::Error>>> {
        match self {
            Driver::Plain(c) => c.poll_message(cx),
            Driver::Tls(c) => c.poll_message(cx),
        }
    }
}

/// What the key check seals and expects back.
const KEY_CHECK: &str = "outpost store key check";
/// The form of a sealed secret: this prefix, then hex of the nonce and the ciphertext.
const SEALED_PREFIX: &str = "sealed:v1:";

/// AES-256-GCM with the store key; the org id is the associated data, so a sealed secret
/// moved to another org's record does not open.
#[derive(Clone)]
struct Sealer {
    key: std::sync::Arc<ring::aead::LessSafeKey>,
}

impl Sealer {
    fn new(key: [u8; 32]) -> Result<Self, StoreError> {
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key)
            .map_err(|_| StoreError::Backend("the store key is not an AES-256 key".into()))?;
        Ok(Self { key: std::sync::Arc::new(ring::aead::LessSafeKey::new(unbound)) })
    }

    fn seal(&self, bound_to: &str, secret: &str) -> Result<String, StoreError> {
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| StoreError::Backend("no randomness for a nonce".into()))?;
        let mut data = secret.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(bound_to.as_bytes()),
                &mut data,
            )
            .map_err(|_| StoreError::Backend("cannot seal a secret".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{SEALED_PREFIX}{}", hex::encode(out)))
    }

    fn open(&self, bound_to: &str, sealed: &str) -> Result<String, String> {
        let bytes = sealed
            .strip_prefix(SEALED_PREFIX)
            .and_then(|h| hex::decode(h).ok())
            .ok_or("the secret is not sealed with a store key")?;
        if bytes.len() < ring::aead::NONCE_LEN {
            return Err("the sealed secret is truncated".into());
        }
        let (nonce, body) = bytes.split_at(ring::aead::NONCE_LEN);
        let nonce =
            ring::aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_owned())?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, ring::aead::Aad::from(bound_to.as_bytes()), &mut body)
            .map_err(|_| {
                "the sealed secret does not open with this replica's store key (DATA_DIR/store.key)"
                    .to_owned()
            })?;
        String::from_utf8(plain.to_vec()).map_err(|_| "the opened secret is not text".to_owned())
    }
}
