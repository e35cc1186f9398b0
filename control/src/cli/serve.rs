//! `outpost-control serve`: starts the server, prints the one ready line, and shuts down
//! gracefully on SIGTERM or SIGINT (held polls are answered, connections drained).

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::Global;
use crate::server::{self, ServerConfig};

const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
const DEFAULT_LEASE: Duration = Duration::from_secs(90);

/// What `serve --config FILE` may set: the same names as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    #[serde(default)]
    san: Vec<String>,
    lease: Option<String>,
    metrics_listen: Option<String>,
    node_cert_lifetime: Option<String>,
    max_hold: Option<String>,
    max_connections: Option<usize>,
    store: Option<StoreSection>,
}

/// `[store]`: where the state is kept. Without it, or with `url = "sled"`, an embedded
/// database in the data directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    url: Option<String>,
    password_file: Option<std::path::PathBuf>,
    pool_size: Option<usize>,
    ca_file: Option<std::path::PathBuf>,
}

/// The environment variable a PostgreSQL password may come from (wins over `password_file`).
pub const STORE_PASSWORD_ENV: &str = "OUTPOST_STORE_PASSWORD";

/// What the command line gave; each wins over the file.
#[derive(Debug, Default, clap::Args)]
pub struct Flags {
    /// Address and port to listen on [default: 127.0.0.1:8443].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Extra DNS name or IP address for the server certificate (repeatable; adds to the
    /// file's); the certificate always names localhost, 127.0.0.1, ::1 and the hostname.
    #[arg(long = "san", value_name = "NAME")]
    pub sans: Vec<String>,
    /// A node whose last heartbeat is older than this is offline: `node list` says so, and
    /// its `--any` jobs are offered to another matching node (e.g. 90s, 5m) [default: 90s].
    #[arg(long, value_parser = super::submit::parse_duration, env = "OUTPOST_CONTROL_LEASE")]
    pub lease: Option<Duration>,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP: keep it on loopback or a private
    /// network) on this address and port, e.g. 127.0.0.1:9464 [default: not served].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// How long the certificates of agents that renew their own last (they renew two
    /// thirds in, over mutual TLS); older agents get a year [default: 30d].
    #[arg(long, value_parser = super::submit::parse_duration, value_name = "DURATION")]
    pub node_cert_lifetime: Option<Duration>,
    /// The longest a long-poll is held before an empty answer: a node's poll, and
    /// `wait_secs` of event and log listings. Keep it below the idle timeout of any load
    /// balancer or proxy in front (1s to 30s) [default: 30s].
    #[arg(long, value_parser = super::submit::parse_duration, value_name = "DURATION")]
    pub max_hold: Option<Duration>,
    /// Most connections served at once (each connected node holds one); beyond it new
    /// connections wait for one to end. Raise the process's file-descriptor limit with it
    /// (LimitNOFILE in the unit); 64 to 1000000 [default: 16384].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Keep the state in PostgreSQL, shared by every replica: `postgres://USER@HOST:PORT/DB`
    /// or `host=/run/postgresql dbname=outpost user=outpost`; the password comes from
    /// OUTPOST_STORE_PASSWORD or `[store] password_file`, never the command line. `sled`: the
    /// embedded database in DATA_DIR/db [default: sled].
    #[arg(long, value_name = "URL", env = "OUTPOST_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
}

/// The server's settings: flags over the file over the defaults; `san` from both.
#[derive(Debug, PartialEq)]
pub(super) struct Settings {
    pub listen: SocketAddr,
    pub sans: Vec<String>,
    pub lease: Duration,
    /// Where Prometheus metrics are served (plain HTTP); `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    pub node_cert_lifetime: Duration,
    pub max_hold: Duration,
    pub max_connections: usize,
    pub store: server::StoreChoice,
}

