//! Stop strings, applied to streamed text the same way for every engine.

/// Holds back streamed text that could be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopFilter {}
