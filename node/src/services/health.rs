//! Health probes of a service container: a command inside it, a TCP connection to it, or an
//! HTTP GET against it on its network. Each is bounded by the check's timeout, so a probe that
//! hangs counts as a failure instead of stalling the reconciler.

use std::net::IpAddr;
use std::time::Duration;

use outpost_protocol::{HealthCheck, MAX_HEALTH_OUTPUT_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::runtime::{Runtime, ServiceRef};

/// Whether the probe passed, and what it said.
pub async fn probe<R: Runtime>(
    runtime: &R,
    svc: &ServiceRef,
    check: &HealthCheck,
    address: Option<IpAddr>,
) -> (bool, String) {
    let timeout = Duration::from_millis(check.timeout_ms);
    if !check.exec.is_empty() {
        return match runtime.service_exec(svc, &check.exec, timeout, MAX_HEALTH_OUTPUT_BYTES).await {
            Ok(out) => (out.exit_code == 0, format!("exit {}: {}", out.exit_code, out.output.trim_end())),
            Err(e) => (false, format!("could not run the check: {e}")),
        };
    }
    let Some(ip) = address else {
        return (false, "the container has no address on its service network yet".into());
    };
    if let Some(port) = check.tcp_port {
        return match tokio::time::timeout(timeout, TcpStream::connect((ip, port))).await {
            Ok(Ok(_)) => (true, format!("tcp {ip}:{port} accepted")),
            Ok(Err(e)) => (false, format!("tcp {ip}:{port}: {e}")),
            Err(_) => (false, format!("tcp {ip}:{port}: no answer within {} ms", check.timeout_ms)),
        };
    }
    if let Some(http) = &check.http {
        return match tokio::time::timeout(timeout, http_get(ip, http.port, &http.path)).await {
            Ok(Ok(status)) => ((200..400).contains(&status), format!("GET {}: HTTP {status}", http.path)),
            Ok(Err(e)) => (false, format!("GET {}: {e}", http.path)),
            Err(_) => (false, format!("GET {}: no answer within {} ms", http.path, check.timeout_ms)),
        };
    }
    (false, "the health check names no probe".into())
}

/// A minimal HTTP/1.0 GET: the status code of the answer.
async fn http_get(ip: IpAddr, port: u16, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect((ip, port)).await?;
    let host = match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    };
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: outpost-health\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut head = vec![0u8; 1024];
    let mut filled = 0;
    while filled < head.len() {
        let n = stream.read(&mut head[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
        if head[..filled].contains(&b'\n') {
            break;
        }
    }
    let line = String::from_utf8_lossy(&head[..filled]);
    let status = line
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_http_probe_reads_the_status_line() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            for answer in ["HTTP/1.0 204 No Content\r\n\r\n", "HTTP/1.1 503 Busy\r\n\r\n", "garbage\r\n"] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(http_get(ip, port, "/health").await.expect("get"), 204);
        assert_eq!(http_get(ip, port, "/health").await.expect("get"), 503);
        assert!(http_get(ip, port, "/health").await.is_err(), "garbage is no HTTP answer");
    }
}
