//! Wire types shared by the Outpost node agent (`outpost`) and the control plane
//! (`outpost-control`), API version 1.
//!
//! This crate owns the shape of every request and response and nothing else: no I/O, no
//! crypto, no clocks. Every type refuses unknown fields so that a typo or a newer peer's field
//! is an error, never a silent drop. Times are Unix milliseconds (UTC).

#![forbid(unsafe_code)]

mod access;
mod audit;
mod bundle;
pub mod doctor;
mod enroll;
mod error;
mod event;
mod inference;
mod job;
mod logs;
mod model;
mod node;
mod offline;
pub mod paths;
#[cfg(feature = "progress")]
pub mod progress;
mod report;
pub mod seal;
pub mod selector;
mod service;
mod settings;
mod trust;

pub use access::*;
pub use audit::*;
pub use bundle::*;
pub use enroll::*;
pub use error::*;
pub use event::*;
pub use inference::*;
pub use job::*;
pub use logs::*;
pub use model::*;
pub use node::*;
pub use offline::*;
pub use report::*;
pub use selector::{Labels, Selector, SelectorError};
pub use service::*;
pub use settings::*;
pub use trust::*;

/// The name a value of a wire enum has on the wire (`timed_out`, `rolled_back`): the one
/// operators see in JSON, and so in messages, audit entries and tables. Empty for a value that
/// is not a string on the wire.
pub fn wire_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The API version every path is prefixed with.
pub const API_VERSION: &str = "v1";

/// Largest request body the control plane accepts, in bytes (anything larger gets 413).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Most bytes of stdout and of stderr a result report may carry (the tail of each stream).
pub const MAX_OUTPUT_TAIL_BYTES: usize = 64 * 1024;

/// Header carrying the operator's bearer token on operator routes.
pub const AUTHORIZATION: &str = "authorization";

#[cfg(test)]
mod tests;
