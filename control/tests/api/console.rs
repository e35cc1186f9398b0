//! The web console in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromedriver). Log in with an API token, see the enrolled node, submit a job from the form,
//! watch its result appear, log out; a viewer sees no submit form and a forged post gets 403;
//! a form without the CSRF token, a session cookie replayed after logout and a URL of another
//! organisation's job are refused. Screenshots (1280×800) of the overview and a job page are
//! saved under the test's temp dir, and into docs/console/ with OUTPOST_SCREENSHOTS=1.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost_control::testing::TestServer;
use outpost_protocol::{Outcome, Role};
use reqwest::StatusCode;

use crate::support::{TestNode, https, report_for, submit};
use crate::webdriver::Browser;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// chromedriver on a free port, or None (with the reason) where the browser is not installed.
async fn chromedriver() -> Option<(Driver, u16)> {
    if Command::new("chromedriver").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromedriver is missing; scripts/test installs chromium-driver"
        );
        eprintln!("SKIPPED: chromium and chromium-driver are not installed (Debian packages)");
        return None;
    }
    let port = free_port();
    let driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts"),
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((driver, port));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not listen on port {port}");
}

async fn browser(port: u16) -> Browser {
    Browser::start(
        port,
        &[
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            // The control plane's CA is the test's own; the browser is not told about it.
            "--ignore-certificate-errors",
            "--window-size=1280,800",
        ],
    )
    .await
}

