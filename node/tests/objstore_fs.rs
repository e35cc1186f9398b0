//! What only the `fs` adapter can get wrong: its files. Hostile keys stay inside the root,
//! damaged bodies never read as good data, one store owns a root, and a crash mid-put leaves
//! nothing visible and nothing that the next open does not sweep.

#![allow(clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use outpost_node::objstore::fs::FsStore;
use outpost_node::objstore::{ObjectStore, ObjectStoreError};
use tokio::io::AsyncReadExt;

/// Every file and directory under `dir`, relative to it.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            out.push(p.strip_prefix(dir).expect("under dir").to_path_buf());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

async fn read_all(store: &FsStore, key: &str) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    store.get(key).await.expect("get").read_to_end(&mut out).await.map(|_| out)
}

#[tokio::test]
async fn hostile_keys_never_leave_the_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("site/objects");
    let store = FsStore::open(&root).await.expect("open");
    let keys = [
        "../escape",
        "../../../../../../tmp/escape",
        "/etc/passwd",
        "a/../../b",
        "..\\..\\windows",
        "./.",
        "..",
        "%2e%2e/%2F",
        "\u{202e}txt.exe",
    ];
    for k in keys {
        store.put(k, k.as_bytes()).await.unwrap_or_else(|e| panic!("{k:?}: {e}"));
    }
    for k in keys {
        assert_eq!(read_all(&store, k).await.expect("read"), k.as_bytes(), "{k:?}");
    }
    let outside: Vec<PathBuf> =
        tree(dir.path()).into_iter().filter(|p| !p.starts_with("site/objects")).collect();
    assert_eq!(outside, [PathBuf::from("site")], "nothing outside the root");
    for k in keys {
        store.delete(k).await.expect("delete");
    }
    let left = tree(&root);
    assert_eq!(
        left,
        [".commit", ".lock", "blobs", "keys", "tmp"].map(PathBuf::from),
        "deletes prune emptied directories"
    );
}

#[tokio::test]
async fn a_damaged_body_fails_the_read_instead_of_passing_as_good_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsStore::open(dir.path()).await.expect("open");
    store.put("report.json", &b"{\"ok\":true}"[..]).await.expect("put");
    let blob =
        std::fs::read_dir(dir.path().join("blobs")).expect("blobs").next().expect("one blob").expect("entry");
    std::fs::write(blob.path(), b"{\"ok\":fals}").expect("flip bytes");
    let err = read_all(&store, "report.json").await.expect_err("damaged");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("integrity"), "{err}");
    std::fs::write(blob.path(), b"{\"ok\":true} and more").expect("grow");
    assert!(read_all(&store, "report.json").await.is_err(), "a longer body fails too");
}

#[tokio::test]
async fn two_stores_on_one_root_see_each_other_and_a_second_open_sweeps_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = FsStore::open(dir.path()).await.expect("open");
    // What looks like a crash's leftover may be another process's put in flight: a store
    // opened while another is open must leave it alone.
    std::fs::write(dir.path().join("blobs/0000-in-flight"), b"half an upload").expect("blob");
    let second = FsStore::open(dir.path()).await.expect("a second open joins the first");
    assert!(dir.path().join("blobs/0000-in-flight").exists(), "no sweep while another store is open");

    let puts: Vec<_> = (0..20)
        .map(|i| {
            let (a, b) = (first.clone(), second.clone());
            tokio::spawn(async move {
                a.put(&format!("k/{i}"), format!("a{i}").as_bytes()).await.expect("put a");
                b.put(&format!("k/{i}"), format!("b{i}").as_bytes()).await.expect("put b");
                b.put(&format!("only-b/{i}"), &b"x"[..]).await.expect("put b2");
                a.delete(&format!("only-b/{i}")).await.expect("delete from a");
            })
        })
        .collect();
    for p in puts {
        p.await.expect("join");
    }
    for i in 0..20 {
        assert_eq!(read_all(&first, &format!("k/{i}")).await.expect("read"), format!("b{i}").as_bytes());
    }
    assert!(first.list("only-b/", None, 100).await.expect("list").objects.is_empty());
    drop((first, second));
    FsStore::open(dir.path()).await.expect("open alone");
    assert!(!dir.path().join("blobs/0000-in-flight").exists(), "opened alone, the store sweeps");
}

