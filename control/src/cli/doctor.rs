//! `outpost-control doctor`: the data directory (CA, server certificate, admin token, store),
//! free space, and the server answering over TLS with its own CA. Same marks and exit code as
//! the agent's `outpost doctor`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use outpost_protocol::doctor::{Check, Report};

use super::Global;
use crate::data_dir::DataDir;
use crate::pki::{not_after_unix, pem_to_der, san_names};

const CERT_WARN_DAYS: i64 = 30;

fn now_unix_s() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Days until the PEM certificate at `path` expires, and its DNS/IP names.
fn cert_days(path: &Path, what: &str) -> Result<(i64, Vec<String>), String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let der = pem_to_der(&pem, what).map_err(|e| e.to_string())?;
    let ends = not_after_unix(&der).map_err(|e| e.to_string())?;
    let names = san_names(&der).map(|n| n.into_iter().collect()).unwrap_or_default();
    Ok(((ends - now_unix_s()).div_euclid(86_400), names))
}

fn cert_check(name: &'static str, path: &Path, what: &str, renew: &str) -> Check {
    match cert_days(path, what) {
        Err(e) => Check::fail(name, e, "check --data-dir: `serve` creates it on first start"),
        Ok((days, _)) if days < 0 => Check::fail(name, format!("{what} expired {} days ago", -days), renew),
        Ok((days, names)) => {
            let names = if names.is_empty() { String::new() } else { format!(" for {}", names.join(", ")) };
            let detail = format!("{what}{names} expires in {days} days");
            if days < CERT_WARN_DAYS { Check::warn(name, detail, renew) } else { Check::ok(name, detail) }
        }
    }
}

fn admin_token_check(dir: &DataDir) -> Check {
    let path = dir.admin_token();
    match std::fs::metadata(&path) {
        Err(e) => {
            Check::fail("admin_token", format!("cannot read {}: {e}", path.display()), "check --data-dir")
        }
        Ok(m) if m.permissions().mode() & 0o077 != 0 => Check::warn(
            "admin_token",
            format!("{} is readable by others (mode {:o})", path.display(), m.permissions().mode() & 0o777),
            format!("chmod 600 {}", path.display()),
        ),
        Ok(_) => Check::ok("admin_token", format!("{} present, readable by its owner only", path.display())),
    }
}

fn store_check(dir: &DataDir) -> Check {
    // Opening would create an empty database where there is none: a wrong --data-dir.
    if !dir.db().join("conf").is_file() {
        return Check::fail(
            "store",
            format!("no database at {}", dir.db().display()),
            "check --data-dir: `serve` creates the database on first start",
        );
    }
    match crate::store::SledStore::open(&dir.db()) {
        Ok(_) => Check::ok("store", format!("{} opens (no server holds it now)", dir.db().display())),
        // sled's file lock, held by the running server.
        Err(e) if e.to_string().contains("could not acquire lock") => {
            Check::ok("store", format!("{} is held by the running server", dir.db().display()))
        }
        Err(e) => Check::fail(
            "store",
            e.to_string(),
            "restore the data directory from a backup (see docs/operators.md), or check its permissions",
        ),
    }
}

/// A PostgreSQL store: reachable, at this binary's schema, and how long a round trip takes.
async fn postgres_check(dir: &DataDir, mut options: crate::store::PgOptions) -> Check {
    use crate::store::{PgStore, SCHEMA_VERSION, StateStore as _};
    let db = options.describe();
    options.secret_key = match dir.read_store_key() {
        Ok(Some(key)) => Some(key),
        Ok(None) => {
            return Check::fail(
                "store",
                format!("no store key at {}", dir.store_key().display()),
                "copy store.key from the data directory of a replica that serves this database (the first start creates it)",
            );
        }
        Err(e) => return Check::fail("store", e.to_string(), "restore store.key from a replica or a backup"),
    };
    let migrate = "run `outpost-control migrate --config FILE` with this binary";
    let store = match PgStore::connect(options).await {
        Ok(store) => store,
        Err(e) if e.to_string().contains("newer than this binary") => {
            return Check::fail(
                "store",
                format!("{db}: {e}"),
                "upgrade outpost-control to the version that migrated it",
            );
        }
        Err(e @ crate::store::StoreError::Unreachable(_)) => {
            return Check::fail(
                "store",
                format!("{db}: {e}"),
                "check that PostgreSQL runs and the url, user and password (password_file or OUTPOST_STORE_PASSWORD)",
            );
        }
        Err(e) if e.to_string().contains("store key") => {
            return Check::fail(
                "store",
                format!("{db}: {e}"),
                "copy store.key from the replica that first served it",
            );
        }
        Err(e) => return Check::fail("store", format!("{db}: {e}"), migrate),
    };
    let started = std::time::Instant::now();
    match store.ping().await {
        Ok(()) => Check::ok(
            "store",
            format!(
                "PostgreSQL {db} at schema version {SCHEMA_VERSION}, answers in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            ),
        ),
        Err(e) => Check::fail("store", format!("{db}: {e}"), "check the database server"),
    }
}

fn disk_check(dir: &Path) -> Check {
    outpost_protocol::doctor::disk(dir, "the database and the audit trail live there", |at| {
        nix::sys::statvfs::statvfs(at)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .map_err(|e| e.to_string())
    })
}

async fn server_check(g: &Global, dir: &DataDir) -> Check {
    let fix = "start it (`systemctl start outpost-control`), or give the right --url";
    let ca_path = g.ca_file.clone().unwrap_or_else(|| dir.ca_cert());
    let Ok(ca) = std::fs::read_to_string(&ca_path) else {
        return Check::fail("server", format!("cannot read the CA {}", ca_path.display()), "give --ca-file");
    };
    let client = crate::tls::client_config(&ca, None).map_err(|e| e.to_string()).and_then(|tls| {
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())
    });
    let client = match client {
        Ok(c) => c,
        Err(e) => return Check::fail("server", e, "check the CA file"),
    };
    let url = format!("{}{}", g.url.trim_end_matches('/'), outpost_protocol::paths::HEALTH);
    match client.get(&url).send().await {
        Err(e) => Check::fail("server", format!("{} does not answer over TLS: {e}", g.url), fix),
        Ok(r) if !r.status().is_success() => {
            Check::fail("server", format!("{} answered {}", g.url, r.status()), fix)
        }
        Ok(r) => {
            let version = r.json::<outpost_protocol::Health>().await.map(|h| h.version).unwrap_or_default();
            Check::ok("server", format!("{} answers over TLS with this CA (version {version})", g.url))
        }
    }
}

pub(super) async fn run(
    g: &Global,
    json: bool,
    store: crate::server::StoreChoice,
) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(&g.data_dir);
    let renew_server = "restart the server: it issues itself a new certificate from its CA when the old one is \
                        near its end or lacks a name";
    let checks = vec![
        cert_check(
            "ca",
            &dir.ca_cert(),
            "the CA certificate",
            "rotate the CA well before it ends (`outpost-control ca rotate --overlap 30d`): every node pins it",
        ),
        cert_check("server_cert", &dir.server_cert(), "the server certificate", renew_server),
        admin_token_check(&dir),
        match store {
            crate::server::StoreChoice::Sled => store_check(&dir),
            crate::server::StoreChoice::Postgres(options) => postgres_check(&dir, options).await,
        },
        disk_check(&g.data_dir),
        server_check(g, &dir).await,
    ];
    let report = Report::new(checks);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
