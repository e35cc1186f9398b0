//! `outpost doctor`: why this box is, or is not, working. Each check says ✔ (fine), ⚠ (works,
//! but look at it) or ✘ (broken), with one line on how to fix it; any ✘ makes the exit code 1.
//!
//! Read-only except for the object-store check, which writes, reads back and removes one probe
//! object under `.outpost/`.

use std::path::Path;
use std::time::{Duration, SystemTime};

pub use outpost_protocol::doctor::{Check, Report, Verdict};

use crate::config::Config;
use crate::identity::Identity;

/// How long one network or engine check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Clock skew against the control plane beyond which a warning is due, and beyond which
/// certificates and signed manifests start to be refused.
const SKEW_WARN_SECS: i64 = 30;
const SKEW_FAIL_SECS: i64 = 300;
/// A renewal overdue by more than this is a warning: the agent renews two thirds into the
/// certificate's life and retries for at most an hour between attempts.
const RENEWAL_GRACE_SECS: i64 = 86_400;

/// The report when the configuration itself does not load: nothing else can be checked.
pub fn config_failed(err: &anyhow::Error) -> Report {
    Report::new(vec![Check::fail(
        "config",
        format!("the configuration does not load: {err:#}"),
        "fix the key it names (`outpost check-config` shows the merged result once it loads)",
    )])
}

/// Runs every check against `cfg` (loaded from `sources`).
pub async fn run(cfg: &Config, sources: &[String]) -> Report {
    let mut checks = vec![Check::ok(
        "config",
        if sources.is_empty() {
            "valid (built-in defaults)".to_owned()
        } else {
            format!("valid, merged from {}", sources.join(", "))
        },
    )];
    let identity = Identity::load(&cfg.identity_dir());
    checks.push(identity_check(&identity, now_unix_s()));
    match &identity {
        // An air-gapped node never dials out, not even for the doctor.
        Ok(_) if !cfg.control.uplink => {
            let off = "not checked: [control] uplink = false (bundles are the only link)";
            checks.push(Check::ok("control", off));
            checks.push(Check::ok("clock", format!("{off}; keep the clock right for the trust window")));
        }
        Ok(id) => {
            let (control, skew) = control_check(cfg, id).await;
            checks.push(control);
            checks.push(skew);
        }
        Err(_) => {
            checks.push(Check::warn("control", "not checked: not enrolled", "enroll first"));
            checks.push(Check::warn("clock", "not checked: not enrolled", "enroll first"));
        }
    }
    checks.push(docker_check(cfg).await);
    checks.push(disk_check(&cfg.data_dir));
    checks.push(object_store_check(cfg).await);
    checks.push(models_check(cfg));
    checks.push(engines_check());
    checks.push(hardening_check(cfg));
    Report::new(checks)
}

fn now_unix_s() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn identity_check(identity: &Result<Identity, crate::identity::IdentityError>, now: i64) -> Check {
    let id = match identity {
        Ok(id) => id,
        Err(e) => {
            return Check::fail(
                "identity",
                e.to_string(),
                "`outpost enroll --control URL --token-file FILE --ca-fingerprint SHA256` (or --offline on an air-gapped site)",
            );
        }
    };
    let who = format!("node {} of org {}", id.node.node_id, id.node.org_id);
    let (starts, ends) = match crate::identity::validity(&id.cert_pem) {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                "identity",
                format!("{who}: the certificate does not parse: {e}"),
                "enroll again with --force",
            );
        }
    };
    let days = (ends - now).div_euclid(86_400);
    if ends <= now {
        Check::fail(
            "identity",
            format!("{who}: the certificate expired {} days ago", -days),
            "enroll again with a new token (`outpost enroll --force …`); check the clock first",
        )
    } else if now > outpost_protocol::renew_at(starts, ends).saturating_add(RENEWAL_GRACE_SECS) {
        Check::warn(
            "identity",
            format!("{who}: the certificate expires in {days} days and is overdue for renewal"),
            "the running agent renews it two thirds into its life: check that it runs and reaches the control \
             plane (`outpost status`), or run `outpost identity rotate`; a control plane too old to renew needs \
             `outpost enroll --force` with a new token before it expires",
        )
    } else {
        let renew_in = outpost_protocol::renew_at(starts, ends).saturating_sub(now).max(0).div_euclid(86_400);
        Check::ok(
            "identity",
            format!("{who}; the certificate expires in {days} days (the agent renews it in {renew_in} days)"),
        )
    }
}

