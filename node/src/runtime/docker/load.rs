//! `docker load` of an image tarball, streamed from disk so a multi-gigabyte file never sits in
//! memory, and the ids of the images it brought.

use std::path::Path;

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::query_parameters::ImportImageOptions;
use futures_util::{StreamExt, TryStreamExt};
use tokio_util::codec::{BytesCodec, FramedRead};

use super::convert::{engine_error, status_of};
use crate::runtime::{Result, RuntimeError};

const READ_CHUNK: usize = 256 * 1024;

/// Told the bytes of each piece of a tarball sent to the engine (a progress bar).
pub type Sent = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// What one line of the engine's load report names.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Loaded {
    Id(String),
    Name(String),
}

/// Parses "Loaded image ID: sha256:..." and "Loaded image: name:tag"; other lines are progress.
pub(super) fn parse_loaded_line(line: &str) -> Option<Loaded> {
    let line = line.trim();
    if let Some(id) = line.strip_prefix("Loaded image ID:") {
        return Some(Loaded::Id(id.trim().to_owned()));
    }
    line.strip_prefix("Loaded image:").map(|name| Loaded::Name(name.trim().to_owned()))
}

/// Streams `tar` to the engine's load API and returns the ids of the images in it, in order.
/// `sent` hears the size of each piece of the file as it goes to the engine.
pub(super) async fn load_image(docker: &Docker, tar: &Path, sent: Sent) -> Result<Vec<String>> {
    let shown = tar.display();
    let file = tokio::fs::File::open(tar)
        .await
        .map_err(|e| RuntimeError::Invalid(format!("cannot open image tarball {shown}: {e}")))?;
    let body = FramedRead::with_capacity(file, BytesCodec::new(), READ_CHUNK).map_ok(move |chunk| {
        sent(chunk.len() as u64);
        chunk.freeze()
    });
    let options = ImportImageOptions { quiet: true, ..Default::default() };
    let mut report = docker.import_image_stream(options, body, None);

    let mut loaded = Vec::new();
    while let Some(item) = report.next().await {
        match item {
            Ok(info) => {
                for line in info.stream.iter().chain(info.status.iter()).flat_map(|s| s.lines()) {
                    loaded.extend(parse_loaded_line(line));
                }
            }
            // The engine read the upload and refused it: a truncated file or not an image.
            Err(EngineError::DockerStreamError { error }) => {
                return Err(RuntimeError::Invalid(format!(
                    "image tarball {shown} was refused by the Docker engine: {error}; is it a complete \
                     `docker save` archive?"
                )));
            }
            Err(e) if status_of(&e).is_some_and(|s| s < 500) => {
                return Err(RuntimeError::Invalid(format!(
                    "image tarball {shown} was refused by the Docker engine: {e}"
                )));
            }
            Err(e) => return Err(engine_error(&format!("load image tarball {shown}"), e)),
        }
    }
    if loaded.is_empty() {
        return Err(RuntimeError::Invalid(format!(
            "the Docker engine loaded no image from {shown}; is it a `docker save` archive?"
        )));
    }

    let mut ids: Vec<String> = Vec::with_capacity(loaded.len());
    for entry in loaded {
        let id = match entry {
            Loaded::Id(id) => id,
            Loaded::Name(name) => {
                let what = format!("resolve image {name} loaded from {shown}");
                let image = docker.inspect_image(&name).await.map_err(|e| engine_error(&what, e))?;
                image.id.ok_or_else(|| RuntimeError::Unavailable(format!("{what}: the engine gave no id")))?
            }
        };
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_report_lines_name_ids_and_tags() {
        assert_eq!(parse_loaded_line("Loaded image ID: sha256:abc\n"), Some(Loaded::Id("sha256:abc".into())));
        assert_eq!(
            parse_loaded_line("Loaded image: outpost-test-busybox:latest\n"),
            Some(Loaded::Name("outpost-test-busybox:latest".into()))
        );
        assert_eq!(parse_loaded_line("Loading layer  1.9MB/1.9MB"), None);
        assert_eq!(parse_loaded_line(""), None);
    }
}
