//! The listener: TLS 1.3 (rustls) in front of the axum router, one task per connection. The
//! client certificate a connection presented (already verified against the CA by rustls) is
//! attached to each of its requests as [`ConnPeer`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::api::{self, AppState, ConnPeer};
use crate::clock::Clock;
use crate::data_dir::DataDir;
use crate::longpoll::NodeWakers;
use crate::pki;
use crate::store::SledStore;
use crate::tls;

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, connections (held polls included) get this long to finish.
const DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Extra names or addresses for the server certificate.
    pub extra_sans: Vec<String>,
}

/// A server that is accepting connections.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub ca_fingerprint: String,
    pub ca_pem: String,
    pub admin_token: String,
    pub data_dir: PathBuf,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningServer {
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Stops accepting, lets connections drain briefly, and waits for the store to close.
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
/// the listener and starts serving until `shutdown` is cancelled.
pub async fn start(cfg: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<RunningServer> {
    let dir = DataDir::new(&cfg.data_dir);
    let materials =
        dir.load_or_init(&cfg.extra_sans).with_context(|| format!("data dir {}", cfg.data_dir.display()))?;
    let store = SledStore::open(&dir.db())?;
    let tls_config =
        tls::server_config(materials.ca.cert_der(), &materials.server_cert_pem, &materials.server_key_pem)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls_config));
    let listener =
        TcpListener::bind(cfg.listen).await.with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let ca_fingerprint = materials.ca.fingerprint().to_owned();
    let ca_pem = materials.ca.cert_pem().to_owned();
    let admin_token = materials.admin_token.clone();
    let state = Arc::new(AppState {
        store: Arc::new(store),
        ca: materials.ca,
        admin_token_sha256: Sha256::digest(materials.admin_token.as_bytes()).into(),
        wakers: NodeWakers::default(),
        clock: Clock::system(),
    });
    let app = api::router(state);
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let conns = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = token.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer_addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let app = app.clone();
            let token = token.clone();
            conns.spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer_addr, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer_addr, "TLS handshake timed out");
                        return;
                    }
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|der| pki::peer_cert(der).ok());
                let conn_peer = ConnPeer(peer);
                let svc = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(conn_peer.clone());
                    req
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%peer_addr, error = %e, "connection ended with an error");
                        }
                    }
                    _ = token.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(DRAIN, conn.as_mut()).await;
                    }
                }
            });
        }
        conns.close();
        let _ = tokio::time::timeout(DRAIN * 2, conns.wait()).await;
    });
    tracing::info!(%addr, ca_sha256 = %ca_fingerprint, "control plane listening");
    Ok(RunningServer { addr, ca_fingerprint, ca_pem, admin_token, data_dir: cfg.data_dir, shutdown, task })
}

/// For tests: a server on 127.0.0.1 with a fresh port in `data_dir`.
pub async fn start_for_tests(data_dir: &std::path::Path) -> anyhow::Result<RunningServer> {
    let cfg = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data_dir.to_path_buf(),
        extra_sans: vec![],
    };
    start(cfg, CancellationToken::new()).await
}
