//! `outpost-control serve`: starts the server, prints the one ready line, and shuts down
//! gracefully on SIGTERM or SIGINT (held polls are answered, connections drained).

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::Global;
use crate::server::{self, ServerConfig};

pub(super) async fn serve(
    g: &Global,
    listen: SocketAddr,
    extra_sans: Vec<String>,
    lease: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    // Handlers first, so a signal that arrives right after the ready line is not lost.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = CancellationToken::new();
    let config = ServerConfig { listen, data_dir: g.data_dir.clone(), extra_sans, lease };
    let server = server::serve(config, shutdown.clone()).await?;
    println!("outpost-control listening on https://{} (CA sha256 {})", server.addr, server.ca_fingerprint);
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    server.stop().await;
    Ok(ExitCode::SUCCESS)
}
