//! `job submit`: builds a `SubmitJobRequest` from a TOML/JSON file and/or flags (flags win);
//! the container flags (`SpecArgs`) that `trigger create` shares; and the small parsers for
//! durations, memory sizes and CPU counts the flags take.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
#[cfg(test)]
use outpost_protocol::JobSpec;
use outpost_protocol::SubmitJobRequest;
use serde_json::{Map, Value};

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  outpost-control job submit --node node-… --image sha256:… --env GREETING=hi -- sh -c 'echo $GREETING'
  outpost-control job submit --file job.toml --node node-…
  outpost-control job submit --node node-… --generate <model digest> --prompt 'Hello' --max-tokens 64
  outpost-control job submit --node node-… --embed <model digest> --text 'first' --text 'second'
  outpost-control job submit --org ORG --selector 'site=icu' --any --image sha256:… -- sh -c 'date'
  outpost-control job submit --org ORG --selector 'site=icu,gpu' --each --image sha256:… -- nvidia-smi

A job file holds the SubmitJobRequest, e.g. (TOML):
  node_id = \"node-…\"
  [spec]
  image = \"sha256:…\"
  command = [\"sh\", \"-c\", \"echo hi\"]
  timeout_secs = 60
  [spec.resources]
  memory_mb = 256")]
pub struct SubmitArgs {
    /// A .toml or .json file with `node_id`, `spec` and optionally `expires_in_secs`; flags
    /// given as well override its values.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The node that runs the job.
    #[arg(long, value_name = "NODE_ID", conflicts_with = "selector")]
    pub node: Option<String>,
    /// Choose the node(s) by label selector instead (Kubernetes grammar, e.g.
    /// `site=icu,gpu in (a100,l4)`); needs --org and --any or --each.
    #[arg(long, value_name = "SELECTOR", requires = "placement")]
    pub selector: Option<String>,
    /// The organisation whose nodes --selector chooses from.
    #[arg(long, value_name = "ORG_ID")]
    pub org: Option<String>,
    /// Run on one matching online node, the least loaded; if it goes silent before it reports,
    /// another matching node gets the job as a new attempt.
    #[arg(long, group = "placement", requires = "selector")]
    pub any: bool,
    /// Run on every matching node: a job group (prints the group id; see `job wait --group`).
    #[arg(long, group = "placement", requires = "selector")]
    pub each: bool,
    /// Seal the result for this age X25519 public key (`age1…`, from `age-keygen`;
    /// repeatable): the control plane then stores only ciphertext for the output tails and
    /// bodies; open it with `job result JOB --identity FILE` or `age -d`.
    #[arg(long = "recipient", value_name = "AGE_PUBLIC_KEY")]
    pub recipients: Vec<String>,
    /// Read recipients from a file, one `age1…` key per line (`#` comments and blank lines
    /// skipped), like `age -R`.
    #[arg(long, value_name = "FILE")]
    pub recipients_file: Option<PathBuf>,
    #[command(flatten)]
    pub spec: SpecArgs,
    #[command(flatten)]
    pub inference: InferenceArgs,
}

/// The flags of an inference job (`--generate` or `--embed` on a model of the node's store).
#[derive(Debug, Args)]
#[group(id = "inference_job")]
pub struct InferenceArgs {
    /// Generate text with this model (its digest, see `outpost models list` on the node or the
    /// node's heartbeat).
    #[arg(long, value_name = "MODEL_DIGEST", conflicts_with_all = ["image", "embed"])]
    pub generate: Option<String>,
    /// Embed texts with this model (its digest).
    #[arg(long, value_name = "MODEL_DIGEST", conflicts_with = "image")]
    pub embed: Option<String>,
    /// The prompt (generate).
    #[arg(long, conflicts_with = "prompt_key")]
    pub prompt: Option<String>,
    /// Key of a local object holding the prompt (generate).
    #[arg(long, value_name = "KEY")]
    pub prompt_key: Option<String>,
    /// Most tokens to generate (default 128).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2 (default 0: greedy, deterministic).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sampling seed (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop generating at this string (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// A text to embed (repeatable).
    #[arg(long = "text", value_name = "TEXT")]
    pub texts: Vec<String>,
    /// Key of a local object with one JSON string per line to embed.
    #[arg(long, value_name = "KEY")]
    pub texts_key: Option<String>,
}

impl InferenceArgs {
    fn any(&self) -> bool {
        self.generate.is_some()
            || self.embed.is_some()
            || self.prompt.is_some()
            || self.prompt_key.is_some()
            || self.max_tokens.is_some()
            || self.temperature.is_some()
            || self.seed.is_some()
            || !self.stop.is_empty()
            || !self.texts.is_empty()
            || self.texts_key.is_some()
    }
}

/// The flags that describe a job's container, shared by `job submit` and `trigger create`.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Image id (`sha256:<64 hex>`); nodes never pull by name, the image must be on the node.
    #[arg(long)]
    pub image: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Container label KEY=VALUE (repeatable; `outpost.*` is reserved).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Kill the container after this long (e.g. 90s, 1h; default 10m).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Memory limit: 512m, 2g, or a number of MiB (default 256m).
    #[arg(long, value_parser = parse_memory_mb, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// CPU limit in cores, e.g. 0.5 or 2 (default 1).
    #[arg(long, value_parser = parse_cpu_millis, value_name = "CORES")]
    pub cpus: Option<u64>,
    /// Most processes in the container (default 64).
    #[arg(long)]
    pub pids: Option<u64>,
    /// Give the container a network (default: none).
    #[arg(long)]
    pub network: bool,
    /// Object key of the node's local store to mount read-only at /in/KEY (repeatable; a key
    /// ending in `/` names every object under it).
    #[arg(long = "input", value_name = "KEY")]
    pub inputs: Vec<String>,
    /// Upload what the job writes under /out to the local store under this key prefix.
    #[arg(long, value_name = "PREFIX")]
    pub output_prefix: Option<String>,
    /// Output key (or prefix ending in `/`) whose body the job asks to report to the control
    /// plane, where the node's egress policy allows it (repeatable).
    #[arg(long = "egress-body", value_name = "KEY")]
    pub egress_bodies: Vec<String>,
    /// How long the signed manifest stays valid while the node is offline (e.g. 1d; default 1d).
    #[arg(long, value_parser = parse_duration)]
    pub expires: Option<Duration>,
    /// The command and its arguments, after `--` (replaces the image's CMD).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The request the flags and file describe, validated against the protocol's types.
pub fn submit_request(a: SubmitArgs) -> anyhow::Result<SubmitJobRequest> {
    let mut base = match &a.file {
        Some(path) => read_job_file(path)?,
        None => Value::Object(Map::new()),
    };
    let obj = base.as_object_mut().ok_or_else(|| anyhow!("the job file must hold a table/object"))?;
    if let Some(node) = a.node {
        obj.insert("node_id".into(), node.into());
    }
    if let Some(selector) = a.selector {
        obj.insert("selector".into(), selector.into());
    }
    if let Some(org) = a.org {
        obj.insert("org_id".into(), org.into());
    }
    if a.any || a.each {
        obj.insert("placement".into(), if a.any { "any" } else { "each" }.into());
    }
    if let Some(e) = a.spec.expires {
        obj.insert("expires_in_secs".into(), e.as_secs().into());
    }
    let mut recipients = a.recipients;
    if let Some(path) = &a.recipients_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        recipients.extend(
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from),
        );
    }
    if !recipients.is_empty() {
        outpost_protocol::seal::check_recipients(&recipients).map_err(|why| anyhow!("--recipient: {why}"))?;
        obj.insert("recipients".into(), recipients.into());
    }
    if !obj.contains_key("node_id") && !obj.contains_key("selector") {
        bail!(
            "say where the job runs: --node NODE_ID, or --org ORG_ID --selector SELECTOR with --any or --each \
             (or node_id / selector in the file); see `node list`"
        );
    }
    if obj.contains_key("selector") && !obj.contains_key("org_id") {
        bail!("--selector chooses among one organisation's nodes: give --org ORG_ID (see `org list`)");
    }
    let spec = object_at(obj, "spec")?;
    if a.inference.any() || spec.contains_key("kind") {
        apply_inference_flags(spec, a.inference, a.spec)?;
    } else {
        apply_spec_flags(spec, a.spec)?;
    }
    serde_json::from_value(base).context("the job is not a valid SubmitJobRequest")
}

