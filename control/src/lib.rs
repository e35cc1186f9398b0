//! The Outpost control plane as a library: `main.rs` parses arguments and calls [`cli::run`];
//! [`serve`] runs the API server; [`testing`] starts a real one in-process for tests.
//!
//! Layout: `api/` (router, handlers, extractors, OpenAPI), `server` (TLS listener),
//! `store/` (the StateStore port: sled and in-memory adapters), `pki/` (the CA), `signing`
//! (org job-signing keys), `data_dir` (keys and certificates on disk), `cli/` and `client`
//! (the operator CLI).

#![forbid(unsafe_code)]

pub mod api;
pub mod authority;
pub mod cli;
pub mod client;
pub mod clock;
pub mod console;
pub mod data_dir;
pub mod longpoll;
pub mod metrics;
pub mod pki;
pub mod revocation;
pub mod server;
pub mod signing;
pub mod store;
pub mod testing;
pub mod tls;

pub use server::{RunningServer, ServeError, ServerConfig, serve};
