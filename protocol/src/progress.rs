//! Progress bars for the long commands of both binaries (model import, image load, bundle build
//! and import). A bar is drawn on standard error, at most four times a second, and only when
//! standard error is a terminal and the command was not asked to be quiet (`--quiet`, `--json`):
//! scripts, pipes and logs see the result alone.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Bytes done of a known (or unknown: 0) total. Clones share one bar, so a clone can move to
/// the thread that does the work.
#[derive(Clone)]
pub struct Bar(ProgressBar);

/// Whether a bar would be seen: standard error is a terminal and nobody asked for quiet.
pub fn shown(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

impl Bar {
    /// A bar for `what`, drawn only when [`shown`] says so.
    pub fn bytes(what: &str, total: u64, quiet: bool) -> Self {
        if !shown(quiet) {
            return Self(ProgressBar::hidden());
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
        let bar = Self(bar);
        bar.set_total(total);
        bar.0.set_message(what.to_owned());
        bar
    }

    /// A bar that draws nothing, whatever is reported to it.
    pub fn hidden() -> Self {
        Self(ProgressBar::hidden())
    }

    /// Changes the total (0: unknown, then the bar shows the count and rate alone).
    pub fn set_total(&self, total: u64) {
        let template = if total > 0 {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left"
        } else {
            "{msg} {bytes} {bytes_per_sec}"
        };
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        self.0.set_style(style);
        self.0.set_length(total);
    }

    pub fn set_message(&self, what: &str) {
        self.0.set_message(what.to_owned());
    }

    /// Bytes done so far.
    pub fn set(&self, done: u64) {
        self.0.set_position(done);
    }

    pub fn inc(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    /// Removes the bar, leaving the terminal as it was for the command's own output.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }

    pub fn is_hidden(&self) -> bool {
        self.0.is_hidden()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_or_no_terminal_draws_nothing_and_still_counts() {
        let bar = Bar::bytes("importing", 100, true);
        assert!(bar.is_hidden());
        bar.inc(40);
        bar.set(70);
        bar.set_total(0);
        bar.finish();
        assert!(!shown(true));
    }
}