/// Writes the inference flags into a JSON `spec` object; of the container flags only
/// `--timeout` and `--output-prefix` apply.
fn apply_inference_flags(spec: &mut Map<String, Value>, a: InferenceArgs, c: SpecArgs) -> anyhow::Result<()> {
    if c.image.is_some()
        || !c.command.is_empty()
        || !c.env.is_empty()
        || !c.labels.is_empty()
        || c.memory.is_some()
        || c.cpus.is_some()
        || c.pids.is_some()
        || c.network
        || !c.inputs.is_empty()
        || !c.egress_bodies.is_empty()
    {
        bail!("an inference job takes no container flags (--image, --env, --input, --memory, a command, …)");
    }
    for (kind, model) in [("generate", a.generate), ("embed", a.embed)] {
        if let Some(model) = model {
            spec.insert("kind".into(), kind.into());
            spec.insert("model".into(), model.into());
        }
    }
    let put = |spec: &mut Map<String, Value>, k: &str, v: Option<Value>| {
        if let Some(v) = v {
            spec.insert(k.into(), v);
        }
    };
    put(spec, "prompt", a.prompt.map(Value::from));
    put(spec, "prompt_key", a.prompt_key.map(Value::from));
    put(spec, "max_tokens", a.max_tokens.map(Value::from));
    put(spec, "temperature", a.temperature.map(Value::from));
    put(spec, "seed", a.seed.map(Value::from));
    put(spec, "texts_key", a.texts_key.map(Value::from));
    put(spec, "output_prefix", c.output_prefix.map(Value::from));
    put(spec, "timeout_secs", c.timeout.map(|t| Value::from(t.as_secs())));
    if !a.stop.is_empty() {
        spec.insert("stop".into(), serde_json::to_value(&a.stop)?);
    }
    if !a.texts.is_empty() {
        spec.insert("texts".into(), serde_json::to_value(&a.texts)?);
    }
    if !spec.contains_key("kind") {
        bail!("say what to run: --generate MODEL_DIGEST or --embed MODEL_DIGEST (or spec.kind in the file)");
    }
    Ok(())
}