/// What the file set, each value checked.
#[derive(Debug, Default)]
struct FileSettings {
    listen: Option<SocketAddr>,
    sans: Vec<String>,
    lease: Option<Duration>,
    metrics_listen: Option<SocketAddr>,
    node_cert_lifetime: Option<Duration>,
    max_hold: Option<Duration>,
    max_connections: Option<usize>,
    store: StoreSection,
}

impl Settings {
    pub(super) fn resolve(config: Option<&Path>, flags: Flags) -> anyhow::Result<Settings> {
        let Flags {
            listen,
            sans,
            lease,
            metrics_listen,
            node_cert_lifetime,
            max_hold,
            max_connections,
            store_url,
        } = flags;
        let file = match config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the configuration {}", path.display()))?;
                Self::parse(&text).with_context(|| format!("invalid configuration {}", path.display()))?
            }
            None => FileSettings::default(),
        };
        let listen = match listen.or(file.listen) {
            Some(addr) => addr,
            None => DEFAULT_LISTEN.parse().context("the default listen address")?,
        };
        let mut all = file.sans;
        all.extend(sans);
        let mut section = file.store;
        let store = store_choice(store_url.or(section.url.take()), section)?;
        Ok(Settings {
            listen,
            sans: all,
            lease: lease.or(file.lease).unwrap_or(DEFAULT_LEASE),
            metrics_listen: metrics_listen.or(file.metrics_listen),
            node_cert_lifetime: node_cert_lifetime
                .or(file.node_cert_lifetime)
                .unwrap_or(server::DEFAULT_NODE_CERT_LIFETIME),
            max_hold: check_max_hold(max_hold.or(file.max_hold).unwrap_or(server::DEFAULT_MAX_HOLD))?,
            max_connections: check_max_connections(
                max_connections.or(file.max_connections).unwrap_or(server::DEFAULT_MAX_CONNECTIONS),
            )?,
            store,
        })
    }

    /// The file's values, each checked (the error names the key and the value).
    fn parse(text: &str) -> anyhow::Result<FileSettings> {
        let file: File = toml::from_str(text)?;
        let address = |key: &str, value: Option<String>| {
            value
                .map(|t| {
                    t.parse().map_err(|e| anyhow::anyhow!("{key} = {t:?} is not an address and port: {e}"))
                })
                .transpose()
        };
        let listen = address("listen", file.listen)?;
        let metrics_listen = address("metrics_listen", file.metrics_listen)?;
        let duration = |key: &str, value: Option<String>| {
            value
                .map(|t| super::submit::parse_duration(&t).map_err(|e| anyhow::anyhow!("{key} = {t:?}: {e}")))
                .transpose()
        };
        let lease = duration("lease", file.lease)?;
        let node_cert_lifetime = duration("node_cert_lifetime", file.node_cert_lifetime)?;
        let max_hold = duration("max_hold", file.max_hold)?.map(check_max_hold).transpose()?;
        let max_connections = file.max_connections.map(check_max_connections).transpose()?;
        let store = file.store.unwrap_or_default();
        Ok(FileSettings {
            listen,
            sans: file.san,
            lease,
            metrics_listen,
            node_cert_lifetime,
            max_hold,
            max_connections,
            store,
        })
    }
}

/// The store the settings name: sled unless a PostgreSQL url is given; the password from the
/// environment or the file (checked now, so a bad setting fails before anything starts).
fn store_choice(url: Option<String>, section: StoreSection) -> anyhow::Result<server::StoreChoice> {
    let StoreSection { url: _, password_file, pool_size, ca_file } = section;
    let url = match url {
        None => return Ok(server::StoreChoice::Sled),
        Some(url) if url.trim() == "sled" => return Ok(server::StoreChoice::Sled),
        Some(url) => url,
    };
    let mut options = crate::store::PgOptions::new(url);
    options.password = match std::env::var(STORE_PASSWORD_ENV) {
        Ok(password) => Some(password),
        Err(_) => match &password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the store password_file {}", path.display()))?,
            ),
            None => None,
        },
    };
    if let Some(path) = &ca_file {
        options.ca_pem = Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the store ca_file {}", path.display()))?,
        );
    }
    if let Some(size) = pool_size {
        let least = crate::store::MIN_POOL_SIZE;
        anyhow::ensure!((least..=1000).contains(&size), "store pool_size {size} is outside {least} to 1000");
        options.pool_size = size;
    }
    options.check().map_err(|e| anyhow::anyhow!("[store] url: {e}"))?;
    Ok(server::StoreChoice::Postgres(options))
}

