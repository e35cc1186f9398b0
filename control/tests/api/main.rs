//! The control plane's HTTP API, tested against a real server started in-process: TLS 1.3 on
//! 127.0.0.1, a temporary data directory, the sled store. One test binary, one module per
//! concern.

// Helpers outside #[test] fns panic on purpose: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::panic)]

mod audit_uplink;
mod auth;
mod bundles;
mod console;
mod deployments;
mod dispatch;
mod enrollment;
mod events;
mod fleet;
mod limits;
mod logs;
mod metrics;
mod openapi;
mod props;
mod renewal;
mod replicas;
mod restart;
mod results;
mod revocation;
mod roles;
mod rotation;
mod sealed;
mod settings;
mod support;
mod triggers;
mod webdriver;