/// Reaches the control plane over mutual TLS with the CA pinned at enrollment, and reads its
/// clock from the answer's `Date` header.
async fn control_check(cfg: &Config, id: &Identity) -> (Check, Check) {
    let url = cfg.control.url.clone().unwrap_or_else(|| id.node.control_url.clone());
    let not_checked =
        |why: &str| Check::warn("clock", format!("not checked: {why}"), "fix the control plane check first");
    let tls = match crate::tls::node_client_config(&id.ca_pem, &id.cert_pem, &id.key_pem) {
        Ok(t) => t,
        Err(e) => {
            return (
                Check::fail(
                    "control",
                    format!("the identity's keys do not load: {e}"),
                    "enroll again with --force",
                ),
                not_checked("no TLS"),
            );
        }
    };
    let client = match reqwest::Client::builder().use_preconfigured_tls(tls).timeout(CHECK_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            return (Check::fail("control", e.to_string(), "report this as a bug"), not_checked("no client"));
        }
    };
    let health = format!("{}{}", url.trim_end_matches('/'), outpost_protocol::paths::HEALTH);
    let asked = now_unix_s();
    let resp = match client.get(&health).send().await {
        Ok(r) => r,
        Err(e) => {
            let text = format!("{e:?}");
            let fix = if text.contains("CertificateRevoked") {
                "an operator of the control plane revoked this node: its certificate is refused for good. Enroll \
                 the box again with a new enrollment token (`outpost enroll`); it gets a new node id"
            } else if text.contains("UnknownIssuer")
                || text.contains("certificate")
                || text.contains("Certificate")
            {
                "the server's certificate is not from the CA pinned at enrollment (or a clock far off makes it \
                 look invalid): check [control] url, the clock, or enroll again against the right control plane"
            } else {
                "check [control] url, DNS, routes and firewalls from this box to the control plane (outbound HTTPS)"
            };
            return (
                Check::fail("control", format!("{url} cannot be reached over TLS: {}", error_chain(&e)), fix),
                not_checked("the control plane did not answer"),
            );
        }
    };
    let status = resp.status();
    let date = resp.headers().get(reqwest::header::DATE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let version = resp.json::<outpost_protocol::Health>().await.map(|h| h.version).unwrap_or_default();
    let control = if status.is_success() {
        Check::ok("control", format!("{url} answers over TLS with the pinned CA (version {version})"))
    } else {
        Check::fail(
            "control",
            format!("{url} answered {status}"),
            "check [control] url: is it an Outpost control plane?",
        )
    };
    let skew = match date.as_deref().and_then(|d| httpdate::parse_http_date(d).ok()) {
        None => {
            Check::warn("clock", "the control plane's answer carries no Date header", "nothing to do here")
        }
        Some(theirs) => {
            let theirs = theirs.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            // The server's clock read somewhere between asking and the answer, rounded down to
            // the second by the Date header: compare with the middle of that window, and call
            // anything within a second no skew at all.
            let middle = (asked + now_unix_s()) / 2;
            let raw = middle - theirs;
            let skew = if raw.abs() <= 1 { 0 } else { raw - raw.signum() };
            let said = format!(
                "this clock is {} s {} the control plane's",
                skew.abs(),
                if skew >= 0 { "ahead of" } else { "behind" }
            );
            if skew.abs() > SKEW_FAIL_SECS {
                Check::fail(
                    "clock",
                    said,
                    "set the clock (chrony or systemd-timesyncd against a site NTP server): certificates, \
                     signed jobs and bundles are checked against it",
                )
            } else if skew.abs() > SKEW_WARN_SECS {
                Check::warn("clock", said, "keep the clock in sync (chrony or systemd-timesyncd)")
            } else {
                Check::ok("clock", said)
            }
        }
    };
    (control, skew)
}