fn check_max_connections(max: usize) -> anyhow::Result<usize> {
    let range = server::MAX_CONNECTIONS_RANGE;
    anyhow::ensure!(
        range.contains(&max),
        "max_connections {max} is outside {} to {}",
        range.start(),
        range.end()
    );
    Ok(max)
}

fn check_max_hold(hold: Duration) -> anyhow::Result<Duration> {
    let range = server::MAX_HOLD_RANGE;
    anyhow::ensure!(
        range.contains(&hold),
        "max_hold {hold:?} is outside {:?} to {:?}",
        range.start(),
        range.end()
    );
    Ok(hold)
}

/// `outpost-control migrate`: brings the PostgreSQL database the settings name to this
/// binary's schema.
pub(super) async fn migrate(settings: Settings) -> anyhow::Result<ExitCode> {
    let server::StoreChoice::Postgres(options) = settings.store else {
        anyhow::bail!(
            "migrate is for a PostgreSQL store: give --store-url or [store] url (the embedded sled store needs no migration)"
        );
    };
    let db = options.describe();
    let done =
        crate::store::PgStore::migrate(options).await.with_context(|| format!("cannot migrate {db}"))?;
    if done.from == done.to {
        println!("{db}: schema at version {} already; nothing to do", done.to);
    } else {
        println!("{db}: schema migrated from version {} to {}", done.from, done.to);
    }
    Ok(ExitCode::SUCCESS)
}

