//! `outpost-control bundle build|import-results`: the operator's side of the sneakernet. Files
//! (images, models) are hashed and packed here, streamed: the bundle is never held in memory,
//! and only sizes and digests cross the API; the control plane signs the manifest.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use outpost_protocol::progress::Bar;
use outpost_protocol::{
    BundleFile, BundleRequest, BundleResponse, JobSpec, MANIFEST_MEMBER, PartKind, ResultsBundle,
    ResultsImport,
};
use sha2::{Digest, Sha256};

use crate::client::Client;

// Parsed once per process from the command line: the size of a variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Build a signed bundle for air-gapped nodes: images, models, jobs and deployments in one
    /// file (zstd-compressed tar) that `outpost bundle import` verifies and applies.
    ///
    /// Each job is created for each target node as if submitted (it shows in `job list`, and a
    /// node that later connects is offered it too, and knows it already). Each deployment
    /// carries the desired state its rollout signed for each target node.
    Build {
        /// Organisation of the target nodes.
        #[arg(long)]
        org: String,
        /// A target node (repeat for several).
        #[arg(long = "node", value_name = "NODE_ID", required_unless_present = "selector")]
        nodes: Vec<String>,
        /// The org's nodes this label selector matches now.
        #[arg(long, conflicts_with = "nodes")]
        selector: Option<String>,
        /// An image tarball (`docker save`), loaded into each node's engine.
        #[arg(long = "image", value_name = "TAR")]
        images: Vec<PathBuf>,
        /// A model directory (manifest.json beside its files) or its plain .tar.
        #[arg(long = "model", value_name = "DIR|TAR")]
        models: Vec<PathBuf>,
        /// A job file (TOML or JSON, as for `job submit`: its `spec`, or a bare spec).
        #[arg(long = "job", value_name = "FILE")]
        jobs: Vec<PathBuf>,
        /// A configuration drop-in (TOML) for every target node: only the tables `node`,
        /// `agent`, `relay` and `inference`; the node's own files win where both set a key, and
        /// it applies when the agent next starts.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// A deployment (by name, see `deploy list`) whose service each target node runs.
        #[arg(long = "deployment", value_name = "NAME")]
        deployments: Vec<String>,
        /// Seal the results of the bundle's jobs for this age X25519 public key (`age1…`;
        /// repeatable), as `job submit --recipient` does.
        #[arg(long = "recipient", value_name = "AGE_PUBLIC_KEY")]
        recipients: Vec<String>,
        /// How long the bundle and its jobs stay valid (e.g. 7d; default 30d).
        #[arg(long, value_parser = super::submit::parse_duration)]
        expires: Option<Duration>,
        /// Where to write the bundle.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// No progress bar (there is none either when standard error is not a terminal).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Import a node's results bundle (from `outpost bundle export-results`): each result is
    /// stored once, whatever was imported or delivered before; writes the acknowledgement
    /// bundle that clears the node's outbox when it imports it.
    ImportResults {
        file: PathBuf,
        /// Where to write the acknowledgement bundle for the node.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// Largest results bundle read (compressed or not).
const MAX_RESULTS_BYTES: u64 = 256 * 1024 * 1024;

pub async fn run(c: &Client, json: bool, cmd: BundleCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BundleCommand::Build {
            org,
            nodes,
            selector,
            images,
            models,
            jobs,
            config,
            deployments,
            recipients,
            expires,
            out,
            quiet,
        } => {
            outpost_protocol::seal::check_recipients(&recipients)
                .map_err(|why| anyhow!("--recipient: {why}"))?;
            let tmp_dir = tempdir_near(&out)?;
            let mut sources = Vec::new();
            let mut files = Vec::new();
            for path in &images {
                let (size, sha256) = digest_file(path, quiet)?;
                files.push(BundleFile { kind: PartKind::Image, size, sha256, label: label_of(path) });
                sources.push(path.clone());
            }
            for path in &models {
                let tar = if path.is_dir() {
                    let tar = tmp_dir.path().join(format!("model-{}.tar", sources.len()));
                    model_tar(path, &tar)?;
                    tar
                } else {
                    path.clone()
                };
                let (size, sha256) = digest_file(&tar, quiet)?;
                files.push(BundleFile { kind: PartKind::Model, size, sha256, label: label_of(path) });
                sources.push(tar);
            }
            if let Some(path) = &config {
                check_config_file(path)?;
                let (size, sha256) = digest_file(path, false)?;
                files.push(BundleFile { kind: PartKind::Config, size, sha256, label: label_of(path) });
                sources.push(path.clone());
            }
            let mut specs = Vec::new();
            for path in &jobs {
                specs.push(job_spec(path)?);
            }
            let req = BundleRequest {
                nodes,
                selector,
                files,
                jobs: specs,
                deployments,
                expires_in_secs: expires.map(|d| d.as_secs()),
                recipients,
            };
            let resp = c.bundle(&org, &req).await?;
            if !json && !resp.jobs.is_empty() {
                // Said before the file is written: should writing fail, these jobs exist (queued)
                // and can be cancelled with `job cancel`.
                eprintln!(
                    "created {} job(s) (queued): {}",
                    resp.jobs.len(),
                    resp.jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>().join(" ")
                );
            }
            let written = write_bundle(&out, &resp, &sources, quiet)?;
            if json {
                println!("{}", serde_json::to_string(&resp)?);
            } else {
                let manifest: outpost_protocol::BundleManifest =
                    serde_json::from_str(&resp.manifest.payload)?;
                eprintln!(
                    "bundle {} for {} node(s): {} part(s), {} job(s); {} bytes written to {}",
                    manifest.bundle_id,
                    manifest.counters.len(),
                    manifest.parts.len(),
                    resp.jobs.len(),
                    written,
                    out.display()
                );
                for j in &resp.jobs {
                    println!("{}\t{}", j.job_id, j.node_id);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::ImportResults { file, out } => {
            let bundle = read_results(&file)?;
            let got: ResultsImport = c.import_results(&bundle).await?;
            write_bundle(&out, &got.ack, &[], false)?;
            if json {
                println!("{}", serde_json::to_string(&got)?);
            } else {
                println!(
                    "node {}: {} result(s) stored, {} already stored, {} superseded, {} refused; {} relay event(s) \
                     stored (all up to seq {}); service reports stored up to seq {}; {} audit entr(ies) stored (the \
                     node's log up to seq {})",
                    got.node_id,
                    got.stored.len(),
                    got.duplicates.len(),
                    got.superseded.len(),
                    got.refused.len(),
                    got.events_stored,
                    got.events_up_to_seq,
                    got.service_reports_up_to_seq,
                    got.audit_stored,
                    got.audit_up_to_seq
                );
                for key in &got.stored {
                    println!("stored\t{key}");
                }
                for (key, why) in &got.refused {
                    println!("refused\t{key}\t{why}");
                }
                eprintln!("acknowledgement bundle written to {}; import it on the node", out.display());
            }
            Ok(if got.refused.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

/// A configuration part must be small TOML naming only what a bundle may set; the node checks
/// again that it would still start with it.
fn check_config_file(path: &Path) -> anyhow::Result<()> {
    let size = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    if size > outpost_protocol::MAX_CONFIG_PART_BYTES {
        bail!("{}: {size} bytes, more than {}", path.display(), outpost_protocol::MAX_CONFIG_PART_BYTES);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow!("{} is not TOML: {}", path.display(), e.message()))?;
    outpost_protocol::check_bundle_config(&serde_json::to_value(&table)?)
        .map_err(|why| anyhow!("{}: {why}", path.display()))?;
    Ok(())
}

fn label_of(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn tempdir_near(out: &Path) -> anyhow::Result<tempfile::TempDir> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    tempfile::Builder::new()
        .prefix(".outpost-bundle-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot create a temporary directory in {}", dir.display()))
}

/// A job file's spec: its `spec` table, or the whole file.
fn job_spec(path: &Path) -> anyhow::Result<JobSpec> {
    let value = super::submit::read_job_file(path)?;
    let spec = value.get("spec").cloned().unwrap_or(value);
    serde_json::from_value(spec).with_context(|| format!("{} does not hold a valid job spec", path.display()))
}

/// Size and SHA-256 of a file, streamed.
fn digest_file(path: &Path, quiet: bool) -> anyhow::Result<(u64, String)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = BufReader::with_capacity(1024 * 1024, file);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut done = 0u64;
    let bar = Bar::bytes(&format!("hashing {}", label_of(path)), total, quiet);
    loop {
        let n = reader.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        done += n as u64;
        bar.set(done);
    }
    bar.finish();
    Ok((done, hex::encode(hash.finalize())))
}

/// A model directory as the plain tar the node's model store imports: `manifest.json` first,
/// then every other file, paths relative to the directory.
fn model_tar(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let manifest = dir.join("manifest.json");
    if !manifest.is_file() {
        bail!("{} has no manifest.json: sign the model first (models/README.md)", dir.display());
    }
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    tar.mode(tar::HeaderMode::Deterministic);
    tar.append_path_with_name(&manifest, "manifest.json")?;
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files)?;
    files.sort();
    for rel in files.iter().filter(|r| r.as_path() != Path::new("manifest.json")) {
        tar.append_path_with_name(dir.join(rel), rel)?;
    }
    tar.into_inner()?.flush()?;
    Ok(())
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            bail!("{} is a symbolic link; a model directory holds plain files", entry.path().display());
        }
        if kind.is_dir() {
            collect_files(root, &entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path().strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

/// Writes the bundle: the signed manifest, then each part in manifest order (the caller's
/// files for `None`, the control plane's bytes otherwise), zstd-compressed, via a temporary
/// file renamed into place. Returns the bytes written.
fn write_bundle(out: &Path, resp: &BundleResponse, files: &[PathBuf], quiet: bool) -> anyhow::Result<u64> {
    let manifest: outpost_protocol::BundleManifest = serde_json::from_str(&resp.manifest.payload)
        .context("the control plane answered an unreadable manifest")?;
    if manifest.parts.len() != resp.parts.len() {
        bail!("the control plane's answer does not match its manifest");
    }
    let tmp = out.with_extension("partial");
    let written = write_parts(&tmp, &manifest, resp, files, quiet);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let written = written?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot move the bundle to {}", out.display()))?;
    Ok(written)
}

fn write_parts(
    tmp: &Path,
    manifest: &outpost_protocol::BundleManifest,
    resp: &BundleResponse,
    files: &[PathBuf],
    quiet: bool,
) -> anyhow::Result<u64> {
    let file = File::create(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut enc = zstd::stream::write::Encoder::new(BufWriter::with_capacity(1024 * 1024, file), 3)?;
    enc.include_checksum(true)?;
    let total: u64 = manifest.parts.iter().map(|p| p.size).sum();
    let bar = Bar::bytes("writing bundle", total, quiet);
    {
        let mut tar = tar::Builder::new(&mut enc);
        let manifest_bytes = serde_json::to_vec(&resp.manifest)?;
        let digest = hex::encode(Sha256::digest(&manifest_bytes));
        append(
            &mut tar,
            MANIFEST_MEMBER,
            manifest_bytes.len() as u64,
            &digest,
            &mut manifest_bytes.as_slice(),
        )?;
        let mut next_file = files.iter();
        for (part, body) in manifest.parts.iter().zip(&resp.parts) {
            match body {
                Some(text) => append(&mut tar, &part.name, part.size, &part.sha256, &mut text.as_bytes())?,
                None => {
                    let path = next_file.next().ok_or_else(|| anyhow!("more file parts than files"))?;
                    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
                    let mut reader =
                        ProgressReader { inner: BufReader::with_capacity(1024 * 1024, f), bar: &bar };
                    append(&mut tar, &part.name, part.size, &part.sha256, &mut reader)
                        .with_context(|| format!("{} ({})", path.display(), part.label))?;
                }
            }
        }
        tar.finish()?;
    }
    bar.finish();
    let mut w = enc.finish()?;
    w.flush()?;
    let file = w.into_inner().map_err(|e| anyhow!("cannot write {}: {}", tmp.display(), e.error()))?;
    file.sync_all()?;
    Ok(file.metadata().map(|m| m.len()).unwrap_or(0))
}

/// Appends one member of exactly `size` bytes whose SHA-256 must be `sha256`: a file that
/// changed since it was hashed fails the build instead of making a bundle every node refuses.
fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    sha256: &str,
    data: &mut dyn Read,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut checked = Checked { inner: data.take(size), hash: Sha256::new(), seen: 0 };
    tar.append_data(&mut header, name, &mut checked).with_context(|| format!("cannot write {name}"))?;
    if checked.seen != size || hex::encode(checked.hash.finalize()) != sha256 {
        bail!(
            "{name} changed since it was hashed ({} of {size} bytes read, or different bytes); build the bundle again",
            checked.seen
        );
    }
    Ok(())
}

/// Counts and hashes what goes through it.
struct Checked<R> {
    inner: R,
    hash: Sha256,
    seen: u64,
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.seen += n as u64;
        Ok(n)
    }
}

struct ProgressReader<'a, R> {
    inner: R,
    bar: &'a Bar,
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// A results bundle: zstd-compressed JSON, bounded.
fn read_results(path: &Path) -> anyhow::Result<ResultsBundle> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let dec = zstd::stream::read::Decoder::new(file)
        .with_context(|| format!("{} is not a results bundle", path.display()))?;
    let mut text = Vec::new();
    dec.take(MAX_RESULTS_BYTES + 1).read_to_end(&mut text).with_context(|| {
        format!("{} is not a readable results bundle (truncated or damaged?)", path.display())
    })?;
    if text.len() as u64 > MAX_RESULTS_BYTES {
        bail!("{} holds more than {MAX_RESULTS_BYTES} bytes of results", path.display());
    }
    serde_json::from_slice(&text).with_context(|| format!("{} is not a results bundle", path.display()))
}
