//! The candle adapter: BERT sentence embeddings (safetensors, tokenizer.json, sentence-transformers
//! pooling) on the CPU or CUDA. It owns tokenising, the encoder pass and pooling; it never generates
//! text, and never hands candle weights whose safetensors header it has not bounds-checked first.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

mod kernels;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

use crate::{
    Capabilities, EmbedOutput, GenerateRequest, GenerateStats, InferenceEngine, InferenceError, LoadOptions,
    LoadedModel, MemoryEstimate, ModelFiles, Result, TokenSink,
};

const ENGINE: &str = "candle";
/// The candle release this adapter is built and tested against (Cargo.lock).
const CANDLE_VERSION: &str = "0.11.1";
/// Bound on the safetensors JSON header: the format's own reference loader allows 100 MB.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;
/// Bound on tokenizer.json and the small JSON files.
const MAX_JSON_BYTES: u64 = 64 * 1024 * 1024;
/// Tokens per forward pass: large enough that the matrix products run near full speed, small
/// enough to bound the working memory.
const CHUNK_TOKENS: usize = 2048;

/// The candle engine adapter (`engine = "candle"` in manifests).
#[derive(Debug, Default, Clone, Copy)]
pub struct CandleEngine;

impl CandleEngine {
    pub fn new() -> Self {
        Self
    }
}

impl InferenceEngine for CandleEngine {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn version(&self) -> String {
        format!("candle {CANDLE_VERSION} ({})", if cuda_available() { "cuda" } else { "cpu" })
    }

    fn inspect(&self, model: &ModelFiles, opts: &LoadOptions) -> Result<MemoryEstimate> {
        let files = ModelLayout::find(model)?;
        let config = read_config(files.config)?;
        let st = check_safetensors(files.weights)?;
        check_weights_match(&st, &config, files.weights)?;
        check_size(files.tokenizer, MAX_JSON_BYTES, "tokenizer JSON")?;
        let max_seq = max_seq_length(model, &config)?;
        // Weights are held as F32 whatever their stored type.
        let weights = st.elements.saturating_mul(4);
        let work = working_bytes(&config, max_seq);
        // The tokenizer's vocabulary and tables: a few times its JSON.
        let tokenizer = file_len(files.tokenizer).saturating_mul(4);
        let mut est = MemoryEstimate { ram_bytes: tokenizer + 32 * 1024 * 1024, vram_bytes: 0 };
        if opts.gpu && cuda_available() {
            est.vram_bytes = weights + work;
        } else {
            est.ram_bytes += weights + work;
        }
        Ok(est)
    }

    fn load(&self, model: &ModelFiles, opts: &LoadOptions) -> Result<Box<dyn LoadedModel>> {
        let files = ModelLayout::find(model)?;
        let config = read_config(files.config)?;
        let st = check_safetensors(files.weights)?;
        check_weights_match(&st, &config, files.weights)?;
        let max_seq = max_seq_length(model, &config)?;
        let pooling = read_pooling(model)?;
        let normalize = read_normalize(model)?;
        let device = pick_device(opts.gpu);

        let mut tokenizer =
            Tokenizer::from_file(files.tokenizer).map_err(|e| invalid_json(files.tokenizer, e))?;
        // The shipped tokenizer.json may pad every input to a fixed length: this adapter packs
        // sequences without padding, so switch it off; truncate at the model's maximum.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_seq, ..Default::default() }))
            .map_err(|e| invalid_json(files.tokenizer, e))?;

        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            opts.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("candle-{i}"))
            .build()
            .map_err(|e| InferenceError::engine(ENGINE, e))?;

        let bytes = std::fs::read(files.weights).map_err(|e| invalid_st(files.weights, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| invalid_st(files.weights, e))?;
        drop(bytes);
        let encoder = pool
            .install(|| Encoder::load(tensors, &config, &device))
            .map_err(|e| invalid_st(files.weights, e))?;
        tracing::debug!(model = %model.label, ?pooling, normalize, max_seq, threads, "candle model loaded");
        Ok(Box::new(CandleModel { label: model.label.clone(), tokenizer, encoder, pooling, normalize, pool }))
    }
}

fn cuda_available() -> bool {
    cfg!(feature = "cuda") && candle_core::utils::cuda_is_available()
}

fn pick_device(gpu: bool) -> Device {
    if gpu && cuda_available() {
        match Device::new_cuda(0) {
            Ok(d) => return d,
            Err(e) => {
                tracing::warn!(error = %e, "CUDA device unavailable; the candle engine runs on the CPU")
            }
        }
    }
    Device::Cpu
}

/// The files a candle model needs, by their manifest paths.
struct ModelLayout<'a> {
    config: &'a Path,
    tokenizer: &'a Path,
    weights: &'a Path,
}

