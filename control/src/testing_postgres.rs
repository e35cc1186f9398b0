//! A real PostgreSQL server for tests: `initdb` into a temporary directory, then `postgres`
//! listening on a unix socket in it (no TCP port unless asked, no system service). Debian's
//! `postgresql` package provides the binaries; `scripts/test` installs it.
//!
//! PostgreSQL refuses to run as root: under root the server runs as the `postgres` user the
//! package creates (or `nobody`), and the directory is handed to that user.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::store::PgOptions;

/// The database user the test server is initialised with (trust authentication).
pub const USER: &str = "outpost";

/// A running PostgreSQL server owned by the test; stopped and deleted on drop.
pub struct TestPostgres {
    dir: TempDir,
    bin: PathBuf,
    /// Set while the server runs.
    child: Option<Child>,
    /// A TCP port on 127.0.0.1 besides the socket, when asked for.
    tcp_port: Option<u16>,
    run_as: Option<(u32, u32)>,
    next_db: AtomicU32,
    /// The CA of the server's TLS certificate, when started with TLS.
    ca_pem: Option<String>,
}

/// Where Debian's PostgreSQL binaries are: `OUTPOST_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/*/bin` with `initdb` in it.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("OUTPOST_PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// A test's PostgreSQL server, or why there is none: `Ok(None)` (after printing why) when
/// PostgreSQL is not installed and `CI` is not set; under CI a missing PostgreSQL fails.
pub async fn start_or_skip(test: &str) -> anyhow::Result<Option<TestPostgres>> {
    if !installed_or_skip(test)? {
        return Ok(None);
    }
    TestPostgres::start().await.map(Some)
}

/// [`start_or_skip`] for a server with TLS ([`TestPostgres::start_tls`]).
pub async fn start_tls_or_skip(test: &str) -> anyhow::Result<Option<TestPostgres>> {
    if !installed_or_skip(test)? {
        return Ok(None);
    }
    TestPostgres::start_tls().await.map(Some)
}

fn installed_or_skip(test: &str) -> anyhow::Result<bool> {
    if bin_dir().is_none() {
        if std::env::var_os("CI").is_some() {
            bail!("{test}: PostgreSQL is not installed (apt-get install postgresql); CI must run it");
        }
        eprintln!(
            "skipped {test}: PostgreSQL is not installed (apt-get install postgresql, or set OUTPOST_PG_BINDIR)"
        );
        return Ok(false);
    }
    Ok(true)
}

