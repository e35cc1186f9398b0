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

use fantoccini::{Client, ClientBuilder, Locator};
use outpost_control::testing::TestServer;
use outpost_protocol::{Outcome, Role};
use reqwest::StatusCode;

use crate::support::{TestNode, https, report_for, submit};

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

async fn browser(port: u16) -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({"args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            // The control plane's CA is the test's own; the browser is not told about it.
            "--ignore-certificate-errors", "--window-size=1280,800",
        ]}),
    );
    ClientBuilder::rustls()
        .expect("TLS for the WebDriver connection")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a browser session")
}

async fn log_in(c: &Client, base: &str, token: &str) {
    c.goto(&format!("{base}/console/login")).await.expect("login page");
    let field = match c.find(Locator::Id("token")).await {
        Ok(f) => f,
        Err(e) => panic!("no token field ({e}) on {}", c.source().await.unwrap_or_default()),
    };
    field.send_keys(token).await.expect("typed");
    c.find(Locator::Id("login")).await.expect("login button").click().await.expect("clicked");
    assert_eq!(path_after(c, "/console/login").await, "/console", "logged in");
}

/// The path the browser is on once it has left `from` (a click's navigation is not awaited).
async fn path_after(c: &Client, from: &str) -> String {
    for _ in 0..100 {
        let path = c.current_url().await.expect("url").path().to_owned();
        if path != from {
            return path;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the browser stayed on {from}");
}

/// Sizes the window so that the page itself (the viewport) is `w`×`h`.
async fn size_viewport(c: &Client, w: u32, h: u32) {
    c.set_window_size(w, h).await.expect("window size");
    let inner = c.execute("return [window.innerWidth, window.innerHeight]", vec![]).await.expect("viewport");
    let (iw, ih) = (inner[0].as_u64().expect("width") as u32, inner[1].as_u64().expect("height") as u32);
    c.set_window_size(w + w.saturating_sub(iw), h + h.saturating_sub(ih)).await.expect("window size");
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let mut dirs = vec![PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console")];
    if std::env::var_os("OUTPOST_SCREENSHOTS").is_some() {
        dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/console"));
    }
    for dir in dirs {
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(name), &png).expect("screenshot written");
    }
    // A PNG of the window's size: the width and height words of the IHDR chunk.
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().expect("w")),
        u32::from_be_bytes(png[20..24].try_into().expect("h")),
    );
    assert_eq!((w, h), (1280, 800), "screenshot {name}");
}

/// A raw form post with the given cookie: what a forged or replayed request sends.
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
    // Another organisation's job, which A's people must not see.
    let other = op.create_org("clinic-b").await.expect("org");
    let other_token = op.create_token(&other.id, None).await.expect("token");
    let other_node = TestNode::enroll(&server, &other_token.token).await;
    let hidden = submit(&op, other_node.id()).await;

    let base = server.url();
    let c = browser(port).await;
    size_viewport(&c, 1280, 800).await;
    log_in(&c, &base, &operator).await;
    let overview = c.source().await.expect("page");
    assert!(overview.contains("nodes online"), "{overview}");
    shot(&c, "overview.png").await;

    c.goto(&format!("{base}/console/nodes")).await.expect("nodes");
    let nodes = c.source().await.expect("page");
    assert!(nodes.contains(node.id()), "the enrolled node is listed");
    assert!(!nodes.contains(other_node.id()), "another organisation's node is not");

    c.goto(&format!("{base}/console/jobs")).await.expect("jobs");
    c.find(Locator::Id("node_id")).await.expect("form").send_keys(node.id()).await.expect("typed");
    let image = format!("sha256:{}", "ab".repeat(32));
    c.find(Locator::Id("image")).await.expect("form").send_keys(&image).await.expect("typed");
    c.find(Locator::Id("command"))
        .await
        .expect("form")
        .send_keys("echo from the console")
        .await
        .expect("typed");
    c.find(Locator::Id("submit")).await.expect("submit").click().await.expect("clicked");
    let path = path_after(&c, "/console/jobs").await;
    let job_id = path.strip_prefix("/console/jobs/").expect("on the job's page").to_owned();
    assert_eq!(c.find(Locator::Id("job-state")).await.expect("state").text().await.expect("text"), "queued");

    // The node takes the job and reports; the page shows the result.
    let polled = node.poll(&[], 0).await;
    let assignment =
        polled.jobs.iter().find(|a| a.job_id == job_id).expect("the console's job reached the node");
    let mut report = report_for(assignment, Outcome::Succeeded);
    report.stdout_tail = "from the console\n".into();
    report.timings.finished_unix_ms = Some(server.clock().now_ms());
    let (status, _) = node.report(&report).await;
    assert_eq!(status, StatusCode::OK);
    c.refresh().await.expect("reload");
    assert_eq!(
        c.find(Locator::Id("job-outcome")).await.expect("outcome").text().await.expect("text"),
        "succeeded"
    );
    assert!(
        c.find(Locator::Id("stdout"))
            .await
            .expect("stdout")
            .text()
            .await
            .expect("text")
            .contains("from the console")
    );
    shot(&c, "job.png").await;

    // Another organisation's job: as if it did not exist.
    c.goto(&format!("{base}/console/jobs/{}", hidden.job_id)).await.expect("page");
    assert!(c.source().await.expect("page").contains("404"), "another organisation's job is a 404");

    // The audit trail names the person's token.
    c.goto(&format!("{base}/console/audit")).await.expect("audit");
    assert!(c.source().await.expect("page").contains("token:alice/"));

    // Log out; the old cookie no longer opens anything.
    let session = c.get_named_cookie("outpost_session").await.expect("session cookie").value().to_owned();
    c.find(Locator::Id("logout")).await.expect("logout").click().await.expect("clicked");
    assert_eq!(path_after(&c, "/console/audit").await, "/console/login");
    let (status, location, _) = get_with(&server, "/console", &session).await;
    assert_eq!(
        (status, location.as_deref()),
        (StatusCode::SEE_OTHER, Some("/console/login")),
        "a replayed cookie"
    );

    // A viewer: no submit form, and a forged post with a valid session and CSRF token is 403.
    log_in(&c, &base, &viewer).await;
    c.goto(&format!("{base}/console/jobs")).await.expect("jobs");
    assert!(c.find(Locator::Id("submit-job")).await.is_err(), "a viewer sees no submit form");
    let viewer_session = c.get_named_cookie("outpost_session").await.expect("cookie").value().to_owned();
    let (_, _, page) = get_with(&server, "/console/jobs", &viewer_session).await;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the logout form's csrf");
    let forged = [("csrf", csrf), ("node_id", node.id()), ("image", image.as_str()), ("command", "id")];
    assert_eq!(post_form(&server, "/console/jobs", &viewer_session, &forged).await, StatusCode::FORBIDDEN);
    // Without the CSRF token, even the operator's own session is refused.
    c.delete_all_cookies().await.expect("cookies cleared");
    log_in(&c, &base, &operator).await;
    let operator_session = c.get_named_cookie("outpost_session").await.expect("cookie").value().to_owned();
    let no_csrf = [("node_id", node.id()), ("image", image.as_str()), ("command", "id")];
    assert_eq!(post_form(&server, "/console/jobs", &operator_session, &no_csrf).await, StatusCode::FORBIDDEN);
    let q = outpost_control::client::JobsQuery {
        node_id: Some(node.id().to_owned()),
        state: None,
        group_id: None,
        limit: 100,
    };
    assert_eq!(op.jobs(&q).await.expect("jobs").jobs.len(), 1, "no refused post made a job");
    c.close().await.expect("browser closed");
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