impl<'a> ModelLayout<'a> {
    fn find(model: &'a ModelFiles) -> Result<Self> {
        let need = |name: &str, found: Option<&'a std::path::PathBuf>| {
            found.map(|p| p.as_path()).ok_or_else(|| InferenceError::InvalidModel {
                path: model.label.clone(),
                format: "safetensors",
                reason: format!("the model has no {name}; a candle model needs config.json, tokenizer.json and a .safetensors file"),
            })
        };
        Ok(Self {
            config: need("config.json", model.get("config.json"))?,
            tokenizer: need("tokenizer.json", model.get("tokenizer.json"))?,
            weights: need(".safetensors file", model.find_suffix(".safetensors"))?,
        })
    }
}

fn invalid(path: &Path, format: &'static str, reason: impl std::fmt::Display) -> InferenceError {
    InferenceError::InvalidModel { path: path.display().to_string(), format, reason: reason.to_string() }
}

fn invalid_st(path: &Path, reason: impl std::fmt::Display) -> InferenceError {
    invalid(path, "safetensors", reason)
}

fn invalid_json(path: &Path, reason: impl std::fmt::Display) -> InferenceError {
    invalid(path, "JSON", reason)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn check_size(path: &Path, max: u64, what: &'static str) -> Result<u64> {
    let len = std::fs::metadata(path).map_err(|e| invalid(path, what, e))?.len();
    if len > max {
        return Err(invalid(path, what, format!("{len} bytes is over the {max} byte limit")));
    }
    Ok(len)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    check_size(path, MAX_JSON_BYTES, "JSON")?;
    let text = std::fs::read(path).map_err(|e| invalid_json(path, e))?;
    serde_json::from_slice(&text).map_err(|e| invalid_json(path, e))
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// The BERT configuration fields this adapter uses (config.json).
#[derive(Debug, Clone, Deserialize)]
struct BertConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: String,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    position_embedding_type: Option<String>,
    #[serde(default)]
    model_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}

fn default_eps() -> f64 {
    1e-12
}

fn read_config(path: &Path) -> Result<BertConfig> {
    let c: BertConfig = read_json(path).map_err(|e| match e {
        InferenceError::InvalidModel { path, reason, .. } => {
            InferenceError::InvalidModel { path, format: "BERT config", reason }
        }
        other => other,
    })?;
    let bad = |reason: String| Err(invalid(path, "BERT config", reason));
    if let Some(t) = c.model_type.as_deref().filter(|t| *t != "bert") {
        return bad(format!("model_type '{t}' is not supported by this adapter (bert only)"));
    }
    if c.position_embedding_type.as_deref().is_some_and(|t| t != "absolute") {
        return bad("only absolute position embeddings are supported".into());
    }
    if !matches!(c.hidden_act.as_str(), "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu") {
        return bad(format!("unsupported hidden_act '{}'", c.hidden_act));
    }
    let in_range = |v: usize, max: usize| v >= 1 && v <= max;
    if !in_range(c.vocab_size, 1 << 22)
        || !in_range(c.hidden_size, 1 << 16)
        || !in_range(c.num_hidden_layers, 256)
        || !in_range(c.num_attention_heads, 1024)
        || !in_range(c.intermediate_size, 1 << 18)
        || !in_range(c.max_position_embeddings, 1 << 17)
        || c.max_position_embeddings < 8
        || !in_range(c.type_vocab_size, 1 << 10)
    {
        return bad("a size is zero or implausibly large".into());
    }
    if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return bad(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size, c.num_attention_heads
        ));
    }
    if !(c.layer_norm_eps.is_finite() && c.layer_norm_eps > 0.0) {
        return bad("layer_norm_eps must be a positive number".into());
    }
    Ok(c)
}

/// sentence_bert_config.json's `max_seq_length`, else the model's position table, capped by it.
fn max_seq_length(model: &ModelFiles, config: &BertConfig) -> Result<usize> {
    #[derive(Deserialize)]
    struct SbertConfig {
        max_seq_length: Option<usize>,
    }
    let from_sbert = match model.get("sentence_bert_config.json") {
        Some(p) => read_json::<SbertConfig>(p)?.max_seq_length,
        None => None,
    };
    Ok(from_sbert.unwrap_or(config.max_position_embeddings).min(config.max_position_embeddings).max(2))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    Mean,
    Cls,
}

#[derive(Debug, Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type", default)]
    kind: String,
}

fn modules(model: &ModelFiles) -> Result<Vec<ModuleEntry>> {
    match model.get("modules.json") {
        Some(p) => read_json(p),
        None => Ok(Vec::new()),
    }
}