/// The error and its causes on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

async fn docker_check(cfg: &Config) -> Check {
    let fix = "start the engine (`systemctl start docker`), or point [docker] socket at it; the agent's user needs \
               access to the socket";
    let probe = async {
        let runtime =
            crate::runtime::docker::DockerRuntime::connect("doctor", cfg.docker.socket.as_deref()).await?;
        runtime.engine_facts().await
    };
    match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
        Err(_) => Check::fail(
            "docker",
            format!("the engine did not answer within {} s", CHECK_TIMEOUT.as_secs()),
            fix,
        ),
        Ok(Err(e)) => Check::fail("docker", e.to_string(), fix),
        Ok(Ok(f)) => {
            let confinement = match (f.seccomp(), f.apparmor()) {
                (true, true) => "containers under its default seccomp and AppArmor profiles",
                (true, false) => "containers under its default seccomp profile",
                (false, true) => "containers under AppArmor but no seccomp profile",
                (false, false) => "containers with no seccomp profile",
            };
            let detail = format!(
                "engine {} reachable, storage driver {}, cgroup v{}, {confinement}",
                f.version,
                if f.storage_driver.is_empty() { "unknown" } else { &f.storage_driver },
                if f.cgroup_version.is_empty() { "?" } else { &f.cgroup_version }
            );
            if f.cgroup_version != "2" {
                Check::warn(
                    "docker",
                    detail,
                    "boot with the unified cgroup hierarchy (cgroup v2): job memory, CPU and pids limits rely on it",
                )
            } else if !f.seccomp() {
                Check::warn(
                    "docker",
                    detail,
                    "use a Docker engine built with seccomp (Debian's docker.io is): without it job containers \
                     can make every system call the kernel offers",
                )
            } else {
                Check::ok("docker", detail)
            }
        }
    }
}

fn disk_check(data_dir: &Path) -> Check {
    outpost_protocol::doctor::disk(data_dir, "the ledger, results and job data live there", |at| {
        nix::sys::statvfs::statvfs(at)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .map_err(|e| e.to_string())
    })
}

async fn object_store_check(cfg: &Config) -> Check {
    use crate::objstore::ObjectStore as _;
    use tokio::io::AsyncReadExt as _;
    let fix = "check [storage]: the fs root must be a writable directory; an S3 endpoint must answer with \
               credentials that may write (see docs/storage.md)";
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let probe = async {
        let store = crate::objstore::AnyStore::open(cfg, &env).await.map_err(|e| e.to_string())?;
        let key = format!(".outpost/doctor-probe-{}", std::process::id());
        let body = b"outpost doctor probe".to_vec();
        store
            .put(&key, std::io::Cursor::new(body.clone()))
            .await
            .map_err(|e| format!("cannot write: {e}"))?;
        let mut back = Vec::new();
        let read = async {
            let mut reader = store.get(&key).await?;
            reader
                .read_to_end(&mut back)
                .await
                .map_err(|e| crate::objstore::ObjectStoreError::io("read back", e))?;
            Ok::<_, crate::objstore::ObjectStoreError>(())
        };
        let read = read.await;
        store.delete(&key).await.map_err(|e| format!("cannot remove the probe {key}: {e}"))?;
        read.map_err(|e| format!("cannot read back: {e}"))?;
        if back != body {
            return Err("what was read back differs from what was written".to_owned());
        }
        Ok::<_, String>(())
    };
    let backend = match cfg.storage.backend {
        crate::config::StorageBackend::Fs => format!("fs at {}", cfg.objects_root().display()),
        crate::config::StorageBackend::S3 => {
            let endpoint = cfg.storage.s3.as_ref().map(|s| s.endpoint.clone()).unwrap_or_default();
            format!("s3 at {endpoint}")
        }
    };
    match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
        Err(_) => Check::fail(
            "object_store",
            format!("{backend}: no answer within {} s", CHECK_TIMEOUT.as_secs()),
            fix,
        ),
        Ok(Err(e)) => Check::fail("object_store", format!("{backend}: {e}"), fix),
        Ok(Ok(())) => {
            Check::ok("object_store", format!("{backend}: written, read back and removed a probe object"))
        }
    }
}

