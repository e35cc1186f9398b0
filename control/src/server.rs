//! Starting and stopping the control plane: opens the data directory (CA, certificates, admin
//! token, store), binds the listener and runs the accept loop until shutdown. What happens on
//! one connection (TLS, client identity, HTTP/1.1) lives in `conn.rs`.

mod conn;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::authority::Authority;
use crate::clock::Clock;
use crate::data_dir::{DataDir, DataDirError};
use crate::longpoll::NodeWakers;
use crate::revocation::Revoked;
use crate::store::{PgOptions, PgStore, SledStore, StateStore, StoreError};
use crate::tls::{self, TlsError};

/// On shutdown, open connections (held polls answer at once) get this long to finish.
const DRAIN: Duration = Duration::from_secs(3);
/// Most connections served at once unless `serve --max-connections` says otherwise; beyond it
/// the accept loop waits for one to end. Each connected node holds one.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// What `--max-connections` may be.
pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<usize> = 64..=1_000_000;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot prepare the data directory {path}: {source}")]
    DataDir { path: PathBuf, source: DataDirError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}; is another server using it?")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Extra DNS names or IP addresses for the server certificate.
    pub extra_sans: Vec<String>,
    /// A node silent for longer than this is offline (its `any` jobs move to another node).
    pub lease: Duration,
    /// Where to serve Prometheus metrics (plain HTTP, `GET /metrics`); `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How long the certificates of agents that renew their own last (see
    /// [`DEFAULT_NODE_CERT_LIFETIME`]); older agents get a year.
    pub node_cert_lifetime: Duration,
    /// The longest a long-poll is held before an empty answer (see [`DEFAULT_MAX_HOLD`]).
    pub max_hold: Duration,
    /// Most connections served at once (see [`DEFAULT_MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// Where the state is kept.
    pub store: StoreChoice,
}

/// Where the control plane keeps its state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreChoice {
    /// An embedded sled database in `DATA_DIR/db`: one process (the default).
    #[default]
    Sled,
    /// A PostgreSQL database shared by every replica (docs/scaling.md).
    Postgres(PgOptions),
}

/// Long-polls (a node's poll, event and log listings with `wait_secs`) are answered empty after
/// at most this long: below the idle timeout of common load balancers and proxies.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(30);
/// The range `--max-hold` takes: no longer than 30 s, which is also the longest an agent asks
/// for, and well within the minute after which an unread live-log stream is dropped.
pub const MAX_HOLD_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(30);

/// Node certificates of agents that renew them: renewed two thirds into their life (20 days),
/// so a stolen appliance's certificate is of use for at most a month even if nobody revokes it.
pub const DEFAULT_NODE_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The default node lease: three missed heartbeats at the agent's default 30 s.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(90);

