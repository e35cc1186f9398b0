//! The Outpost node agent as a library: `main.rs` only parses arguments and calls in here.

#![forbid(unsafe_code)]

pub mod runtime;
pub mod audit;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod ledger;
pub mod store;
pub mod verify;