/// The pooling of the model's Pooling module (1_Pooling/config.json); mean when there is none.
fn read_pooling(model: &ModelFiles) -> Result<Pooling> {
    #[derive(Deserialize)]
    struct PoolingConfig {
        #[serde(default)]
        pooling_mode_cls_token: bool,
        #[serde(default)]
        pooling_mode_mean_tokens: bool,
        #[serde(default)]
        pooling_mode_max_tokens: bool,
        #[serde(default)]
        pooling_mode_mean_sqrt_len_tokens: bool,
        #[serde(default)]
        pooling_mode_weightedmean_tokens: bool,
        #[serde(default)]
        pooling_mode_lasttoken: bool,
    }
    let dir = modules(model)?
        .into_iter()
        .find(|m| m.kind.ends_with("Pooling"))
        .map(|m| m.path)
        .unwrap_or_else(|| "1_Pooling".into());
    // A Pooling module at the root would have its config in the BERT config's place.
    let Some(path) = model.get(&format!("{dir}/config.json")).filter(|_| !dir.is_empty()) else {
        return Ok(Pooling::Mean);
    };
    let c: PoolingConfig = read_json(path)?;
    let unsupported = [
        c.pooling_mode_max_tokens,
        c.pooling_mode_mean_sqrt_len_tokens,
        c.pooling_mode_weightedmean_tokens,
        c.pooling_mode_lasttoken,
    ];
    match (c.pooling_mode_cls_token, c.pooling_mode_mean_tokens, unsupported.contains(&true)) {
        (false, false, false) | (false, true, false) => Ok(Pooling::Mean),
        (true, false, false) => Ok(Pooling::Cls),
        _ => Err(invalid(path, "pooling config", "only mean or CLS pooling (one of them) is supported")),
    }
}

/// Whether sentence-transformers' pipeline ends in a Normalize module (unit-length vectors).
fn read_normalize(model: &ModelFiles) -> Result<bool> {
    Ok(modules(model)?.iter().any(|m| m.kind.ends_with("Normalize")))
}

/// Memory of one forward pass of `CHUNK_TOKENS` tokens: the activations a layer keeps alive
/// and the attention scores of sequences of up to `max_seq` tokens.
fn working_bytes(c: &BertConfig, max_seq: usize) -> u64 {
    let t = CHUNK_TOKENS as u64;
    let per_token = (8 * c.hidden_size + 3 * c.intermediate_size) as u64;
    let scores = (c.num_attention_heads as u64) * t * (max_seq as u64) * 2;
    (t * per_token + scores) * 4 + 16 * 1024 * 1024
}

// ---------------------------------------------------------------------------------------------
// safetensors checks

/// What the header check learned about a safetensors file.
#[derive(Debug, Clone, Default)]
struct SafetensorsInfo {
    /// name → (dtype, shape)
    tensors: HashMap<String, (String, Vec<usize>)>,
    /// Elements over all tensors.
    elements: u64,
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// Checks a safetensors file's header without trusting it: the header length is bounded by the
/// file, the header is a JSON object of tensors whose dtype × shape matches their byte range,
/// and the ranges lie in the data section, tile it without holes or overlaps, and end with it.
fn check_safetensors(path: &Path) -> Result<SafetensorsInfo> {
    let bad = |reason: String| invalid_st(path, reason);
    let mut f = File::open(path).map_err(|e| bad(e.to_string()))?;
    let file_len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    if file_len < 8 {
        return Err(bad(format!("{file_len} bytes is too short for a header")));
    }
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes).map_err(|e| bad(e.to_string()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!("header length {header_len} is over the {MAX_HEADER_BYTES} byte limit")));
    }
    if header_len > file_len - 8 {
        return Err(bad(format!("header length {header_len} runs past the end of the {file_len} byte file")));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let data_len = file_len - 8 - header_len;

    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let serde_json::Value::Object(entries) = json else {
        return Err(bad("header is not a JSON object".into()));
    };
    let mut info = SafetensorsInfo::default();
    let mut ranges: Vec<(u64, u64, &str)> = Vec::with_capacity(entries.len());
    for (name, entry) in &entries {
        if name == "__metadata__" {
            let ok = entry.as_object().is_some_and(|m| m.values().all(|v| v.is_string()));
            if !ok {
                return Err(bad("__metadata__ must map names to strings".into()));
            }
            continue;
        }
        let tensor_bad = |what: &str| bad(format!("tensor '{name}': {what}"));
        let obj = entry.as_object().ok_or_else(|| tensor_bad("entry is not an object"))?;
        let dtype = obj.get("dtype").and_then(|v| v.as_str()).ok_or_else(|| tensor_bad("no dtype"))?;
        let size = dtype_size(dtype).ok_or_else(|| tensor_bad(&format!("unknown dtype {dtype}")))?;
        let shape = obj
            .get("shape")
            .and_then(|v| v.as_array())
            .ok_or_else(|| tensor_bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| tensor_bad("shape is not a list of sizes"))?;
        if shape.len() > 8 {
            return Err(tensor_bad("more than 8 dimensions"));
        }
        let offsets = obj
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| tensor_bad("data_offsets is not two offsets"))?;
        let (start, end) = offsets;
        if start > end || end > data_len {
            return Err(tensor_bad(&format!(
                "data_offsets [{start}, {end}] lie outside the {data_len} byte data section"
            )));
        }
        let elements = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| tensor_bad("shape overflows"))?;
        let bytes = elements.checked_mul(size).ok_or_else(|| tensor_bad("shape overflows"))?;
        if bytes != end - start {
            return Err(tensor_bad(&format!(
                "{dtype} {shape:?} takes {bytes} bytes but data_offsets span {}",
                end - start
            )));
        }
        info.elements = info.elements.saturating_add(elements);
        ranges.push((start, end, name));
        info.tensors.insert(name.clone(), (dtype.to_string(), shape));
    }
    ranges.sort_unstable();
    let mut at = 0u64;
    for (start, end, name) in &ranges {
        if *start != at {
            return Err(bad(format!(
                "tensor '{name}' starts at {start}, not at {at}: tensors overlap or leave a hole"
            )));
        }
        at = *end;
    }
    if at != data_len {
        return Err(bad(format!("tensors end at byte {at} of a {data_len} byte data section")));
    }
    Ok(info)
}