/// A server that is accepting connections. Dropping it does not stop it: cancel the token
/// given to [`serve`] or call [`RunningServer::stop`].
pub struct RunningServer {
    /// The bound address (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// SHA-256 of the CA certificate (DER), lowercase hex: what nodes pin.
    pub ca_fingerprint: String,
    pub ca_pem: String,
    pub admin_token: String,
    pub data_dir: PathBuf,
    /// Where the metrics listener is bound, when there is one.
    pub metrics_addr: Option<SocketAddr>,
    clock: Clock,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// `https://127.0.0.1:PORT` style base URL (the server certificate names 127.0.0.1, ::1 and
    /// localhost).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The server's clock. Moving it forward (tests) expires tokens without waiting.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Stops accepting, answers held polls, lets connections drain briefly, and returns once
    /// every connection is closed and the store is released.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Waits until the server stops (after its shutdown token is cancelled).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Opens the data dir (creating the CA and certificates on first start) and the store, binds
/// the listener and serves until `shutdown` is cancelled.
pub async fn serve(config: ServerConfig, shutdown: CancellationToken) -> Result<RunningServer, ServeError> {
    let prepared = prepare(&config).await?;
    let opened = open_store(&config, &prepared.dir, &prepared.revoked).await?;
    start(config, prepared, opened, shutdown).await
}

/// Like [`serve`], but a shared database that cannot be reached yet (it starts after this
/// replica, or is being failed over) is waited for, with backoff from 1 s to 30 s. Meanwhile
/// the listener is bound and answers every request, `/v1/health` included, with
/// `503 store_unavailable` and the reason, so a load balancer's check and an operator see a
/// replica that is up but not ready. `None`: `shutdown` came first.
pub async fn serve_when_ready(
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<Option<RunningServer>, ServeError> {
    let prepared = prepare(&config).await?;
    let mut backoff = Duration::from_secs(1);
    let mut waiting: Option<(CancellationToken, JoinHandle<()>, Arc<std::sync::Mutex<String>>)> = None;
    let opened = loop {
        match open_store(&config, &prepared.dir, &prepared.revoked).await {
            Err(ServeError::Store(StoreError::Unreachable(why))) => {
                tracing::warn!(%why, retry_in = ?backoff, "cannot reach the state store; retrying (answering 503 meanwhile)");
                match &waiting {
                    Some((_, _, reason)) => {
                        if let Ok(mut r) = reason.lock() {
                            *r = why;
                        }
                    }
                    None => {
                        let reason = Arc::new(std::sync::Mutex::new(why));
                        let stop = shutdown.child_token();
                        let app = not_ready_router(Arc::clone(&reason));
                        let task = tokio::spawn(accept_loop(
                            Arc::clone(&prepared.listener),
                            prepared.acceptor.clone(),
                            app,
                            stop.clone(),
                            config.max_connections,
                        ));
                        waiting = Some((stop, task, reason));
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => break None,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            opened => break Some(opened),
        }
    };
    if let Some((stop, task, _)) = waiting {
        // The not-ready answers end, whatever comes next; the listener (and the connections
        // queued on it) go on to the real server.
        stop.cancel();
        let _ = task.await;
    }
    let Some(opened) = opened else { return Ok(None) };
    start(config, prepared, opened?, shutdown).await.map(Some)
}

/// What answers while the store cannot be reached yet: 503 with the reason, to everything.
fn not_ready_router(reason: Arc<std::sync::Mutex<String>>) -> axum::Router {
    axum::Router::new().fallback(move || {
        let why = reason.lock().map(|r| r.clone()).unwrap_or_default();
        async move {
            api::ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("the control plane is starting and cannot reach its store yet: {why}; retry later"),
            )
        }
    })
}

/// What a replica has before its store: the data directory's keys and certificates, the TLS
/// acceptor and the bound listener.
struct Prepared {
    dir: DataDir,
    admin_token: String,
    clock: Clock,
    authority: Arc<Authority>,
    revoked: Revoked,
    acceptor: TlsAcceptor,
    listener: Arc<TcpListener>,
    addr: SocketAddr,
}

async fn prepare(config: &ServerConfig) -> Result<Prepared, ServeError> {
    let dir = DataDir::new(&config.data_dir);
    let materials = dir
        .load_or_init(&config.extra_sans)
        .map_err(|source| ServeError::DataDir { path: config.data_dir.clone(), source })?;
    let clock = Clock::system();
    let sans: Vec<String> = crate::data_dir::wanted_sans(&config.extra_sans).into_iter().collect();
    let admin_token = materials.admin_token.clone();
    let authority = Arc::new(Authority::new(materials, dir.clone(), sans, clock.clone())?);
    // Filled from the store once it is open; until then every request is refused anyway.
    let revoked = Revoked::default();
    let tls_config = tls::server_config(Arc::clone(&authority), revoked.clone())?;
    let acceptor = TlsAcceptor::from(Arc::new(tls_config));
    let bind_err = |source| ServeError::Bind { addr: config.listen, source };
    let listener = TcpListener::bind(config.listen).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    Ok(Prepared { dir, admin_token, clock, authority, revoked, acceptor, listener: Arc::new(listener), addr })
}

type Opened = (Arc<dyn StateStore>, Option<PgOptions>);

/// Opens the store and loads the revoked nodes into `revoked` (the TLS layer refuses them):
/// everything a start reads from the store, so that a store lost meanwhile is retried as a
/// whole by [`serve_when_ready`].
async fn open_store(config: &ServerConfig, dir: &DataDir, revoked: &Revoked) -> Result<Opened, ServeError> {
    let opened: Opened = match &config.store {
        StoreChoice::Sled => (Arc::new(SledStore::open(&dir.db())?), None),
        StoreChoice::Postgres(options) => {
            let mut options = options.clone();
            options.secret_key = Some(
                dir.load_or_create_store_key()
                    .map_err(|source| ServeError::DataDir { path: config.data_dir.clone(), source })?,
            );
            let store = PgStore::connect(options.clone()).await?;
            tracing::info!(db = %store.describe(), "state store: PostgreSQL");
            (Arc::new(store), Some(options))
        }
    };
    for node in opened.0.list_nodes().await?.into_iter().filter(|n| n.revoked_unix_ms.is_some()) {
        revoked.insert_node(&node);
    }
    if !revoked.is_empty() {
        tracing::info!(nodes = revoked.len(), "revoked node certificates are refused");
    }
    Ok(opened)
}

async fn start(
    config: ServerConfig,
    prepared: Prepared,
    (store, shared): Opened,
    shutdown: CancellationToken,
) -> Result<RunningServer, ServeError> {
    let Prepared { admin_token, clock, authority, revoked, acceptor, listener, addr, .. } = prepared;
    let admin_token_sha256 = Sha256::digest(admin_token.as_bytes()).into();
    let ca_fingerprint = authority.presented().fingerprint().to_owned();
    let ca_pem = authority.presented().cert_pem().to_owned();
    let state = Arc::new(AppState {
        store,
        authority,
        admin_token_sha256,
        wakers: NodeWakers::default(),
        clock: clock.clone(),
        submit_lock: tokio::sync::Mutex::new(()),
        events_stored: tokio::sync::Notify::new(),
        shutdown: shutdown.clone(),
        lease: config.lease,
        fleet_changed: tokio::sync::Notify::new(),
        fleet_lock: tokio::sync::Mutex::new(()),
        contact: Default::default(),
        started_unix_ms: clock.now_ms(),
        sent: Default::default(),
        logs: Default::default(),
        metrics: Default::default(),
        console: Default::default(),
        revoked,
        node_cert_lifetime: config.node_cert_lifetime,
        max_hold: config.max_hold,
    });
    let (metrics_addr, metrics_task) = match config.metrics_listen {
        Some(addr) => {
            let (bound, task) = crate::metrics::bind(addr, state.clone(), shutdown.clone())
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            tracing::info!(addr = %bound, "metrics listening (GET /metrics)");
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    if let Some(options) = shared {
        // Other replicas announce through the database what this one's held polls wait for.
        let heard = Arc::downgrade(&state);
        let on: Arc<dyn Fn(crate::store::Notice<'_>) + Send + Sync> = Arc::new(move |notice| {
            let Some(state) = heard.upgrade() else { return };
            match notice {
                crate::store::Notice::Node(node_id) => state.wakers.wake(node_id),
                crate::store::Notice::Events => state.events_stored.notify_waiters(),
                crate::store::Notice::Resync => {
                    state.wakers.wake_all();
                    state.events_stored.notify_waiters();
                }
            }
        });
        tokio::spawn(crate::store::listen(options, shutdown.clone(), on));
        tokio::spawn(api::node::recheck_held(state.clone(), api::node::RECHECK_HELD));
    }
    let sweep_every = (config.lease / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
    tokio::spawn(api::placement::run(state.clone(), sweep_every));
    tokio::spawn(api::rollout::run(state.clone(), Duration::from_millis(500)));
    let app = api::router(state);
    let accepting = accept_loop(listener, acceptor, app, shutdown.clone(), config.max_connections);
    // The server has stopped once both listeners have: neither holds the store afterwards.
    let task = tokio::spawn(async move {
        accepting.await;
        if let Some(metrics) = metrics_task {
            let _ = metrics.await;
        }
    });
    tracing::info!(%addr, ca_sha256 = %ca_fingerprint, "control plane listening");
    Ok(RunningServer {
        addr,
        ca_fingerprint,
        ca_pem,
        metrics_addr,
        admin_token,
        data_dir: config.data_dir,
        clock,
        shutdown,
        task,
    })
}

async fn accept_loop(
    listener: Arc<TcpListener>,
    acceptor: TlsAcceptor,
    app: axum::Router,
    shutdown: CancellationToken,
    max_connections: usize,
) {
    let mut conns = JoinSet::new();
    loop {
        // Reap finished connections so the set stays as small as the live ones.
        while conns.try_join_next().is_some() {}
        if conns.len() >= max_connections {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = conns.join_next() => continue,
            }
        }
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer_addr)) => {
                conns.spawn(conn::serve_connection(
                    tcp,
                    peer_addr,
                    acceptor.clone(),
                    app.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(listener);
    // Connections see the same token: they finish their request and close.
    if tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(open = conns.len(), "connections still open after the drain period; closing them");
        conns.shutdown().await;
    }
    // `app` (and with it the store) is dropped here, after every connection is gone.
    drop(app);
    tracing::info!("control plane stopped");
}
