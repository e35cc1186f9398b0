//! One client connection: the TLS 1.3 handshake (a client certificate is optional, and rustls
//! has already checked it against our CA when one is presented), then HTTP/1.1 with the
//! connection's identity attached to every request as [`ConnPeer`].

use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::api::ConnPeer;
use crate::pki;

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send a request's headers within this long (idle keep-alive included).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After shutdown is signalled, how long a request in progress may take to finish.
const REQUEST_DRAIN: Duration = Duration::from_secs(2);

pub(super) async fn serve_connection(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    acceptor: TlsAcceptor,
    app: axum::Router,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
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
    let peer = tls.get_ref().1.peer_certificates().and_then(|certs| certs.first()).and_then(|der| {
        pki::peer_cert(der)
            .map_err(|e| tracing::warn!(%peer_addr, error = %e, "verified client certificate is unreadable"))
            .ok()
    });
    let conn_peer = ConnPeer(peer);
    let svc = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(conn_peer.clone());
        req
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer_addr, error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(REQUEST_DRAIN, conn.as_mut()).await;
        }
    }
}