/// Writes the flags into a JSON `spec` object (flags win over what is there), leaving
/// `expires` to the caller.
pub fn apply_spec_flags(spec: &mut Map<String, Value>, a: SpecArgs) -> anyhow::Result<()> {
    if let Some(image) = a.image {
        spec.insert("image".into(), image.into());
    }
    if !a.command.is_empty() {
        spec.insert("command".into(), serde_json::to_value(&a.command)?);
    }
    merge_pairs(spec, "env", &a.env, "--env")?;
    merge_pairs(spec, "labels", &a.labels, "--label")?;
    if let Some(t) = a.timeout {
        spec.insert("timeout_secs".into(), t.as_secs().into());
    }
    if a.network {
        spec.insert("network".into(), true.into());
    }
    if a.memory.is_some() || a.cpus.is_some() || a.pids.is_some() {
        let res = object_at(spec, "resources")?;
        for (k, v) in [("memory_mb", a.memory), ("cpu_millis", a.cpus), ("pids", a.pids)] {
            if let Some(v) = v {
                res.insert(k.into(), v.into());
            }
        }
    }
    if !a.inputs.is_empty() {
        spec.insert("inputs".into(), serde_json::to_value(&a.inputs)?);
    }
    if let Some(p) = a.output_prefix {
        spec.insert("output_prefix".into(), p.into());
    }
    if !a.egress_bodies.is_empty() {
        spec.insert("egress_bodies".into(), serde_json::to_value(&a.egress_bodies)?);
    }
    if !spec.contains_key("image") {
        bail!("say which image runs: --image sha256:… (or spec.image in the file)");
    }
    Ok(())
}