/// `outpost-control migrate-store`: the embedded store copied into PostgreSQL and verified.
pub(super) async fn migrate_store(
    g: &Global,
    from: Option<&str>,
    settings: Settings,
) -> anyhow::Result<ExitCode> {
    let server::StoreChoice::Postgres(options) = settings.store else {
        anyhow::bail!("migrate-store needs a PostgreSQL target: give --to URL or [store] url in --config");
    };
    let dir = match from {
        None => crate::data_dir::DataDir::new(&g.data_dir).db(),
        Some(spec) => match spec.strip_prefix("sled:") {
            Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
            _ => anyhow::bail!(
                "--from {spec:?}: give the embedded store as sled:DIR (e.g. sled:/var/lib/outpost-control/db)"
            ),
        },
    };
    anyhow::ensure!(dir.is_dir(), "no embedded store at {} (see --from and --data-dir)", dir.display());
    let db = options.describe();
    let migrated = crate::store::PgStore::migrate(options.clone())
        .await
        .with_context(|| format!("cannot migrate {db}"))?;
    if migrated.from != migrated.to {
        eprintln!("{db}: schema migrated from version {} to {}", migrated.from, migrated.to);
    }
    let mut options = options;
    options.secret_key = Some(crate::data_dir::DataDir::new(&g.data_dir).load_or_create_store_key()?);
    let target = crate::store::PgStore::connect(options).await?;
    let source = crate::store::SledStore::open(&dir)?;
    eprintln!("copying {} into {db} ...", dir.display());
    let (copied, now) = match crate::store::copy_to_postgres(&source, &target).await? {
        crate::store::Copied::Now(counts) => (counts, true),
        crate::store::Copied::Already(counts) => (counts, false),
    };
    let width = copied.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (kind, n) in &copied {
        println!("{kind:<width$}  {n:>9}");
    }
    let total: usize = copied.iter().map(|(_, n)| n).sum();
    if now {
        println!("copied {total} records into {db}; read back equal, audit chains intact");
    } else {
        println!("{db} already holds exactly these {total} records; nothing to do");
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn serve(g: &Global, settings: Settings) -> anyhow::Result<ExitCode> {
    // Handlers first, so a signal that arrives right after the ready line is not lost.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = CancellationToken::new();
    let config = ServerConfig {
        listen: settings.listen,
        data_dir: g.data_dir.clone(),
        extra_sans: settings.sans,
        lease: settings.lease,
        metrics_listen: settings.metrics_listen,
        node_cert_lifetime: settings.node_cert_lifetime,
        max_hold: settings.max_hold,
        max_connections: settings.max_connections,
        store: settings.store,
    };
    // A database that does not answer yet (it starts after us, or is being failed over) is
    // waited for, the listener answering 503 meanwhile; any other refusal (no schema, a newer
    // one) ends the start.
    let starting = server::serve_when_ready(config, shutdown.clone());
    let server = tokio::select! {
        started = starting => match started? {
            Some(server) => server,
            None => return Ok(ExitCode::FAILURE),
        },
        _ = term.recv() => {
            shutdown.cancel();
            return Ok(ExitCode::FAILURE);
        }
        _ = int.recv() => {
            shutdown.cancel();
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("outpost-control listening on https://{} (CA sha256 {})", server.addr, server.ca_fingerprint);
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    server.stop().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn without_a_file_or_flags_the_defaults_apply() {
        let s = Settings::resolve(None, Flags::default()).unwrap();
        assert_eq!(
            s,
            Settings {
                listen: DEFAULT_LISTEN.parse().unwrap(),
                sans: vec![],
                lease: DEFAULT_LEASE,
                metrics_listen: None,
                node_cert_lifetime: server::DEFAULT_NODE_CERT_LIFETIME,
                max_hold: server::DEFAULT_MAX_HOLD,
                max_connections: server::DEFAULT_MAX_CONNECTIONS,
                store: server::StoreChoice::Sled,
            }
        );
    }

    #[test]
    fn the_file_sets_what_flags_leave_out_and_names_add_up() {
        let f = file(
            "listen = \"0.0.0.0:9443\"\nsan = [\"control.example\"]\nlease = \"5m\"\nnode_cert_lifetime = \"7d\"\n\
             max_hold = \"20s\"\nmax_connections = 30000\n",
        );
        let s =
            Settings::resolve(Some(f.path()), Flags { sans: vec!["10.0.0.5".into()], ..Flags::default() })
                .unwrap();
        assert_eq!(s.listen, "0.0.0.0:9443".parse().unwrap());
        assert_eq!(s.sans, vec!["control.example".to_string(), "10.0.0.5".to_string()]);
        assert_eq!(s.lease, Duration::from_secs(300));
        assert_eq!(s.node_cert_lifetime, Duration::from_secs(7 * 86_400));
        assert_eq!(s.max_hold, Duration::from_secs(20));
        assert_eq!(s.max_connections, 30_000);
        let flags = Settings::resolve(
            Some(f.path()),
            Flags {
                listen: Some("127.0.0.1:1".parse().unwrap()),
                lease: Some(Duration::from_secs(7)),
                max_hold: Some(Duration::from_secs(1)),
                max_connections: Some(100),
                ..Flags::default()
            },
        )
        .unwrap();
        assert_eq!((flags.listen, flags.lease), ("127.0.0.1:1".parse().unwrap(), Duration::from_secs(7)));
        assert_eq!(flags.max_hold, Duration::from_secs(1));
        assert_eq!(flags.max_connections, 100);
    }

    #[test]
    fn a_commented_file_is_the_defaults() {
        let f = file("# listen = \"0.0.0.0:8443\"\n# san = []\n");
        assert_eq!(
            Settings::resolve(Some(f.path()), Flags::default()).unwrap().listen,
            DEFAULT_LISTEN.parse().unwrap()
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_key() {
        for (text, says) in [
            ("listn = \"0.0.0.0:1\"", "unknown field `listn`"),
            ("listen = \"everywhere\"", "listen = \"everywhere\""),
            ("lease = \"soon\"", "lease = \"soon\""),
            ("metrics_listen = \"9464\"", "metrics_listen = \"9464\""),
            ("san = \"one\"", "san"),
            ("max_hold = \"1m\"", "max_hold 60s is outside 1s to 30s"),
            ("max_hold = \"0s\"", "max_hold"),
            ("max_connections = 10", "max_connections 10 is outside 64 to 1000000"),
            ("max_connections = -1", "max_connections"),
            ("[store]\nurl = \"host=/run/postgresql\"\nuser = \"x\"", "unknown field `user`"),
        ] {
            let f = file(text);
            let err = format!("{:#}", Settings::resolve(Some(f.path()), Flags::default()).unwrap_err());
            assert!(err.contains(says), "{text}: {err}");
            assert!(err.contains(&f.path().display().to_string()), "{err}");
        }
        let missing =
            Settings::resolve(Some(Path::new("/nonexistent/outpost-control.toml")), Flags::default());
        assert!(format!("{:#}", missing.unwrap_err()).contains("cannot read the configuration"));
    }

    #[test]
    fn the_store_section_names_a_postgres_database_and_its_password_file() {
        let secret = file("s3cret\n");
        let f = file(&format!(
            "[store]\nurl = \"host=/run/postgresql dbname=outpost user=outpost\"\npassword_file = {:?}\npool_size = 4\n",
            secret.path()
        ));
        let s = Settings::resolve(Some(f.path()), Flags::default()).unwrap();
        let server::StoreChoice::Postgres(options) = &s.store else { panic!("{:?}", s.store) };
        assert_eq!(options.password.as_deref(), Some("s3cret\n"), "read from the file");
        assert_eq!(options.pool_size, 4);
        assert_eq!(options.describe(), "outpost@/run/postgresql:5432/outpost");
        assert!(!format!("{s:?}").contains("s3cret"), "never in a debug print");
        // A CA file that is not PEM certificates is refused when the settings are read.
        let junk = file("not a certificate\n");
        let f = file(&format!("[store]\nurl = \"host=db sslmode=require\"\nca_file = {:?}\n", junk.path()));
        let err = format!("{:#}", Settings::resolve(Some(f.path()), Flags::default()).unwrap_err());
        assert!(err.contains("ca_file"), "{err}");
        let ca = crate::pki::CertAuthority::generate().unwrap();
        let pem = file(ca.cert_pem());
        let f = file(&format!("[store]\nurl = \"host=db sslmode=require\"\nca_file = {:?}\n", pem.path()));
        let s = Settings::resolve(Some(f.path()), Flags::default()).unwrap();
        let server::StoreChoice::Postgres(options) = &s.store else { panic!("{:?}", s.store) };
        assert_eq!(options.ca_pem.as_deref(), Some(ca.cert_pem()));
        // The flag wins over the file; `sled` is the embedded store.
        let flag = Flags { store_url: Some("sled".into()), ..Flags::default() };
        assert_eq!(Settings::resolve(Some(f.path()), flag).unwrap().store, server::StoreChoice::Sled);
        for (text, says) in [
            ("[store]\nurl = \"host=/tmp\"\npool_size = 1\n", "pool_size 1 is outside 4 to 1000"),
            ("[store]\nurl = \"postgres://[::1\"\n", "[store] url"),
            ("[store]\nurl = \"host=/tmp\"\npassword_file = \"/nonexistent/pw\"\n", "password_file"),
            ("[store]\nurl = \"host=/tmp\"\nca_file = \"/nonexistent/ca.pem\"\n", "ca_file"),
        ] {
            let f = file(text);
            let err = format!("{:#}", Settings::resolve(Some(f.path()), Flags::default()).unwrap_err());
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