fn models_check(cfg: &Config) -> Check {
    let store = crate::models::ModelStore::new(cfg.models_dir());
    let org = Identity::load(&cfg.identity_dir()).map(|i| i.org_keys).unwrap_or_default();
    let trust = match crate::models::Publishers::new(&org, &cfg.models.trusted_publishers) {
        Ok(t) => t,
        Err(e) => return Check::fail("models", e, "fix [models] trusted_publishers"),
    };
    match store.verify(None, &trust) {
        Err(e) => {
            Check::fail("models", format!("cannot read the model store: {e}"), "check [models] store_dir")
        }
        Ok((checks, broken)) => {
            let damaged: Vec<String> = checks
                .iter()
                .filter(|c| !c.damage.is_empty())
                .map(|c| format!("{}@{}", c.model.manifest.name, c.model.manifest.version))
                .chain(broken.iter().map(|e| e.to_string()))
                .collect();
            if damaged.is_empty() {
                Check::ok(
                    "models",
                    format!("{} models verified (every file hashed, every signature checked)", checks.len()),
                )
            } else {
                Check::fail(
                    "models",
                    format!("damaged or untrusted: {}", damaged.join(", ")),
                    "`outpost models verify` names each file; remove the model and import it again",
                )
            }
        }
    }
}

fn engines_check() -> Check {
    let engines: Vec<String> = crate::inference::built_in_engines()
        .iter()
        .map(|e| format!("{} {}", e.name(), e.version()))
        .collect();
    if engines.is_empty() {
        Check::warn(
            "engines",
            "no inference engine built in: generate and embed jobs are refused",
            "install a build with engines (docs/install.md) if this node should run models",
        )
    } else {
        Check::ok("engines", engines.join(", "))
    }
}

/// The running agent's own hardening, read from /proc: no new privileges, a seccomp filter,
/// no capabilities beyond what it needs.
fn hardening_check(cfg: &Config) -> Check {
    let st = crate::status::read(&cfg.status_file()).ok().filter(|s| crate::status::is_alive(s.pid));
    let Some(st) = st else {
        return Check::warn(
            "hardening",
            "the agent is not running: its hardening cannot be checked",
            "start it (`systemctl start outpost`)",
        );
    };
    let Ok(text) = std::fs::read_to_string(format!("/proc/{}/status", st.pid)) else {
        return Check::warn(
            "hardening",
            format!("cannot read /proc/{}/status", st.pid),
            "run doctor as root",
        );
    };
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned()
    };
    let no_new_privs = field("NoNewPrivs:") == "1";
    let seccomp = field("Seccomp:") == "2";
    let detail = format!(
        "agent pid {}: no_new_privs {}, seccomp filter {}",
        st.pid,
        if no_new_privs { "on" } else { "off" },
        if seccomp { "on" } else { "off" }
    );
    if no_new_privs && seccomp {
        Check::ok("hardening", detail)
    } else {
        Check::warn(
            "hardening",
            detail,
            "run the agent from the packaged systemd unit (outpost.service), which sets NoNewPrivileges and a \
             system-call filter",
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unparsable_certificate_is_a_failure_not_a_panic() {
        assert!(crate::identity::validity("not a certificate").is_err());
        assert!(crate::identity::not_after("").is_err());
    }
}
