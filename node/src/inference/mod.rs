//! Inference on the node: resolves models of the signed model store to their verified blobs and
//! hands them to the inference manager (budget, LRU, bounded queue), for `generate`/`embed`
//! jobs and for the local OpenAI-compatible endpoint. Models load on first use, never at start.

pub mod api;
pub mod config;
pub mod job;

use std::sync::Arc;

use outpost_inference::{InferenceError, Manager, ModelFiles};

pub use config::{ApiSettings, InferenceSettings, Listen};

use crate::models::{InstalledModel, ModelError, ModelStore};

/// The engines this binary was built with (cargo features `llama`, `candle`).
pub fn built_in_engines() -> Vec<Arc<dyn outpost_inference::InferenceEngine>> {
    #[allow(unused_mut)]
    let mut engines: Vec<Arc<dyn outpost_inference::InferenceEngine>> = Vec::new();
    #[cfg(feature = "llama")]
    match outpost_inference::llama::LlamaEngine::new() {
        Ok(e) => engines.push(Arc::new(e)),
        Err(e) => tracing::error!(error = %e, "the llama engine cannot start; generate jobs will fail"),
    }
    #[cfg(feature = "candle")]
    engines.push(Arc::new(outpost_inference::candle::CandleEngine::new()));
    engines
}

pub struct Inference {
    pub manager: Manager,
    pub models: ModelStore,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference").field("manager", &self.manager).finish_non_exhaustive()
    }
}

impl Inference {
    pub fn new(settings: &InferenceSettings, models: ModelStore) -> Self {
        Self { manager: Manager::new(settings.manager_config(), built_in_engines()), models }
    }

    /// The installed model `selector` names (digest, NAME or NAME@VERSION) as the files the
    /// engines load: each manifest path mapped to its verified blob.
    pub fn resolve(&self, selector: &str) -> Result<(InstalledModel, ModelFiles), InferenceError> {
        let model = self.models.find_one(selector).map_err(|e| match e {
            ModelError::NotFound { .. } => InferenceError::ModelNotPresent(selector.to_string()),
            other => InferenceError::BadRequest(other.to_string()),
        })?;
        let files =
            model.manifest.files.iter().map(|f| (f.path.clone(), self.models.blob_path(&f.sha256))).collect();
        let label = format!("{}@{}", model.manifest.name, model.manifest.version);
        let files =
            ModelFiles { digest: model.digest.clone(), label, engine: model.manifest.engine.clone(), files };
        Ok((model, files))
    }
}
