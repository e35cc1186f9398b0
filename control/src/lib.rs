//! The Outpost control plane as a library: `main.rs` parses arguments and calls in here, and
//! tests start a real server in-process with [`server::start_for_tests`].

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod client;
pub mod clock;
pub mod data_dir;
pub mod longpoll;
pub mod pki;
pub mod server;
pub mod signing;
pub mod store;
pub mod tls;