pub(super) fn object_at<'a>(
    obj: &'a mut Map<String, Value>,
    key: &str,
) -> anyhow::Result<&'a mut Map<String, Value>> {
    obj.entry(key)
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| anyhow!("`{key}` must be a table/object"))
}

fn merge_pairs(spec: &mut Map<String, Value>, key: &str, pairs: &[String], flag: &str) -> anyhow::Result<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    let mut map: BTreeMap<String, String> = match spec.get(key) {
        Some(v) => serde_json::from_value(v.clone())
            .with_context(|| format!("spec.{key} must map names to strings"))?,
        None => BTreeMap::new(),
    };
    for kv in pairs {
        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow!("{flag} {kv:?} must be KEY=VALUE"))?;
        if k.is_empty() {
            bail!("{flag} {kv:?} has an empty KEY");
        }
        map.insert(k.into(), v.into());
    }
    spec.insert(key.into(), serde_json::to_value(map)?);
    Ok(())
}

pub(crate) fn read_job_file(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the job file {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "toml") {
        let v: toml::Value =
            toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
        Ok(serde_json::to_value(v)?)
    } else {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
    }
}

/// `90`, `90s`, `30m`, `2h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 2h, 7d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit in {s:?}; use s, m, h or d")),
    };
    n.checked_mul(factor).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long"))
}