/// The tensor-name prefix of the BERT weights (`""`, `bert.`, or `<model_type>.`).
fn weight_prefix(st: &SafetensorsInfo, config: &BertConfig) -> Option<String> {
    let mut prefixes = vec![String::new(), "bert.".to_string()];
    if let Some(t) = &config.model_type {
        prefixes.push(format!("{t}."));
    }
    prefixes.into_iter().find(|p| st.tensors.contains_key(&format!("{p}embeddings.word_embeddings.weight")))
}

/// Every weight of a BERT encoder with config `c` and its shape, named without the prefix.
fn bert_weight_shapes(c: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![c.vocab_size, h]),
        ("embeddings.position_embeddings.weight".into(), vec![c.max_position_embeddings, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![c.type_vocab_size, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..c.num_hidden_layers {
        for (name, shape) in [
            ("attention.self.query.weight", vec![h, h]),
            ("attention.self.query.bias", vec![h]),
            ("attention.self.key.weight", vec![h, h]),
            ("attention.self.key.bias", vec![h]),
            ("attention.self.value.weight", vec![h, h]),
            ("attention.self.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("attention.output.LayerNorm.weight", vec![h]),
            ("attention.output.LayerNorm.bias", vec![h]),
            ("intermediate.dense.weight", vec![i, h]),
            ("intermediate.dense.bias", vec![i]),
            ("output.dense.weight", vec![h, i]),
            ("output.dense.bias", vec![h]),
            ("output.LayerNorm.weight", vec![h]),
            ("output.LayerNorm.bias", vec![h]),
        ] {
            shapes.push((format!("encoder.layer.{l}.{name}"), shape));
        }
    }
    shapes
}

/// The shapes the forward pass relies on, checked before any tensor is loaded.
fn check_weights_match(st: &SafetensorsInfo, c: &BertConfig, path: &Path) -> Result<()> {
    let prefix = weight_prefix(st, c)
        .ok_or_else(|| invalid_st(path, "no embeddings.word_embeddings.weight tensor: not a BERT model"))?;
    for (name, shape) in bert_weight_shapes(c) {
        let full = format!("{prefix}{name}");
        match st.tensors.get(&full) {
            None => return Err(invalid_st(path, format!("tensor '{full}' is missing"))),
            Some((dtype, _)) if !matches!(dtype.as_str(), "F32" | "F16" | "BF16") => {
                return Err(invalid_st(path, format!("tensor '{full}' is {dtype}, not a float type")));
            }
            Some((_, got)) if *got != shape => {
                return Err(invalid_st(
                    path,
                    format!("tensor '{full}' has shape {got:?}, config.json implies {shape:?}"),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The encoder

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    GeluErf,
    GeluTanh,
    Relu,
}

struct Layer {
    /// Query, key and value projections in one: [hidden, 3·hidden], queries pre-scaled by
    /// 1/√head_dim, and their bias [3·hidden].
    qkv_w: Tensor,
    qkv_b: Tensor,
    attn_out_w: Tensor,
    /// [3, hidden]: the attention output's dense bias, LayerNorm weight and LayerNorm bias.
    attn_norm: Tensor,
    inter_w: Tensor,
    inter_b: Tensor,
    out_w: Tensor,
    /// [3, hidden]: the output's dense bias, LayerNorm weight and LayerNorm bias.
    out_norm: Tensor,
}

struct Encoder {
    word: Tensor,
    position: Tensor,
    /// Token type 0's embedding (sentence embeddings use a single segment).
    token_type0: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    eps: f32,
    act: Act,
    device: Device,
    /// The fused CPU kernels (`kernels`); otherwise candle's own ops (any device).
    fused: bool,
}

impl Encoder {
    fn load(
        mut tensors: HashMap<String, Tensor>,
        c: &BertConfig,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let prefix = ["", "bert."]
            .into_iter()
            .map(str::to_string)
            .chain(c.model_type.iter().map(|t| format!("{t}.")))
            .find(|p| tensors.contains_key(&format!("{p}embeddings.word_embeddings.weight")))
            .unwrap_or_default();
        let mut take = |name: &str| -> candle_core::Result<Tensor> {
            let full = format!("{prefix}{name}");
            tensors
                .remove(&full)
                .ok_or_else(|| candle_core::Error::Msg(format!("tensor '{full}' is missing")))?
                .to_dtype(DType::F32)
        };
        // Weights are stored [out, in]; keep them as contiguous [in, out] for `x · w`.
        let on = |t: Tensor| t.to_device(device);
        let wt = |t: Tensor| t.t()?.contiguous()?.to_device(device);
        let head_dim = c.hidden_size / c.num_attention_heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let word = on(take("embeddings.word_embeddings.weight")?)?;
        let position = on(take("embeddings.position_embeddings.weight")?)?;
        let token_type0 = on(take("embeddings.token_type_embeddings.weight")?.get(0)?)?;
        let ln_w = on(take("embeddings.LayerNorm.weight")?)?;
        let ln_b = on(take("embeddings.LayerNorm.bias")?)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let mut t = |n: &str| take(&format!("encoder.layer.{l}.{n}"));
            let q_w = (t("attention.self.query.weight")? * scale)?;
            let q_b = (t("attention.self.query.bias")? * scale)?;
            let k_w = t("attention.self.key.weight")?;
            let k_b = t("attention.self.key.bias")?;
            let v_w = t("attention.self.value.weight")?;
            let v_b = t("attention.self.value.bias")?;
            let mut norm = |dense: &str, ln: &str| -> candle_core::Result<Tensor> {
                let parts =
                    [t(&format!("{dense}.bias"))?, t(&format!("{ln}.weight"))?, t(&format!("{ln}.bias"))?];
                on(Tensor::stack(&parts, 0)?)
            };
            let attn_norm = norm("attention.output.dense", "attention.output.LayerNorm")?;
            let out_norm = norm("output.dense", "output.LayerNorm")?;
            layers.push(Layer {
                qkv_w: wt(Tensor::cat(&[q_w, k_w, v_w], 0)?)?,
                qkv_b: on(Tensor::cat(&[q_b, k_b, v_b], 0)?)?,
                attn_out_w: wt(t("attention.output.dense.weight")?)?,
                attn_norm,
                inter_w: wt(t("intermediate.dense.weight")?)?,
                inter_b: on(t("intermediate.dense.bias")?)?,
                out_w: wt(t("output.dense.weight")?)?,
                out_norm,
            });
        }
        let act = match c.hidden_act.as_str() {
            "gelu" => Act::GeluErf,
            "relu" => Act::Relu,
            _ => Act::GeluTanh,
        };
        Ok(Self {
            word,
            position,
            token_type0,
            ln_w,
            ln_b,
            layers,
            heads: c.num_attention_heads,
            head_dim,
            hidden: c.hidden_size,
            eps: c.layer_norm_eps as f32,
            act,
            fused: device.is_cpu(),
            device: device.clone(),
        })
    }

    /// Runs the encoder over sequences packed one after the other without padding (`lens`,
    /// longest first): the dense layers see every real token at once, attention stays within
    /// each sequence. Returns [tokens, hidden].
    fn forward_packed(&self, ids: &[u32], positions: &[u32], lens: &[usize]) -> candle_core::Result<Tensor> {
        let n = ids.len();
        let ids = Tensor::from_slice(ids, n, &self.device)?;
        let pos = Tensor::from_slice(positions, n, &self.device)?;
        let x = self.word.index_select(&ids, 0)?;
        let x = (x + self.position.index_select(&pos, 0)?)?.broadcast_add(&self.token_type0)?;
        let mut x = candle_nn::ops::layer_norm(&x, &self.ln_w, &self.ln_b, self.eps)?;
        if self.fused {
            for layer in &self.layers {
                x = self.layer_fused(&x, layer, lens)?;
            }
        } else {
            let groups = plan_groups(lens);
            let inputs =
                groups.iter().map(|g| g.prepare(&self.device)).collect::<candle_core::Result<Vec<_>>>()?;
            for layer in &self.layers {
                x = self.layer_generic(&x, layer, &groups, &inputs)?;
            }
        }
        Ok(x)
    }

    /// One layer with the fused CPU kernels: four matrix products and four kernels.
    fn layer_fused(&self, x: &Tensor, layer: &Layer, lens: &[usize]) -> candle_core::Result<Tensor> {
        let qkv = x.matmul(&layer.qkv_w)?;
        let ctx =
            qkv.apply_op2_no_bwd(&layer.qkv_b, &kernels::PackedAttention { lens, heads: self.heads })?;
        let norm = kernels::BiasResidualLayerNorm { eps: self.eps };
        let x = ctx.matmul(&layer.attn_out_w)?.apply_op3_no_bwd(x, &layer.attn_norm, &norm)?;
        let inter = x.matmul(&layer.inter_w)?;
        let inter = match self.act {
            Act::GeluErf => inter.apply_op2_no_bwd(&layer.inter_b, &kernels::BiasGelu)?,
            _ => self.activation(&inter.broadcast_add(&layer.inter_b)?)?,
        };
        inter.matmul(&layer.out_w)?.apply_op3_no_bwd(&x, &layer.out_norm, &norm)
    }

    fn activation(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.act {
            Act::GeluErf => x.gelu_erf(),
            Act::GeluTanh => x.gelu(),
            Act::Relu => x.relu(),
        }
    }

    /// `LayerNorm(x + bias + residual)` with candle's ops; `params` as in `Layer::attn_norm`.
    fn add_norm(&self, x: &Tensor, residual: &Tensor, params: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x.broadcast_add(&params.get(0)?)? + residual)?;
        candle_nn::ops::layer_norm(&x, &params.get(1)?, &params.get(2)?, self.eps)
    }

    /// One layer with candle's own ops (any device); attention runs per group of sequences.
    fn layer_generic(
        &self,
        x: &Tensor,
        layer: &Layer,
        groups: &[Group],
        inputs: &[GroupInputs],
    ) -> candle_core::Result<Tensor> {
        let qkv = x.matmul(&layer.qkv_w)?.broadcast_add(&layer.qkv_b)?;
        let mut parts = Vec::with_capacity(groups.len());
        for (g, gi) in groups.iter().zip(inputs) {
            parts.push(self.attention(&qkv, g, gi)?);
        }
        let ctx = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
        let x = self.add_norm(&ctx.matmul(&layer.attn_out_w)?, x, &layer.attn_norm)?;
        let inter = self.activation(&x.matmul(&layer.inter_w)?.broadcast_add(&layer.inter_b)?)?;
        self.add_norm(&inter.matmul(&layer.out_w)?, &x, &layer.out_norm)
    }

    /// Self-attention of one group: `qkv` rows [g.row0, g.row0 + g.rows) hold its sequences.
    fn attention(&self, qkv: &Tensor, g: &Group, gi: &GroupInputs) -> candle_core::Result<Tensor> {
        let (b, l, h, d) = (g.lens.len(), g.max_len, self.heads, self.head_dim);
        let rows = qkv.narrow(0, g.row0, g.rows)?;
        let padded = match &gi.gather {
            Some(idx) => rows.index_select(idx, 0)?,
            None => rows,
        };
        // [b, l, 3, h, d] → [3, b, h, l, d]
        let qkv = padded.reshape((b, l, 3, h, d))?.permute((2, 0, 3, 1, 4))?.contiguous()?;
        let q = qkv.get(0)?;
        let k = qkv.get(1)?;
        let v = qkv.get(2)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = &gi.mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?; // [b, h, l, d]
        let ctx = ctx.transpose(1, 2)?.contiguous()?.reshape((b * l, h * d))?;
        match &gi.scatter {
            Some(idx) => ctx.index_select(idx, 0),
            None => Ok(ctx),
        }
    }
}

/// Sequences that run attention together in the generic path: consecutive in the packed rows,
/// padded to the longest of them when their lengths differ.
#[derive(Debug, Clone)]
struct Group {
    row0: usize,
    rows: usize,
    max_len: usize,
    lens: Vec<usize>,
}

struct GroupInputs {
    /// Packed row (relative to the group) of each padded position; padding repeats row 0.
    gather: Option<Tensor>,
    /// Padded position of each packed row.
    scatter: Option<Tensor>,
    /// Additive key mask [b, 1, 1, l]: 0 for tokens, a large negative for padding.
    mask: Option<Tensor>,
}

impl Group {
    fn prepare(&self, device: &Device) -> candle_core::Result<GroupInputs> {
        if self.lens.iter().all(|&l| l == self.max_len) {
            return Ok(GroupInputs { gather: None, scatter: None, mask: None });
        }
        let (b, l) = (self.lens.len(), self.max_len);
        let mut gather = Vec::with_capacity(b * l);
        let mut scatter = Vec::with_capacity(self.rows);
        let mut mask = Vec::with_capacity(b * l);
        let mut row = 0u32;
        for (i, &len) in self.lens.iter().enumerate() {
            for t in 0..l {
                if t < len {
                    gather.push(row + t as u32);
                    scatter.push((i * l + t) as u32);
                    mask.push(0f32);
                } else {
                    gather.push(0);
                    mask.push(f32::MIN);
                }
            }
            row += len as u32;
        }
        Ok(GroupInputs {
            gather: Some(Tensor::from_vec(gather, b * l, device)?),
            scatter: Some(Tensor::from_vec(scatter, self.rows, device)?),
            mask: Some(Tensor::from_vec(mask, (b, 1, 1, l), device)?),
        })
    }
}

/// Splits sequences sorted longest first (lengths `lens`) into attention groups, trading the
/// fixed cost of a group against the attention work its padding adds.
fn plan_groups(lens: &[usize]) -> Vec<Group> {
    // Costs in units of one query·key pair; a group's fixed cost is a handful of tensor ops.
    const GROUP_COST: f64 = 1500.0;
    const PAD_GROUP_COST: f64 = 1000.0;
    const WINDOW: usize = 256;
    let n = lens.len();
    // best[j]: least cost of the first j sequences; from[j]: where its last group starts.
    let mut best = vec![f64::INFINITY; n + 1];
    let mut from = vec![0usize; n + 1];
    best[0] = 0.0;
    for j in 1..=n {
        for i in j.saturating_sub(WINDOW)..j {
            let l = lens[i] as f64;
            let padded = lens[j - 1] != lens[i];
            let cost =
                best[i] + GROUP_COST + if padded { PAD_GROUP_COST } else { 0.0 } + (j - i) as f64 * l * l;
            if cost < best[j] {
                best[j] = cost;
                from[j] = i;
            }
        }
    }
    let mut bounds = Vec::new();
    let mut j = n;
    while j > 0 {
        bounds.push((from[j], j));
        j = from[j];
    }
    bounds.reverse();
    let mut row = 0;
    bounds
        .into_iter()
        .map(|(i, j)| {
            let group_lens = lens[i..j].to_vec();
            let rows: usize = group_lens.iter().sum();
            let g = Group { row0: row, rows, max_len: lens[i], lens: group_lens };
            row += rows;
            g
        })
        .collect()
}

/// Splits `items` (longest first) into at most `parts` non-empty parts of about equal total
/// `len`: each item goes to the part with the least so far, so that the largest part exceeds
/// the mean by less than one item. Parts keep the items' order.
fn split_balanced(items: &[usize], len: impl Fn(usize) -> usize, parts: usize) -> Vec<Vec<usize>> {
    let n = parts.clamp(1, items.len().max(1));
    let mut out: Vec<(usize, Vec<usize>)> = (0..n).map(|_| (0, Vec::new())).collect();
    for &item in items {
        let least = (1..n).fold(0, |best, p| if out[p].0 < out[best].0 { p } else { best });
        out[least].0 += len(item);
        out[least].1.push(item);
    }
    out.into_iter().map(|(_, p)| p).filter(|p| !p.is_empty()).collect()
}

// ---------------------------------------------------------------------------------------------
// The loaded model

/// Pooled vectors of some sequences, each with its index in the request.
type Pooled = Vec<(usize, Vec<f32>)>;

struct CandleModel {
    label: String,
    tokenizer: Tokenizer,
    encoder: Encoder,
    pooling: Pooling,
    normalize: bool,
    pool: rayon::ThreadPool,
}

impl LoadedModel for CandleModel {
    fn capabilities(&self) -> Capabilities {
        Capabilities { generate: false, embed: true }
    }

    fn context_length(&self) -> u32 {
        0
    }

    fn generate(&self, _req: &GenerateRequest, _sink: TokenSink<'_>) -> Result<GenerateStats> {
        Err(InferenceError::Unsupported {
            model: self.label.clone(),
            engine: ENGINE.into(),
            what: "generate text",
        })
    }

    fn embed(&self, texts: &[String]) -> Result<EmbedOutput> {
        if texts.is_empty() {
            return Ok(EmbedOutput { vectors: Vec::new(), tokens: 0 });
        }
        self.pool.install(|| self.embed_inner(texts))
    }
}

impl CandleModel {
    fn embed_inner(&self, texts: &[String]) -> Result<EmbedOutput> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings =
            self.tokenizer.encode_batch(inputs, true).map_err(|e| InferenceError::engine(ENGINE, e))?;
        let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
        let tokens: usize = ids.iter().map(|i| i.len()).sum();

        // Longest first, so that sequences of similar length meet in a chunk. A text that
        // tokenises to nothing (a tokenizer without special tokens) gets a zero vector.
        let hidden = self.encoder.hidden;
        let mut vectors = vec![vec![0f32; hidden]; texts.len()];
        let mut order: Vec<usize> = (0..ids.len()).filter(|&i| !ids[i].is_empty()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));

        // Rounds of at most CHUNK_TOKENS tokens (at least one sequence), which bounds the working
        // memory. On the CPU a round is split into one part per pool thread, balanced by tokens,
        // and the parts run at once: each thread then runs whole layers on its own sequences
        // instead of every small matrix product being split between the threads.
        let parallel = if self.encoder.fused { self.pool.current_num_threads() } else { 1 };
        let mut at = 0;
        while at < order.len() {
            let mut end = at;
            let mut round_tokens = 0;
            while end < order.len() && (end == at || round_tokens + ids[order[end]].len() <= CHUNK_TOKENS) {
                round_tokens += ids[order[end]].len();
                end += 1;
            }
            let parts = split_balanced(&order[at..end], |i| ids[i].len(), parallel);
            let done: Vec<Result<Pooled>> = if parts.len() == 1 {
                vec![self.encode_part(&parts[0], &ids)]
            } else {
                parts.par_iter().map(|part| self.encode_part(part, &ids)).collect()
            };
            for part in done {
                for (i, v) in part? {
                    vectors[i] = v;
                }
            }
            at = end;
        }
        Ok(EmbedOutput { vectors, tokens: u32::try_from(tokens).unwrap_or(u32::MAX) })
    }

    /// One encoder pass over the sequences `part` (indices into `ids`, longest first), packed;
    /// returns each sequence's pooled vector.
    fn encode_part(&self, part: &[usize], ids: &[&[u32]]) -> Result<Pooled> {
        let hidden = self.encoder.hidden;
        let lens: Vec<usize> = part.iter().map(|&i| ids[i].len()).collect();
        let total: usize = lens.iter().sum();
        let mut flat = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        for &i in part {
            flat.extend_from_slice(ids[i]);
            positions.extend(0..ids[i].len() as u32);
        }
        let out = self
            .encoder
            .forward_packed(&flat, &positions, &lens)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| InferenceError::engine(ENGINE, e))?;
        let mut row = 0;
        let mut vectors = Vec::with_capacity(part.len());
        for (&i, &len) in part.iter().zip(&lens) {
            vectors.push((i, self.pool_and_normalize(&out[row * hidden..(row + len) * hidden], len, hidden)));
            row += len;
        }
        Ok(vectors)
    }

    fn pool_and_normalize(&self, seq: &[f32], len: usize, hidden: usize) -> Vec<f32> {
        let mut v = match self.pooling {
            Pooling::Cls => seq[..hidden].to_vec(),
            Pooling::Mean => {
                let mut acc = vec![0f32; hidden];
                for tok in seq.chunks_exact(hidden) {
                    for (a, x) in acc.iter_mut().zip(tok) {
                        *a += x;
                    }
                }
                let inv = 1.0 / len.max(1) as f32;
                acc.iter_mut().for_each(|a| *a *= inv);
                acc
            }
        };
        if self.normalize {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> BertConfig {
        BertConfig {
            vocab_size: 50,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            hidden_act: "gelu".into(),
            max_position_embeddings: 40,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: None,
            model_type: Some("bert".into()),
        }
    }

    /// A BERT with random weights, as safetensors would name them.
    fn tiny_weights(c: &BertConfig) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        bert_weight_shapes(c)
            .into_iter()
            .map(|(n, s)| {
                let t = Tensor::randn(0f32, 0.3, s.as_slice(), &dev).expect("randn");
                let t = if n.ends_with("LayerNorm.weight") { (t + 1.0).expect("shift") } else { t };
                (n, t)
            })
            .collect()
    }

    #[test]
    fn fused_kernels_match_candles_own_ops() {
        let c = tiny_config();
        let mut enc = Encoder::load(tiny_weights(&c), &c, &Device::Cpu).expect("load");
        // Unequal lengths, equal lengths, and a single token: padding, masks and groups.
        let lens = [17usize, 9, 9, 5, 2, 1];
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            ids.extend((0..len).map(|t| ((s * 7 + t * 3) % c.vocab_size) as u32));
            positions.extend(0..len as u32);
        }
        enc.fused = true;
        let fused = enc.forward_packed(&ids, &positions, &lens).expect("fused").flatten_all().expect("flat");
        enc.fused = false;
        let generic =
            enc.forward_packed(&ids, &positions, &lens).expect("generic").flatten_all().expect("flat");
        let a = fused.to_vec1::<f32>().expect("vec");
        let b = generic.to_vec1::<f32>().expect("vec");
        let max_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-4, "fused and generic differ by {max_diff}");
    }

    #[test]
    fn groups_cover_every_sequence_once_in_order() {
        let lens = [40usize, 39, 39, 20, 3, 3, 3, 2];
        let groups = plan_groups(&lens);
        let flat: Vec<usize> = groups.iter().flat_map(|g| g.lens.clone()).collect();
        assert_eq!(flat, lens);
        let mut row = 0;
        for g in &groups {
            assert_eq!(g.row0, row);
            assert_eq!(g.rows, g.lens.iter().sum::<usize>());
            assert_eq!(g.max_len, g.lens[0]);
            row += g.rows;
        }
    }

    #[test]
    fn parts_are_balanced_and_hold_every_sequence_once_in_order() {
        let lens = [40usize, 39, 30, 20, 10, 3, 3, 2];
        let items: Vec<usize> = (0..lens.len()).collect();
        let parts = split_balanced(&items, |i| lens[i], 2);
        assert_eq!(parts.len(), 2);
        let sums: Vec<usize> = parts.iter().map(|p| p.iter().map(|&i| lens[i]).sum()).collect();
        assert!(sums[0].abs_diff(sums[1]) <= 40, "unbalanced: {sums:?}");
        let mut all: Vec<usize> = parts.concat();
        all.sort_unstable();
        assert_eq!(all, items);
        assert!(parts.iter().all(|p| p.windows(2).all(|w| w[0] < w[1])), "order kept: {parts:?}");
        // Fewer sequences than parts: one part each, none empty.
        assert_eq!(split_balanced(&[7], |_| 5, 4), vec![vec![7]]);
        assert_eq!(split_balanced(&[1, 2, 3], |_| 5, 1), vec![vec![1, 2, 3]]);
    }
}
