//! The manager (placeholder in this commit).
#[derive(Debug)]
pub struct Manager;
#[derive(Debug)]
pub struct InferenceConfig;
#[derive(Debug)]
pub struct Metrics;
#[derive(Debug)]
pub struct LoadedInfo;
#[derive(Debug)]
pub struct EngineInfo;
#[derive(Debug)]
pub struct GenerateOutcome;
#[derive(Debug)]
pub struct EmbedOutcome;
pub fn available_engines() {}
