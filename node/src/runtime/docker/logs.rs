//! Collects the tails of a container's stdout and stderr in bounded memory, however much the job
//! wrote: at most about twice `max_bytes` per stream is ever held.
//!
//! The whole retained log is read, not the engine's `tail=N`: that counts lines of both streams
//! together, so a chatty stdout would push the last stderr lines out of the window. What is
//! read stays bounded because every container's log rotates (see `spec::LOG_MAX_SIZE`).

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptions;
use futures_util::StreamExt;

use crate::runtime::Output;

/// The last `keep` bytes of a stream, and whether more than that went by.
pub(super) struct Tail {
    keep: usize,
    buf: Vec<u8>,
    seen: u64,
}

impl Tail {
    pub(super) fn new(keep: usize) -> Self {
        Self { keep, buf: Vec::new(), seen: 0 }
    }

    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.seen = self.seen.saturating_add(bytes.len() as u64);
        if bytes.len() >= self.keep {
            self.buf.clear();
            self.buf.extend_from_slice(&bytes[bytes.len() - self.keep..]);
            return;
        }
        self.buf.extend_from_slice(bytes);
        // Compact only now and then, so the copying stays linear in the input.
        if self.buf.len() > self.keep.saturating_mul(2) {
            let excess = self.buf.len() - self.keep;
            self.buf.drain(..excess);
        }
    }

    /// The tail as text of at most `keep` bytes, starting at a character boundary (invalid UTF-8
    /// is replaced), and whether anything was cut.
    pub(super) fn finish(mut self) -> (String, bool) {
        let truncated = self.seen > self.keep as u64;
        if self.buf.len() > self.keep {
            let excess = self.buf.len() - self.keep;
            self.buf.drain(..excess);
        }
        let mut start = 0;
        if truncated {
            // The cut may have split a character: drop its continuation bytes.
            while start < self.buf.len().min(3) && self.buf[start] & 0xC0 == 0x80 {
                start += 1;
            }
        }
        let text = String::from_utf8_lossy(&self.buf[start..]).into_owned();
        if text.len() <= self.keep {
            return (text, truncated);
        }
        // Replacement characters are wider than the bytes they replace: cut again.
        let mut cut = text.len() - self.keep;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        (text[cut..].to_owned(), true)
    }
}

/// Reads the container's logs and keeps the last `max_bytes` of each stream. Exact while
/// `max_bytes` is below what rotation keeps (well over 100 KiB even of one-byte lines).
pub(super) async fn collect(
    docker: &Docker,
    name: &str,
    max_bytes: usize,
) -> Result<Output, bollard::errors::Error> {
    let options = LogsOptions {
        stdout: true,
        stderr: true,
        follow: false,
        timestamps: false,
        tail: "all".into(),
        ..Default::default()
    };
    let (mut stdout, mut stderr) = (Tail::new(max_bytes), Tail::new(max_bytes));
    let mut logs = docker.logs(name, Some(options));
    while let Some(item) = logs.next().await {
        match item? {
            LogOutput::StdOut { message } | LogOutput::Console { message } => stdout.push(&message),
            LogOutput::StdErr { message } => stderr.push(&message),
            LogOutput::StdIn { .. } => {}
        }
    }
    let (stdout_tail, out_cut) = stdout.finish();
    let (stderr_tail, err_cut) = stderr.finish();
    Ok(Output { stdout_tail, stderr_tail, truncated: out_cut || err_cut })
}

/// The container's output as the engine hands it over, stdout and stderr interleaved, from its
/// last `tail_lines` lines on (and everything after, with `follow`).
pub(super) fn stream(
    docker: Docker,
    name: String,
    follow: bool,
    tail_lines: u64,
) -> crate::runtime::LogStream {
    let options = LogsOptions {
        stdout: true,
        stderr: true,
        follow,
        tail: tail_lines.to_string(),
        ..Default::default()
    };
    let what = format!("read the logs of container {name}");
    Box::pin(docker.logs(&name, Some(options)).filter_map(move |item| {
        let out = match item {
            Ok(
                LogOutput::StdOut { message }
                | LogOutput::StdErr { message }
                | LogOutput::Console { message },
            ) => Some(Ok(message.to_vec())),
            Ok(LogOutput::StdIn { .. }) => None,
            Err(e) => Some(Err(super::convert::engine_error(&what, e))),
        };
        std::future::ready(out)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(keep: usize, chunks: &[&[u8]]) -> (String, bool) {
        let mut tail = Tail::new(keep);
        for chunk in chunks {
            tail.push(chunk);
        }
        tail.finish()
    }

    #[test]
    fn a_short_stream_comes_back_whole() {
        assert_eq!(tail_of(10, &[b"ab", b"cd\n"]), ("abcd\n".to_owned(), false));
        assert_eq!(tail_of(5, &[b"abcde"]), ("abcde".to_owned(), false));
        assert_eq!(tail_of(0, &[]), (String::new(), false));
    }

    #[test]
    fn a_long_stream_keeps_its_last_bytes_and_says_so() {
        let chunks: Vec<&[u8]> = std::iter::repeat_n(&b"0123456789"[..], 1000).collect();
        assert_eq!(tail_of(4, &chunks), ("6789".to_owned(), true));
        assert_eq!(tail_of(4, &[b"abcdefgh"]), ("efgh".to_owned(), true));
        assert_eq!(tail_of(0, &[b"x"]), (String::new(), true));
    }

    #[test]
    fn the_cut_never_splits_a_character() {
        // "é" is two bytes; keeping 3 bytes of "aéé" would start mid-character.
        let (text, truncated) = tail_of(3, &["aéé".as_bytes()]);
        assert!(truncated);
        assert_eq!(text, "é");
    }

    #[test]
    fn invalid_utf8_is_replaced_within_the_bound() {
        let (text, truncated) = tail_of(4, &[&[0xff, 0xfe, 0xfd, 0xfc]]);
        assert!(text.len() <= 4, "{text:?}");
        assert!(text.starts_with('\u{fffd}'));
        assert!(truncated);
    }
}