/// `512m`, `2g`, `256` (MiB) → MiB.
pub fn parse_memory_mb(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches("ib").trim_end_matches('b');
    let (num, factor) = match lower.strip_suffix('g') {
        Some(n) => (n, 1024),
        None => (lower.strip_suffix('m').unwrap_or(lower), 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a memory size like 512m or 2g"))?;
    n.checked_mul(factor).ok_or_else(|| format!("{s:?} is too large"))
}

/// `0.5`, `2` (cores) → thousandths of a core.
pub fn parse_cpu_millis(s: &str) -> Result<u64, String> {
    let cores: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of cores like 0.5 or 2"))?;
    if !cores.is_finite() || cores <= 0.0 || cores > 1024.0 {
        return Err(format!("{s:?} must be between 0.001 and 1024 cores"));
    }
    Ok(((cores * 1000.0).round() as u64).max(1))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command, JobCommand};

    fn args(extra: &[&str]) -> SubmitArgs {
        let argv = ["outpost-control", "job", "submit"].iter().chain(extra).copied();
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Job(JobCommand::Submit(a)) => *a,
            other => panic!("not a submit: {other:?}"),
        }
    }

    #[test]
    fn durations_sizes_and_cores_take_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(parse_memory_mb("512m"), Ok(512));
        assert_eq!(parse_memory_mb("2G"), Ok(2048));
        assert_eq!(parse_memory_mb("64"), Ok(64));
        assert!(parse_memory_mb("lots").is_err());
        assert_eq!(parse_cpu_millis("0.5"), Ok(500));
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert!(parse_cpu_millis("-1").is_err());
    }

    #[test]
    fn flags_build_a_submit_request() {
        let image = format!("sha256:{}", "a".repeat(64));
        let a = args(&[
            "--node",
            "n1",
            "--image",
            &image,
            "--env",
            "A=1",
            "--timeout",
            "30s",
            "--memory",
            "64m",
            "--cpus",
            "0.25",
            "--network",
            "--",
            "sh",
            "-c",
            "echo hi",
        ]);
        let req = submit_request(a).expect("request");
        assert_eq!(req.node_id, "n1");
        let JobSpec::Container(spec) = req.spec else { panic!("not a container spec") };
        let req = (req.node_id, spec);
        assert_eq!(req.1.command, ["sh", "-c", "echo hi"]);
        assert_eq!(req.1.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(req.1.timeout_secs, 30);
        assert_eq!(req.1.resources.memory_mb, 64);
        assert_eq!(req.1.resources.cpu_millis, 250);
        assert!(req.1.network);
    }

    #[test]
    fn flags_override_a_toml_job_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.toml");
        let file = format!(
            "node_id = \"from-file\"\n[spec]\nimage = \"sha256:{}\"\ncommand = [\"true\"]\n[spec.env]\nA = \"file\"\nB = \"kept\"\n",
            "b".repeat(64)
        );
        std::fs::write(&path, file).expect("write");
        let a = args(&["--file", path.to_str().expect("utf-8 path"), "--node", "n2", "--env", "A=flag"]);
        let req = submit_request(a).expect("request");
        assert_eq!(req.node_id, "n2");
        let spec = req.spec.container().expect("a container spec");
        assert_eq!(spec.command, ["true"]);
        assert_eq!(spec.env.get("A").map(String::as_str), Some("flag"));
        assert_eq!(spec.env.get("B").map(String::as_str), Some("kept"));
    }

    #[test]
    fn inference_flags_build_generate_and_embed_jobs() {
        let model = "c".repeat(64);
        let a = args(&[
            "--node",
            "n1",
            "--generate",
            &model,
            "--prompt",
            "hi",
            "--max-tokens",
            "7",
            "--stop",
            "\n",
            "--temperature",
            "0.5",
            "--seed",
            "9",
            "--timeout",
            "1m",
        ]);
        let req = submit_request(a).expect("request");
        let spec = req.spec.inference().expect("an inference spec");
        assert_eq!(
            (spec.kind, spec.model.as_str()),
            (outpost_protocol::InferenceKind::Generate, model.as_str())
        );
        assert_eq!((spec.prompt.as_deref(), spec.max_tokens, spec.seed), (Some("hi"), 7, 9));
        assert_eq!((spec.temperature, spec.timeout_secs, spec.stop.len()), (0.5, 60, 1));
        assert_eq!(spec.check(), Ok(()));

        let req = submit_request(args(&["--node", "n1", "--embed", &model, "--text", "a", "--text", "b"]))
            .expect("request");
        let spec = req.spec.inference().expect("an inference spec");
        assert_eq!(spec.texts, ["a", "b"]);
        assert_eq!(spec.check(), Ok(()));

        let err = submit_request(args(&["--node", "n1", "--prompt", "hi"])).expect_err("no model");
        assert!(err.to_string().contains("--generate"), "{err}");
        let err = submit_request(args(&["--node", "n1", "--embed", &model, "--text", "a", "--env", "A=1"]))
            .expect_err("container flag");
        assert!(err.to_string().contains("no container flags"), "{err}");
    }

    #[test]
    fn a_submit_without_a_node_or_image_says_what_is_missing() {
        let err = submit_request(args(&["--image", "sha256:ab"])).expect_err("no node");
        assert!(err.to_string().contains("--node"), "{err}");
        let err = submit_request(args(&["--node", "n1"])).expect_err("no image");
        assert!(err.to_string().contains("--image"), "{err}");
    }

    #[test]
    fn unknown_fields_in_a_job_file_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.json");
        std::fs::write(&path, r#"{"node_id":"n","spec":{"image":"sha256:00","privileged":true}}"#)
            .expect("write");
        let err = submit_request(args(&["--file", path.to_str().expect("utf-8 path")])).expect_err("refused");
        assert!(format!("{err:#}").contains("privileged"), "{err:#}");
    }
}
