//! The Outpost node agent as a library: `main.rs` only parses arguments and calls in here.

#![forbid(unsafe_code)]

pub mod agent;
pub mod approvals;
pub mod audit;
pub mod backoff;
pub mod bundle;
pub mod clock;
pub mod config;
pub mod doctor;
pub mod identity;
pub mod inference;
pub mod intake;
pub mod inventory;
pub mod jobdata;
pub mod ledger;
pub mod models;
pub mod objstore;
pub mod offline_enroll;
pub mod org_settings;
#[cfg(test)]
mod parsers_props;
pub mod policy;
pub mod relay;
pub mod rotation;
pub mod runtime;
pub mod services;
pub mod status;
pub mod store;
pub mod tls;
pub mod trust;
pub mod uplink;
pub mod verify;
