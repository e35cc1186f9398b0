//! The report of a `doctor` command (`outpost doctor`, `outpost-control doctor`): checks that
//! each say ✔ (fine), ⚠ (works, but look at it) or ✘ (broken), with one line on how to fix it.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    pub fn mark(self) -> &'static str {
        match self {
            Verdict::Ok => "✔",
            Verdict::Warn => "⚠",
            Verdict::Fail => "✘",
        }
    }
}

/// One check's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable name, for scripts (e.g. `identity`, `docker`, `disk`).
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// How to fix it (absent when nothing is to be done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self { name, verdict: Verdict::Ok, detail: detail.into(), fix: None }
    }
    pub fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { name, verdict: Verdict::Warn, detail: detail.into(), fix: Some(fix.into()) }
    }
    pub fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { name, verdict: Verdict::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(checks: Vec<Check>) -> Self {
        Self { ok: checks.iter().all(|c| c.verdict != Verdict::Fail), checks }
    }

    pub fn print(&self) {
        for c in &self.checks {
            println!("{} {:<13} {}", c.verdict.mark(), c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("  {:<13} fix: {fix}", "");
            }
        }
        let (warn, fail) = self.checks.iter().fold((0, 0), |(w, f), c| match c.verdict {
            Verdict::Warn => (w + 1, f),
            Verdict::Fail => (w, f + 1),
            Verdict::Ok => (w, f),
        });
        println!("{} checks: {fail} failed, {warn} warnings", self.checks.len());
    }
}

/// Free space below which a data directory is at risk, and below which it is worth a look.
const DISK_FAIL_BYTES: u64 = 1 << 30;
const DISK_WARN_BYTES: u64 = 5 << 30;

/// `path`, or the nearest ancestor that exists (a data directory not created yet is measured
/// where it will be).
fn existing_ancestor(path: &std::path::Path) -> &std::path::Path {
    let mut at = path;
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    at
}

/// The `disk` check of the data directory `dir` (or, not created yet, of where it will be):
/// `free_bytes` measures a path (statvfs, in the binaries), `holds` says what lives there.
pub fn disk(
    dir: &std::path::Path,
    holds: &str,
    free_bytes: impl FnOnce(&std::path::Path) -> Result<u64, String>,
) -> Check {
    let at = existing_ancestor(dir);
    let free = match free_bytes(at) {
        Ok(free) => free,
        Err(e) => {
            return Check::fail(
                "disk",
                format!("cannot measure {}: {e}", at.display()),
                "check that the path exists",
            );
        }
    };
    let detail = format!("{} free on {}", human_bytes(free), at.display());
    let fix = format!("free space there or move the data directory: {holds}");
    if free < DISK_FAIL_BYTES {
        Check::fail("disk", detail, fix)
    } else if free < DISK_WARN_BYTES {
        Check::warn("disk", detail, fix)
    } else {
        Check::ok("disk", detail)
    }
}

pub fn human_bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if n as f64 >= GIB { format!("{:.1} GiB", n as f64 / GIB) } else { format!("{:.0} MiB", n as f64 / MIB) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(5 << 20), "5 MiB");
    }

    #[test]
    fn little_free_space_fails_and_some_warns() {
        let at = std::path::Path::new("/");
        assert_eq!(disk(at, "x", |_| Ok(100 << 20)).verdict, Verdict::Fail);
        assert_eq!(disk(at, "x", |_| Ok(2 << 30)).verdict, Verdict::Warn);
        assert_eq!(disk(at, "x", |_| Ok(50 << 30)).verdict, Verdict::Ok);
        assert_eq!(disk(at, "x", |_| Err("no such file".into())).verdict, Verdict::Fail);
        let measured = std::cell::RefCell::new(None);
        disk(&at.join("not/created/yet"), "x", |p| {
            *measured.borrow_mut() = Some(p.to_owned());
            Ok(50 << 30)
        });
        assert_eq!(measured.into_inner().as_deref(), Some(at), "measured where it will be");
    }

    #[test]
    fn a_report_fails_only_on_a_failed_check() {
        let r = Report::new(vec![Check::ok("a", "x"), Check::warn("b", "y", "z")]);
        assert!(r.ok);
        let r = Report::new(vec![Check::ok("a", "x"), Check::fail("b", "y", "z")]);
        assert!(!r.ok);
    }
}
