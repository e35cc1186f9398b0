//! Object keys as paths under a job's `/in` and `/out`. The object store treats keys as opaque,
//! but a job sees them as files, so only keys that map onto a path one way and stay inside the
//! mount are accepted: no empty, `.` or `..` segment, no leading `/`, no control characters.

use std::path::PathBuf;

use crate::objstore::key;

/// The longest file name most Linux filesystems take.
const MAX_SEGMENT_BYTES: usize = 255;

/// Checks `entry`, a key or (ending in `/`) a key prefix named by a job manifest, against the
/// object key rules and the path rule. The error says what is wrong in words.
pub fn check_entry(entry: &str) -> Result<(), String> {
    key::validate(entry).map_err(|e| e.to_string())?;
    check_segments(entry.strip_suffix('/').unwrap_or(entry), entry)
}

/// The relative path of the file that holds object `object_key`, or why the key cannot be a file.
pub fn key_path(object_key: &str) -> Result<PathBuf, String> {
    key::validate(object_key).map_err(|e| e.to_string())?;
    if object_key.ends_with('/') {
        return Err(format!(
            "key {} ends with '/': it names a prefix (a directory), not a file",
            key::display(object_key)
        ));
    }
    check_segments(object_key, object_key)?;
    Ok(object_key.split('/').collect())
}

/// The key an output file gets: `prefix` followed by its path under `/out`, `/`-separated.
pub fn output_key(prefix: &str, segments: &[String]) -> String {
    format!("{prefix}{}", segments.join("/"))
}

fn check_segments(path: &str, shown: &str) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("key {} {why}", key::display(shown)));
    if path.starts_with('/') {
        return refuse("starts with '/': keys map to paths under the job's directory and must be relative");
    }
    for segment in path.split('/') {
        match segment {
            "" => return refuse("has an empty path segment ('//' or a leading or doubled '/')"),
            "." | ".." => return refuse("has a '.' or '..' segment, which would name another path"),
            s if s.len() > MAX_SEGMENT_BYTES => {
                return refuse(&format!("has a segment longer than {MAX_SEGMENT_BYTES} bytes (a file name)"));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_keys_map_to_relative_paths_segment_by_segment() {
        assert_eq!(key_path("a.txt"), Ok(PathBuf::from("a.txt")));
        assert_eq!(key_path("data/2024/ü b.csv"), Ok(PathBuf::from("data").join("2024").join("ü b.csv")));
        assert_eq!(key_path("..a/b..").map(|p| p.components().count()), Ok(2));
    }

    #[test]
    fn keys_that_would_leave_the_directory_or_alias_another_path_are_refused() {
        for (k, why) in [
            ("", "empty"),
            ("/etc/passwd", "starts with '/'"),
            ("a//b", "empty path segment"),
            ("../x", "'..'"),
            ("a/../../x", "'..'"),
            ("a/./b", "'.'"),
            (".", "'.'"),
            ("a\0b", "U+0000"),
            ("a\nb", "U+000A"),
            ("dir/", "prefix"),
        ] {
            let err = key_path(k).expect_err(k);
            assert!(err.contains(why), "{k:?}: {err}");
        }
        assert!(key_path(&format!("a/{}", "x".repeat(256))).is_err(), "a segment longer than a file name");
    }

    #[test]
    fn manifest_entries_may_be_prefixes_but_follow_the_same_rules() {
        for ok in ["a", "a/b.txt", "data/", "results/run-1/"] {
            assert_eq!(check_entry(ok), Ok(()), "{ok:?}");
        }
        for bad in ["/", "//", "a//", "../", "a/../b/", "./x", "x\0/", ""] {
            assert!(check_entry(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn output_keys_join_the_prefix_and_the_path_with_slashes() {
        let segments = vec!["sub".to_owned(), "r.txt".to_owned()];
        assert_eq!(output_key("res/job-1/", &segments), "res/job-1/sub/r.txt");
        assert_eq!(output_key("res-", &segments), "res-sub/r.txt");
    }
}