/// The path the browser is on once it has left `from` (a click's navigation is not awaited).
async fn path_after(c: &Browser, from: &str) -> String {
    for _ in 0..100 {
        let path = c.path().await;
        if path != from {
            return path;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the browser stayed on {from}");
}

async fn log_in(c: &Browser, base: &str, token: &str) {
    c.goto(&format!("{base}/console/login")).await;
    c.type_into("token", token).await;
    c.click("login").await;
    assert_eq!(path_after(c, "/console/login").await, "/console", "logged in");
}

/// Sizes the window so that the page itself (the viewport) is `w`×`h`.
async fn size_viewport(c: &Browser, w: u32, h: u32) {
    c.set_window_size(w, h).await;
    let inner = c.execute("return [window.innerWidth, window.innerHeight]").await;
    let (iw, ih) = (inner[0].as_u64().expect("width") as u32, inner[1].as_u64().expect("height") as u32);
    c.set_window_size(w + w.saturating_sub(iw), h + h.saturating_sub(ih)).await;
}

async fn shot(c: &Browser, name: &str) {
    let png = c.screenshot().await;
    let mut dirs = vec![PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console")];
    if std::env::var_os("OUTPOST_SCREENSHOTS").is_some() {
        dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/console"));
    }
    for dir in dirs {
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(name), &png).expect("screenshot written");
    }
    // A PNG of the viewport's size: the width and height words of the IHDR chunk.
    let w = u32::from_be_bytes(png[16..20].try_into().expect("width"));
    let h = u32::from_be_bytes(png[20..24].try_into().expect("height"));
    assert_eq!((w, h), (1280, 800), "screenshot {name}");
}

/// A raw form post with the given session cookie: what a forged or replayed request sends.
async fn post_form(server: &TestServer, path: &str, cookie: &str, form: &[(&str, &str)]) -> StatusCode {
    let body = form.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    https(server.ca_pem(), None)
        .post(format!("{}{path}", server.url()))
        .header("cookie", format!("outpost_session={cookie}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("sent")
        .status()
}

async fn get_with(server: &TestServer, path: &str, cookie: &str) -> (StatusCode, Option<String>, String) {
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(outpost_control::tls::client_config(server.ca_pem(), None).expect("tls"))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = http
        .get(format!("{}{path}", server.url()))
        .header("cookie", format!("outpost_session={cookie}"))
        .send()
        .await
        .expect("sent");
    let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
    (resp.status(), location, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_submits_a_job_and_sees_its_result_in_a_real_browser() {
    let Some((_driver, port)) = chromedriver().await else { return };
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("owner");
    let org = op.create_org("clinic-a").await.expect("org");
    let token = op.create_token(&org.id, None).await.expect("enrollment token");
    let node = TestNode::enroll(&server, &token.token).await;
    let operator = op.create_api_token(&org.id, "alice", Role::Operator, None).await.expect("token").token;
    let viewer = op.create_api_token(&org.id, "bob", Role::Viewer, None).await.expect("token").token;
    let admin = op.create_api_token(&org.id, "carol", Role::Admin, None).await.expect("token").token;
    let deploy = serde_json::json!({
        "name": "web", "org_id": org.id, "selector": "site=x",
        "spec": {"image": format!("sha256:{}", "cd".repeat(32)), "command": ["sh", "-c", "sleep 3600"]},
    });
    let deployments = outpost_protocol::paths::fill(outpost_protocol::paths::DEPLOYMENTS, "org_id", &org.id);
    let (status, body) = crate::support::op_post(&server, &deployments, &deploy).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Another organisation's job, which A's people must not see.
    let other = op.create_org("clinic-b").await.expect("org");
    let other_token = op.create_token(&other.id, None).await.expect("token");
    let other_node = TestNode::enroll(&server, &other_token.token).await;
    let hidden = submit(&op, other_node.id()).await;

    let base = server.url();
    let c = browser(port).await;
    size_viewport(&c, 1280, 800).await;
    log_in(&c, &base, &operator).await;
    let overview = c.source().await;
    assert!(overview.contains("nodes online"), "{overview}");
    shot(&c, "overview.png").await;

    c.goto(&format!("{base}/console/nodes")).await;
    let nodes = c.source().await;
    assert!(nodes.contains(node.id()), "the enrolled node is listed");
    assert!(!nodes.contains(other_node.id()), "another organisation's node is not");

    c.goto(&format!("{base}/console/jobs")).await;
    c.type_into("node_id", node.id()).await;
    let image = format!("sha256:{}", "ab".repeat(32));
    c.type_into("image", &image).await;
    c.type_into("command", "echo from the console").await;
    c.click("submit").await;
    let path = path_after(&c, "/console/jobs").await;
    let job_id = path.strip_prefix("/console/jobs/").expect("on the job's page").to_owned();
    assert_eq!(c.text("job-state").await, "queued");

    // The node takes the job and reports; the page shows the result.
    let polled = node.poll(&[], 0).await;
    let assignment =
        polled.jobs.iter().find(|a| a.job_id == job_id).expect("the console's job reached the node");
    let mut report = report_for(assignment, Outcome::Succeeded);
    report.stdout_tail = "from the console\n".into();
    report.timings.finished_unix_ms = Some(server.clock().now_ms());
    let (status, _) = node.report(&report).await;
    assert_eq!(status, StatusCode::OK);
    c.refresh().await;
    assert_eq!(c.text("job-outcome").await, "succeeded");
    assert!(c.text("stdout").await.contains("from the console"));
    shot(&c, "job.png").await;

    // Label the node from its page; the deployment, the events and the settings pages.
    c.goto(&format!("{base}/console/nodes/{}", node.id())).await;
    c.type_into("label-set", "room=b12").await;
    c.click("label").await;
    let mut labelled = false;
    for _ in 0..100 {
        if c.source().await.contains("room=b12") {
            labelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(labelled, "the label shows on the node's page");
    c.goto(&format!("{base}/console/deployments")).await;
    assert!(c.source().await.contains("/console/deployments/"), "the deployment is listed");
    c.goto(&format!("{base}/console/deployments/{}/web", org.id)).await;
    assert!(c.find("deployment-nodes").await.is_some());
    c.goto(&format!("{base}/console/events")).await;
    assert!(c.source().await.contains("Relay events"));
    c.goto(&format!("{base}/console/settings")).await;
    assert!(c.find("org-settings").await.is_some(), "the organisation's settings are shown to every role");
    assert!(c.find("save-org-settings").await.is_none(), "only admins change them");
    assert!(!c.source().await.contains("bob"), "API tokens are for admins");

    // Another organisation's job: as if it did not exist.
    c.goto(&format!("{base}/console/jobs/{}", hidden.job_id)).await;
    assert!(c.source().await.contains("404"), "another organisation's job is a 404");

    // The audit trail names the person's token.
    c.goto(&format!("{base}/console/audit")).await;
    assert!(c.source().await.contains("token:alice/"));

    // Log out; the old cookie no longer opens anything.
    let session = c.cookie("outpost_session").await.expect("session cookie");
    c.click("logout").await;
    assert_eq!(path_after(&c, "/console/audit").await, "/console/login");
    let (status, location, _) = get_with(&server, "/console", &session).await;
    assert_eq!(
        (status, location.as_deref()),
        (StatusCode::SEE_OTHER, Some("/console/login")),
        "a replayed cookie"
    );

    // A viewer: no submit form, and a forged post with a valid session and CSRF token is 403.
    log_in(&c, &base, &viewer).await;
    c.goto(&format!("{base}/console/jobs")).await;
    assert!(c.find("submit-job").await.is_none(), "a viewer sees no submit form");
    let viewer_session = c.cookie("outpost_session").await.expect("cookie");
    let (_, _, page) = get_with(&server, "/console/jobs", &viewer_session).await;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the logout form's csrf");
    let forged = [("csrf", csrf), ("node_id", node.id()), ("image", image.as_str()), ("command", "id")];
    assert_eq!(post_form(&server, "/console/jobs", &viewer_session, &forged).await, StatusCode::FORBIDDEN);
    // Without the CSRF token, even the operator's own session is refused.
    c.delete_cookies().await;
    log_in(&c, &base, &operator).await;
    let operator_session = c.cookie("outpost_session").await.expect("cookie");
    let no_csrf = [("node_id", node.id()), ("image", image.as_str()), ("command", "id")];
    assert_eq!(post_form(&server, "/console/jobs", &operator_session, &no_csrf).await, StatusCode::FORBIDDEN);
    // An admin creates an enrollment token from the settings page; it is shown once.
    c.delete_cookies().await;
    log_in(&c, &base, &admin).await;
    c.goto(&format!("{base}/console/settings")).await;
    assert!(c.source().await.contains("bob"), "the organisation's API tokens are listed");
    c.click("create-enrollment-token").await;
    let mut shown = String::new();
    for _ in 0..100 {
        if c.find("enrollment-token").await.is_some() {
            shown = c.text("enrollment-token").await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh = shown.rsplit(' ').next().unwrap_or_default().to_owned();
    assert!(fresh.starts_with("opt_"), "{shown}");
    // The admin turns inference off for the organisation's nodes from the same page.
    c.click("off-inference").await;
    c.click("save-org-settings").await;
    let mut saved = false;
    for _ in 0..100 {
        if c.source().await.contains("Revision 1") {
            saved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saved, "the page shows the new revision");
    let settings = op.org_settings(&org.id).await.expect("settings");
    assert_eq!(settings.features_off, ["inference"], "{settings:?}");
    let enrolled = TestNode::enroll(&server, &fresh).await;
    assert!(!enrolled.id().is_empty(), "the token from the console enrolls a node");
    let q = outpost_control::client::JobsQuery {
        node_id: Some(node.id().to_owned()),
        state: None,
        group_id: None,
        limit: 100,
    };
    assert_eq!(op.jobs(&q).await.expect("jobs").jobs.len(), 1, "no refused post made a job");
    c.close().await;
}

#[tokio::test]
async fn console_answers_are_hardened() {
    let server = TestServer::start().await.expect("server");
    let resp = https(server.ca_pem(), None)
        .get(format!("{}/console/login", server.url()))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    let csp = h["content-security-policy"].to_str().expect("csp");
    assert!(csp.contains("default-src 'none'") && !csp.contains("script-src"), "{csp}");
    assert_eq!(h["cache-control"], "no-store");
    let cookie = h["set-cookie"].to_str().expect("cookie");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let page = resp.text().await.expect("body");
    assert!(!page.contains("<script"), "no script anywhere");
    // Not logged in: every page sends the browser to the login form.
    let (status, location, _) = get_with(&server, "/console/jobs", "not-a-session").await;
    assert_eq!((status, location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/login")));
}

/// Logs in over plain HTTP as a browser would (the login form's nonce, then the token): the
/// session cookie.
async fn http_login(server: &TestServer, token: &str) -> String {
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(outpost_control::tls::client_config(server.ca_pem(), None).expect("tls"))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let form = http.get(format!("{}/console/login", server.url())).send().await.expect("sent");
    let nonce_cookie =
        form.headers()["set-cookie"].to_str().expect("cookie").split(';').next().expect("pair").to_owned();
    let page = form.text().await.expect("page");
    let nonce =
        page.split("name=\"nonce\" value=\"").nth(1).and_then(|r| r.split('"').next()).expect("nonce");
    let resp = http
        .post(format!("{}/console/login", server.url()))
        .header("cookie", nonce_cookie)
        .form(&[("nonce", nonce), ("token", token)])
        .send()
        .await
        .expect("sent");
    let set = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("outpost_session="))
        .expect("a session cookie")
        .to_owned();
    set.trim_start_matches("outpost_session=").split(';').next().expect("value").to_owned()
}

#[tokio::test]
async fn a_nodes_page_shows_whether_its_audit_chain_is_whole() {
    use outpost_protocol::AuditRecord;
    let server = TestServer::start().await.expect("server");
    let (org, token) = crate::support::org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let session = http_login(&server, server.admin_token()).await;
    let page = format!("/console/nodes/{}", node.id());
    let (status, _, html) = get_with(&server, &page, &session).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains("no entries stored yet"), "{html}");

    let mut chain: Vec<AuditRecord> = Vec::new();
    for i in 0..5 {
        chain.push(AuditRecord::following(chain.last(), 10 + i, "job.accepted", &format!("job {i}")));
    }
    crate::bundles::import_audit(&server, &node, &org, "r-chain", chain).await;
    let (_, _, html) = get_with(&server, &page, &session).await;
    assert!(html.contains("✔ 5 entries, each following the one before from the first"), "{html}");
}