#[tokio::test]
async fn leftovers_of_a_crash_are_invisible_and_swept_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    {
        let store = FsStore::open(root).await.expect("open");
        store.put("kept", &b"kept"[..]).await.expect("put");
    }
    // What a SIGKILL between the steps of a put can leave: a blob no key refers to, metadata
    // not yet renamed into place, a hashed directory that never got its name.
    std::fs::write(root.join("blobs/0000-orphan"), b"half an upload").expect("orphan blob");
    std::fs::write(root.join("tmp/1111.meta"), b"{").expect("tmp meta");
    std::fs::create_dir(root.join(format!("keys/D{}", "0".repeat(64)))).expect("nameless dir");

    let store = FsStore::open(root).await.expect("reopen");
    assert!(!root.join("blobs/0000-orphan").exists(), "orphan blob swept");
    assert_eq!(std::fs::read_dir(root.join("tmp")).expect("tmp").count(), 0, "tmp emptied");
    assert_eq!(std::fs::read_dir(root.join("blobs")).expect("blobs").count(), 1, "the live blob kept");
    let listed = store.list("", None, 100).await.expect("list").objects;
    assert_eq!(listed.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["kept"]);
    assert_eq!(read_all(&store, "kept").await.expect("read"), b"kept");
}

#[tokio::test]
async fn overwriting_and_copying_leave_no_stray_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsStore::open(dir.path()).await.expect("open");
    for i in 0..5 {
        store.put("same", format!("v{i}").as_bytes()).await.expect("put");
    }
    store.copy("same", "other").await.expect("copy");
    let blobs = || std::fs::read_dir(dir.path().join("blobs")).expect("blobs").count();
    assert_eq!(blobs(), 2, "one blob per live key");
    store.delete("same").await.expect("delete");
    store.delete("other").await.expect("delete");
    assert_eq!(blobs(), 0);
}

#[tokio::test]
async fn unreadable_metadata_is_an_integrity_error_and_stops_the_sweep() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    {
        let store = FsStore::open(root).await.expect("open");
        store.put("good", &b"good"[..]).await.expect("put");
        store.put("bad", &b"bad"[..]).await.expect("put");
    }
    std::fs::write(root.join("keys/mbad"), b"{ not json").expect("damage metadata");
    let store = FsStore::open(root).await.expect("a damaged record does not stop the store");
    assert_eq!(
        std::fs::read_dir(root.join("blobs")).expect("blobs").count(),
        2,
        "no blob swept while unsure"
    );
    let err = store.head("bad").await.expect_err("damaged");
    assert!(matches!(err, ObjectStoreError::Integrity { .. }), "{err}");
    assert_eq!(read_all(&store, "good").await.expect("read"), b"good");
}

/// The body of version `v` of key `k`: 1 MiB of one repeated word, so a mix of two versions
/// is visible.
fn versioned_body(k: u64, v: u64) -> Vec<u8> {
    (k << 32 | v).to_le_bytes().repeat(128 * 1024)
}

/// Run by `a_sigkill_mid_put_leaves_every_key_whole` in a child process: overwrite four keys
/// forever.
#[tokio::test]
#[ignore = "a helper process for the SIGKILL test"]
async fn sigkill_child_overwrites_keys_forever() {
    let Ok(root) = std::env::var("OBJSTORE_SIGKILL_ROOT") else { return };
    let store = FsStore::open(&root).await.expect("child open");
    for v in 0u64.. {
        for k in 0..4u64 {
            store.put(&format!("key {k}"), &versioned_body(k, v)[..]).await.expect("child put");
        }
        if v == 2 {
            std::fs::write(format!("{root}.ready"), b"").expect("ready marker");
        }
    }
}

#[tokio::test]
async fn a_sigkill_mid_put_leaves_every_key_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let root_s = root.to_str().expect("utf-8 path").to_string();
    for round in 0..3u64 {
        let ready = PathBuf::from(format!("{root_s}.ready"));
        let _ = std::fs::remove_file(&ready);
        let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "sigkill_child_overwrites_keys_forever", "--ignored", "--nocapture"])
            .env("OBJSTORE_SIGKILL_ROOT", &root_s)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn child");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !ready.exists() {
            assert!(std::time::Instant::now() < deadline, "child never got going");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50 + 70 * round)).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");

        let store = FsStore::open(&root).await.expect("reopen after SIGKILL");
        let listed = store.list("", None, 100).await.expect("list").objects;
        assert_eq!(listed.len(), 4, "round {round}: every key still there");
        for (k, meta) in listed.iter().enumerate() {
            let body = read_all(&store, &meta.key).await.expect("a whole, verified body");
            let word = &body[..8];
            assert!(body.chunks(8).all(|w| w == word), "round {round}: {} mixes versions", meta.key);
            assert_eq!(u64::from_le_bytes(word.try_into().expect("8 bytes")) >> 32, k as u64);
        }
        assert_eq!(std::fs::read_dir(root.join("blobs")).expect("blobs").count(), 4, "orphans swept");
        assert_eq!(std::fs::read_dir(root.join("tmp")).expect("tmp").count(), 0);
    }
}
