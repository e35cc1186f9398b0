//! A small WebDriver client (W3C protocol over plain HTTP to chromedriver on loopback): just
//! what the console's browser tests use.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

/// W3C's key for an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    http: reqwest::Client,
    base: String,
}

impl Browser {
    /// A new headless Chromium session through the chromedriver on `port`.
    pub async fn start(port: u16, args: &[&str]) -> Browser {
        // Plain HTTP to chromedriver, but reqwest still wants a TLS provider chosen.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": args},
        }}});
        let answer: Value = http
            .post(format!("http://127.0.0.1:{port}/session"))
            .json(&caps)
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("JSON");
        let id = answer["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {answer}"));
        Browser { http, base: format!("http://127.0.0.1:{port}/session/{id}") }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let ok = resp.status().is_success();
        let value: Value = resp.json().await.map_err(|e| e.to_string())?;
        if ok { Ok(value["value"].clone()) } else { Err(value["value"].to_string()) }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body))
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    pub async fn refresh(&self) {
        self.post("/refresh", json!({})).await;
    }

    /// The path of the page shown now.
    pub async fn path(&self) -> String {
        let url = self.get("/url").await;
        let url = url.as_str().expect("a URL");
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        rest.find('/')
            .map_or("/".to_owned(), |i| rest[i..].split(['?', '#']).next().unwrap_or("/").to_owned())
    }

    pub async fn source(&self) -> String {
        self.get("/source").await.as_str().unwrap_or_default().to_owned()
    }

    /// The element with this id, if the page has one.
    pub async fn find(&self, id: &str) -> Option<String> {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": format!("#{id}")})),
            )
            .await
            .ok()?;
        found[ELEMENT].as_str().map(str::to_owned)
    }

    async fn element(&self, id: &str) -> String {
        match self.find(id).await {
            Some(e) => e,
            None => panic!("no element #{id} on {}", self.source().await),
        }
    }

    pub async fn type_into(&self, id: &str, text: &str) {
        let e = self.element(id).await;
        self.post(&format!("/element/{e}/value"), json!({"text": text})).await;
    }

    pub async fn click(&self, id: &str) {
        let e = self.element(id).await;
        self.post(&format!("/element/{e}/click"), json!({})).await;
    }

    pub async fn text(&self, id: &str) -> String {
        let e = self.element(id).await;
        self.get(&format!("/element/{e}/text")).await.as_str().unwrap_or_default().to_owned()
    }

    pub async fn cookie(&self, name: &str) -> Option<String> {
        let c = self.call(reqwest::Method::GET, &format!("/cookie/{name}"), None).await.ok()?;
        c["value"].as_str().map(str::to_owned)
    }

    pub async fn delete_cookies(&self) {
        self.call(reqwest::Method::DELETE, "/cookie", None).await.expect("cookies deleted");
    }

    pub async fn execute(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": []})).await
    }

    pub async fn set_window_size(&self, w: u32, h: u32) {
        self.post("/window/rect", json!({"width": w, "height": h})).await;
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let b64 = self.get("/screenshot").await;
        base64::engine::general_purpose::STANDARD.decode(b64.as_str().expect("base64")).expect("PNG")
    }

    pub async fn close(self) {
        let _ = self.call(reqwest::Method::DELETE, "", None).await;
    }
}
