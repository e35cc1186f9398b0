//! A real control plane for tests: TLS 1.3 on 127.0.0.1 with a fresh port and a temporary
//! data directory, started in-process. Restarting keeps the directory (CA, admin token,
//! database), as a restarted production server would.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::clock::Clock;
use crate::server::{RunningServer, ServerConfig, StoreChoice, serve};

#[path = "testing_postgres.rs"]
pub mod postgres;

/// A running server and the temporary data directory it owns (deleted on drop).
pub struct TestServer {
    server: RunningServer,
    dir: TempDir,
    lease: Duration,
    store: StoreChoice,
}

/// Starts a server on 127.0.0.1:0 over real TLS with a fresh temporary data directory.
pub async fn start_test_server() -> anyhow::Result<TestServer> {
    TestServer::start().await
}

impl TestServer {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_lease(crate::server::DEFAULT_LEASE).await
    }

    /// A server whose node lease is `lease` (the placement sweep runs every quarter of it).
    pub async fn start_with_lease(lease: Duration) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let server = start_in(dir.path(), lease, StoreChoice::Sled).await?;
        Ok(Self { server, dir, lease, store: StoreChoice::Sled })
    }

    /// A server keeping its state in `store`, with a fresh data directory.
    pub async fn start_with_store(store: StoreChoice) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let lease = crate::server::DEFAULT_LEASE;
        let server = start_in(dir.path(), lease, store.clone()).await?;
        Ok(Self { server, dir, lease, store })
    }

    /// Another replica of this control plane: a copy of its data directory (CA, server
    /// certificate, admin token, as an operator copies them to each replica), the same store,
    /// its own port. Only a shared store (PostgreSQL) makes it the same control plane.
    pub async fn replica(&self) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        copy_data_dir(self.dir.path(), dir.path())?;
        let server = start_in(dir.path(), self.lease, self.store.clone()).await?;
        Ok(Self { server, dir, lease: self.lease, store: self.store.clone() })
    }

    /// Stops the server and starts a new one on the same data directory (on a new port).
    pub async fn restart(self) -> anyhow::Result<Self> {
        let Self { server, dir, lease, store } = self;
        server.stop().await;
        let server = start_in(dir.path(), lease, store.clone()).await?;
        Ok(Self { server, dir, lease, store })
    }

    /// Stops the server; the data directory is deleted.
    pub async fn stop(self) {
        self.server.stop().await;
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn ca_pem(&self) -> &str {
        &self.server.ca_pem
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex.
    pub fn ca_fingerprint(&self) -> &str {
        &self.server.ca_fingerprint
    }

    pub fn admin_token(&self) -> &str {
        &self.server.admin_token
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `http://127.0.0.1:PORT/metrics`: test servers always serve their metrics.
    pub fn metrics_url(&self) -> String {
        let addr = self.server.metrics_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        format!("http://{addr}/metrics")
    }

    /// The server's clock; advancing it expires tokens without waiting.
    pub fn clock(&self) -> &Clock {
        self.server.clock()
    }

    /// The operator client the CLI uses, with the admin token and the CA pinned.
    pub fn operator(&self) -> anyhow::Result<Client> {
        Client::new(&self.url(), self.ca_pem(), self.admin_token())
    }
}

/// Copies a control plane's data directory as an operator does for another replica: its files
/// (CA, server certificate, admin token, store key), not the embedded database.
pub fn copy_data_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

async fn start_in(dir: &Path, lease: Duration, store: StoreChoice) -> anyhow::Result<RunningServer> {
    let config = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_path_buf(),
        extra_sans: vec![],
        lease,
        metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        node_cert_lifetime: crate::server::DEFAULT_NODE_CERT_LIFETIME,
        max_hold: crate::server::DEFAULT_MAX_HOLD,
        max_connections: crate::server::DEFAULT_MAX_CONNECTIONS,
        store,
    };
    Ok(serve(config, CancellationToken::new()).await?)
}