impl TestPostgres {
    /// A fresh server on a unix socket.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None, false).await
    }

    /// A fresh server that also listens on a free port of 127.0.0.1.
    pub async fn start_tcp() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_with(Some(port), false).await
    }

    /// A fresh server that also listens on a free port of 127.0.0.1 with TLS, its certificate
    /// (for localhost and 127.0.0.1) issued by a CA of its own ([`TestPostgres::ca_pem`]).
    pub async fn start_tls() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_with(Some(port), true).await
    }

    async fn start_with(tcp_port: Option<u16>, tls: bool) -> anyhow::Result<Self> {
        let bin = bin_dir().context("PostgreSQL is not installed (apt-get install postgresql)")?;
        let dir = tempfile::Builder::new().prefix("outpost-pg-").tempdir()?;
        let run_as = server_user()?;
        if let Some((uid, gid)) = run_as {
            nix::unistd::chown(dir.path(), Some(uid.into()), Some(gid.into()))
                .context("cannot hand the test database's directory to the postgres user")?;
        }
        let mut pg =
            Self { dir, bin, child: None, tcp_port, run_as, next_db: AtomicU32::new(0), ca_pem: None };
        let out = pg
            .command("initdb")
            .args(["--no-sync", "--auth=trust", "--encoding=UTF8", "--locale=C", "-U", USER, "-D"])
            .arg(pg.data())
            .stdin(Stdio::null())
            .output()
            .context("cannot run initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        if tls {
            let ca = crate::pki::CertAuthority::generate()?;
            let (cert, key) = ca.issue_server_cert(&["localhost".to_owned(), "127.0.0.1".to_owned()])?;
            for (name, text, mode) in [("server.crt", &cert, 0o644), ("server.key", &key, 0o600)] {
                let path = pg.data().join(name);
                std::fs::write(&path, text)?;
                std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
                if let Some((uid, gid)) = run_as {
                    nix::unistd::chown(&path, Some(uid.into()), Some(gid.into()))?;
                }
            }
            let mut conf =
                std::fs::OpenOptions::new().append(true).open(pg.data().join("postgresql.conf"))?;
            std::io::Write::write_all(
                &mut conf,
                b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            )?;
            pg.ca_pem = Some(ca.cert_pem().to_owned());
        }
        pg.resume().await?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The directory the server's unix socket is in.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The TCP port on 127.0.0.1, when started with [`TestPostgres::start_tcp`].
    pub fn tcp_port(&self) -> Option<u16> {
        self.tcp_port
    }

    /// The CA of the server's certificate, when started with [`TestPostgres::start_tls`].
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// A connection string for database `db` over TCP to `localhost` (the name the TLS
    /// certificate has), with `sslmode`.
    pub fn tcp_url(&self, db: &str, sslmode: &str) -> String {
        let port = self.tcp_port.unwrap_or(5432);
        format!("host=localhost port={port} user={USER} dbname={db} sslmode={sslmode}")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.env_remove("PGDATA").env("LC_ALL", "C");
        cmd
    }

    /// Starts the server again after [`TestPostgres::kill`] (the same data directory).
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = std::fs::File::create(self.log())?;
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(&self.log(), Some(uid.into()), Some(gid.into()))?;
        }
        let listen = match self.tcp_port {
            Some(_) => "127.0.0.1",
            None => "",
        };
        let port = self.tcp_port.unwrap_or(5432).to_string();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-p", &port])
            .args(["-c", &format!("listen_addresses={listen}")])
            // A killed server keeps every commit (WAL reaches the kernel at commit); only a
            // crash of the machine could lose one, which no test does.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start postgres")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("postgres exited ({status}): {}", self.log_tail());
            }
            if tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres did not accept connections within 60 s: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The server and every backend killed with SIGKILL (a lost database, as far as its
    /// clients can tell); [`TestPostgres::resume`] starts it again, through crash recovery.
    pub fn kill(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if let Some(mut child) = self.child.take() {
            // Each backend is a session of its own (PostgreSQL calls setsid), so the
            // postmaster's children are found by parent and killed one by one, first.
            let postmaster = child.id();
            let children = children_of(postmaster);
            for pid in &children {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            let deadline = Instant::now() + Duration::from_secs(10);
            while children.iter().any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// A connection string for database `db` over the unix socket.
    pub fn url(&self, db: &str) -> String {
        let port = self.tcp_port.unwrap_or(5432);
        format!("host={} port={port} user={USER} dbname={db}", self.socket_dir().display())
    }

    /// Stops (SIGSTOP) every backend listening for notices, so a notice sent meanwhile reaches
    /// no replica until the returned guard is dropped (SIGCONT): a replica's listener that has
    /// stalled, as seen by everyone else. Fails when no backend listens.
    pub async fn pause_listeners(&self) -> anyhow::Result<PausedBackends> {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %' AND pid <> pg_backend_pid()",
                &[],
            )
            .await?;
        drop(client);
        let _ = conn.await;
        let pids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        if pids.is_empty() {
            bail!("no backend is listening for notices");
        }
        for pid in &pids {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGSTOP)
                .with_context(|| format!("stopping backend {pid}"))?;
        }
        Ok(PausedBackends { pids })
    }

    /// A new, empty database; its connection options (over the unix socket).
    pub async fn database(&self) -> anyhow::Result<PgOptions> {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let name = format!("outpost_{n}");
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        drop(client);
        let _ = conn.await;
        Ok(PgOptions::new(self.url(&name)))
    }
}

/// Backends stopped by [`TestPostgres::pause_listeners`]; continued when dropped.
pub struct PausedBackends {
    pids: Vec<i32>,
}

impl PausedBackends {
    /// How many backends are stopped.
    pub fn len(&self) -> usize {
        self.pids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }
}

impl Drop for PausedBackends {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGCONT);
        }
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: PostgreSQL's fast shutdown (ends sessions, no checkpoint wait for clients).
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The uid and gid to run the server as: `None` when not root; else the `postgres` user, or
/// `nobody`.
fn server_user() -> anyhow::Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Some(user) = nix::unistd::User::from_name(name)? {
            return Ok(Some((user.uid.as_raw(), user.gid.as_raw())));
        }
    }
    bail!("running as root, and there is neither a postgres nor a nobody user to run PostgreSQL as")
}

/// The pids whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|stat| {
                stat.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}
