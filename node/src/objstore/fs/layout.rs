//! How keys map onto the fs adapter's `keys/` tree, and the sorted walk that lists it.
//!
//! A key is split on `/` into segments; each segment but the last is a directory and the last
//! names the object's metadata file. Every name carries a one-letter kind prefix and the
//! segment percent-encoded (everything but `A-Z a-z 0-9 - _ . ~`), so no name is ever empty,
//! `.`, `..`, or contains a separator: `a b/ü/../x` becomes `da%20b/d%C3%BC/d../mx`, a
//! different file from `a b/x`'s, and nothing can point outside the root. A segment whose
//! encoding would exceed [`MAX_ENCODED`] is named by its SHA-256 instead, its text kept in the
//! metadata file (objects) or in a [`SEGMENT_FILE`] inside the directory (directories).

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::{Digest, Sha256};

/// Directory named by an encoded segment.
const DIR: char = 'd';
/// Directory named by the SHA-256 of a long segment.
const HASHED_DIR: char = 'D';
/// Metadata file named by an encoded segment.
const META: char = 'm';
/// Metadata file named by the SHA-256 of a long segment.
const HASHED_META: char = 'M';
/// Inside a hashed directory: the segment it stands for.
pub(super) const SEGMENT_FILE: &str = "s";
/// Longest encoded segment used as a name (file systems allow 255 bytes).
const MAX_ENCODED: usize = 200;

const KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// One directory on the way to a key's metadata file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DirStep {
    pub name: String,
    /// `Some(segment)` for a hashed directory, whose [`SEGMENT_FILE`] must hold it.
    pub hashed_segment: Option<String>,
}

/// Where a key's metadata lives, relative to `keys/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyPath {
    pub dirs: Vec<DirStep>,
    pub meta_name: String,
}

impl KeyPath {
    pub fn of(key: &str) -> Self {
        let mut segments: Vec<&str> = key.split('/').collect();
        let last = segments.pop().unwrap_or_default();
        let dirs = segments
            .into_iter()
            .map(|s| match encode(s) {
                Some(enc) => DirStep { name: format!("{DIR}{enc}"), hashed_segment: None },
                None => {
                    DirStep { name: format!("{HASHED_DIR}{}", hash(s)), hashed_segment: Some(s.to_string()) }
                }
            })
            .collect();
        let meta_name = match encode(last) {
            Some(enc) => format!("{META}{enc}"),
            None => format!("{HASHED_META}{}", hash(last)),
        };
        KeyPath { dirs, meta_name }
    }

    pub fn dir_under(&self, keys_root: &Path) -> PathBuf {
        let mut p = keys_root.to_path_buf();
        p.extend(self.dirs.iter().map(|d| d.name.as_str()));
        p
    }

    pub fn meta_under(&self, keys_root: &Path) -> PathBuf {
        self.dir_under(keys_root).join(&self.meta_name)
    }
}

fn encode(segment: &str) -> Option<String> {
    let enc = utf8_percent_encode(segment, KEEP).to_string();
    (enc.len() <= MAX_ENCODED).then_some(enc)
}

fn hash(segment: &str) -> String {
    hex::encode(Sha256::digest(segment.as_bytes()))
}

/// What a name in the tree stands for, once decoded.
#[derive(Debug)]
pub(super) enum Entry {
    Dir {
        segment: String,
        path: PathBuf,
    },
    /// `segment` is `None` for a hashed metadata file: its key is inside it.
    Meta {
        segment: Option<String>,
        path: PathBuf,
    },
}

/// Decode a directory entry's name; `None` for names that are not part of the tree.
pub(super) fn classify(dir: &Path, name: &str) -> std::io::Result<Option<Entry>> {
    let mut chars = name.chars();
    let kind = chars.next();
    let rest = chars.as_str();
    let path = dir.join(name);
    let decoded = || percent_decode_str(rest).decode_utf8().ok().map(|s| s.into_owned());
    Ok(match kind {
        Some(DIR) => decoded().map(|segment| Entry::Dir { segment, path }),
        Some(META) => decoded().map(|segment| Entry::Meta { segment: Some(segment), path }),
        Some(HASHED_META) => Some(Entry::Meta { segment: None, path }),
        Some(HASHED_DIR) => match std::fs::read_to_string(path.join(SEGMENT_FILE)) {
            Ok(segment) => Some(Entry::Dir { segment, path }),
            // A hashed directory left without its name by a crash holds nothing committed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        },
        _ => None,
    })
}

/// S3 order for the entries of one directory: a directory sorts as `segment/`, a file as
/// `segment`, so a depth-first walk visits keys in ascending byte order. (`a-c` < `a/b`
/// because `-` < `/`, although directory `a` < file `a-c` by name.)
pub(super) fn sort_key(segment: &str, is_dir: bool) -> Vec<u8> {
    let mut k = segment.as_bytes().to_vec();
    if is_dir {
        k.push(b'/');
    }
    k
}

/// Whether any key under `group` (which ends in `/`) can match `prefix` and sort after
/// `start_after`.
pub(super) fn group_may_match(group: &str, prefix: &str, start_after: Option<&str>) -> bool {
    let prefix_ok = group.starts_with(prefix) || prefix.starts_with(group);
    let after_ok = match start_after {
        None => true,
        Some(s) => s.starts_with(group) || s.cmp(group) == Ordering::Less,
    };
    prefix_ok && after_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_and_slashes_become_plain_names() {
        let p = KeyPath::of("a b/ü/../x");
        let names: Vec<&str> = p.dirs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["da%20b", "d%C3%BC", "d.."]);
        assert_eq!(p.meta_name, "mx");
        let p = KeyPath::of("/lead//trail/");
        let names: Vec<&str> = p.dirs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["d", "dlead", "d", "dtrail"]);
        assert_eq!(p.meta_name, "m");
        assert_eq!(KeyPath::of("a\\b%").meta_name, "ma%5Cb%25");
    }

    #[test]
    fn long_segments_are_hashed_and_stay_within_name_limits() {
        let long = "ü".repeat(300);
        let p = KeyPath::of(&format!("{long}/{long}"));
        assert_eq!(p.dirs[0].hashed_segment.as_deref(), Some(long.as_str()));
        assert!(p.dirs[0].name.starts_with('D') && p.dirs[0].name.len() == 65);
        assert!(p.meta_name.starts_with('M') && p.meta_name.len() == 65);
    }

    #[test]
    fn directories_sort_as_if_followed_by_a_slash() {
        assert!(sort_key("a-c", false) < sort_key("a", true));
        assert!(sort_key("a", false) < sort_key("a", true));
        assert!(sort_key("a", true) < sort_key("a0", false));
    }

    #[test]
    fn groups_are_skipped_only_when_no_key_in_them_can_match() {
        assert!(group_may_match("a/", "", None));
        assert!(group_may_match("a/", "a/b", None));
        assert!(group_may_match("a/b/", "a/", None));
        assert!(!group_may_match("b/", "a/", None));
        assert!(group_may_match("a/", "", Some("a/x")));
        assert!(group_may_match("b/", "", Some("a/x")));
        assert!(!group_may_match("a/", "", Some("a0")));
    }
}
