//! The ObjectStore contract, run against both adapters: `fs` in a temp dir and `s3` against a
//! real Garage on loopback. The s3 half reads the server from the env file named by
//! `OUTPOST_TEST_S3_ENV` (written by `scripts/s3-server start DIR`) and fails, never skips,
//! when it is missing. Every test works under its own random prefix, so tests can share the
//! bucket and run in parallel.

#![allow(clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use outpost_node::objstore::fs::FsStore;
use outpost_node::objstore::s3::{S3Credentials, S3Settings, S3Store};
use outpost_node::objstore::{ObjectStore, ObjectStoreError, key::MAX_KEY_BYTES};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// What differs between adapters, stated rather than hidden.
struct Caps {
    /// Keys with `.`/`..` segments or a leading `/` round-trip (fs) or are refused with
    /// `InvalidKey` (s3: URL normalisation and Garage would alias them to other keys).
    path_like_keys: bool,
    /// Large puts are multipart, whose ETags end in `-<parts>`.
    multipart: bool,
}

struct Backend<S> {
    store: S,
    caps: Caps,
    /// Unique to the test: every key it writes starts with it.
    p: String,
    _dir: Option<tempfile::TempDir>,
}

fn unique_prefix() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

async fn fs_backend() -> Backend<FsStore> {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsStore::open(dir.path().join("store")).await.expect("open fs store");
    Backend {
        store,
        caps: Caps { path_like_keys: true, multipart: false },
        p: unique_prefix(),
        _dir: Some(dir),
    }
}

/// The variables of the env file that `scripts/s3-server start` writes.
fn s3_env() -> BTreeMap<String, String> {
    let Ok(path) = std::env::var("OUTPOST_TEST_S3_ENV") else {
        panic!(
            "OUTPOST_TEST_S3_ENV is not set: the s3 contract tests need a real S3 server. Run \
             `scripts/s3-server start DIR` and set OUTPOST_TEST_S3_ENV=DIR/s3.env (scripts/test does both)"
        );
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("OUTPOST_TEST_S3_ENV={path} cannot be read ({e}); is the server started?")
    });
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn s3_settings(env: &BTreeMap<String, String>) -> S3Settings {
    let var = |k: &str| {
        env.get(k).cloned().unwrap_or_else(|| panic!("{k} missing from the OUTPOST_TEST_S3_ENV file"))
    };
    S3Settings {
        endpoint: var("OUTPOST_TEST_S3_ENDPOINT"),
        region: var("OUTPOST_TEST_S3_REGION"),
        bucket: var("OUTPOST_TEST_S3_BUCKET"),
        credentials: S3Credentials::from_file(var("OUTPOST_TEST_S3_CREDENTIALS_FILE").as_ref())
            .expect("credentials file"),
    }
}

async fn s3_backend() -> Backend<S3Store> {
    let store = S3Store::new(s3_settings(&s3_env())).expect("s3 store");
    Backend { store, caps: Caps { path_like_keys: false, multipart: true }, p: unique_prefix(), _dir: None }
}

/// A deterministic pseudo-random body of `len` bytes, generated as it is read: a 64 MiB test
/// object never exists in memory at once.
struct Pattern {
    remaining: u64,
    state: u64,
    /// Fail with this error after this many bytes (a body source dying mid-upload).
    fail_after: Option<u64>,
    produced: u64,
}

impl Pattern {
    fn new(len: u64, seed: u64) -> Self {
        Pattern { remaining: len, state: seed | 1, fail_after: None, produced: 0 }
    }
}

impl AsyncRead for Pattern {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.fail_after.is_some_and(|n| this.produced >= n) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "body source went away")));
        }
        let n = (buf.remaining() as u64).min(this.remaining).min(64 * 1024) as usize;
        let mut chunk = vec![0u8; n];
        for word in chunk.chunks_mut(8) {
            this.state ^= this.state << 13;
            this.state ^= this.state >> 7;
            this.state ^= this.state << 17;
            word.copy_from_slice(&this.state.to_le_bytes()[..word.len()]);
        }
        buf.put_slice(&chunk);
        this.remaining -= n as u64;
        this.produced += n as u64;
        Poll::Ready(Ok(()))
    }
}

/// Reset the process's peak RSS to its current RSS (Linux `clear_refs` 5), remembering it.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset peak RSS");
    BASE_RSS_KIB.store(status_kib("VmRSS:"), std::sync::atomic::Ordering::SeqCst);
}

static BASE_RSS_KIB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How far the peak RSS rose above the RSS at the last [`reset_peak_rss`], in MiB.
fn peak_rss_growth_mib() -> u64 {
    status_kib("VmHWM:").saturating_sub(BASE_RSS_KIB.load(std::sync::atomic::Ordering::SeqCst)) / 1024
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with(field)).expect("field in /proc/self/status");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number of kB")
}

async fn sha256_of(mut r: impl AsyncRead + Unpin) -> (u64, String) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let got = r.read(&mut buf).await.expect("read body");
        if got == 0 {
            return (n, hex::encode(h.finalize()));
        }
        h.update(&buf[..got]);
        n += got as u64;
    }
}

async fn get_bytes<S: ObjectStore>(s: &S, key: &str) -> Vec<u8> {
    let mut out = Vec::new();
    s.get(key).await.expect("get").read_to_end(&mut out).await.expect("read body");
    out
}

async fn put_bytes<S: ObjectStore>(s: &S, key: &str, body: &[u8]) -> String {
    s.put(key, body).await.unwrap_or_else(|e| panic!("put {key:?}: {e}")).etag
}

/// Every key under `prefix`, paging with `limit`, checking each page's promises.
async fn list_all<S: ObjectStore>(s: &S, prefix: &str, limit: usize) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.list(prefix, after.as_deref(), limit).await.expect("list");
        assert!(
            page.objects.len() <= limit.clamp(1, 1000),
            "page of {} for limit {limit}",
            page.objects.len()
        );
        keys.extend(page.objects.iter().map(|o| o.key.clone()));
        match page.next_start_after {
            Some(next) => {
                assert_eq!(Some(&next), keys.last(), "the cursor is the page's last key");
                after = Some(next);
            }
            None => return keys,
        }
    }
}

fn is_invalid_key<T>(r: Result<T, ObjectStoreError>) -> bool {
    matches!(r, Err(ObjectStoreError::InvalidKey { .. }))
}

/// The contract, as generic functions over any adapter.
mod suite {
    use super::*;

    pub async fn puts_gets_heads_and_deletes_round_trip<S: ObjectStore>(b: &Backend<S>) {
        let key = format!("{}/hello.txt", b.p);
        let body = b"hello, site".to_vec();
        let put = b.store.put(&key, &body[..]).await.expect("put");
        assert_eq!(put.size, body.len() as u64);
        assert_eq!(put.sha256, hex::encode(Sha256::digest(&body)));
        assert!(!put.etag.is_empty() && !put.etag.contains('"'), "etag {:?}", put.etag);
        assert_eq!(get_bytes(&b.store, &key).await, body);
        let head = b.store.head(&key).await.expect("head");
        assert_eq!(
            (head.key.as_str(), head.size, head.etag.as_str()),
            (key.as_str(), body.len() as u64, put.etag.as_str())
        );
        let modified = head.last_modified_unix_ms.expect("last modified");
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis()
                as u64;
        assert!(modified.abs_diff(now) < 120_000, "last modified {modified} vs now {now}");
        b.store.delete(&key).await.expect("delete");
        assert!(matches!(b.store.head(&key).await, Err(ObjectStoreError::NotFound { .. })));
    }

    pub async fn a_zero_byte_object_is_an_object<S: ObjectStore>(b: &Backend<S>) {
        let key = format!("{}/empty", b.p);
        let put = b.store.put(&key, &b""[..]).await.expect("put");
        assert_eq!(
            (put.size, put.sha256.as_str()),
            (0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        assert!(get_bytes(&b.store, &key).await.is_empty());
        assert_eq!(b.store.head(&key).await.expect("head").size, 0);
        let page = b.store.list(&b.p, None, 10).await.expect("list");
        assert_eq!(page.objects.len(), 1);
        assert_eq!(page.objects[0].size, 0);
    }

    pub async fn a_64_mib_object_streams_both_ways_with_its_checksum<S: ObjectStore>(
        b: &Backend<S>,
        name: &str,
    ) {
        const LEN: u64 = 64 * 1024 * 1024 + 12_345;
        let key = format!("{}/big.bin", b.p);
        let (_, expected) = sha256_of(Pattern::new(LEN, 42)).await;
        let t = Instant::now();
        reset_peak_rss();
        let put = b.store.put(&key, Pattern::new(LEN, 42)).await.expect("put");
        let put_s = t.elapsed().as_secs_f64();
        let put_peak = peak_rss_growth_mib();
        assert_eq!((put.size, put.sha256.as_str()), (LEN, expected.as_str()));
        if b.caps.multipart {
            // 8 MiB parts: 9 of them.
            assert!(put.etag.ends_with("-9"), "a multipart ETag, got {:?}", put.etag);
        }
        assert_eq!(b.store.head(&key).await.expect("head").size, LEN);
        let t = Instant::now();
        reset_peak_rss();
        let (size, sha) = sha256_of(b.store.get(&key).await.expect("get")).await;
        let get_s = t.elapsed().as_secs_f64();
        let get_peak = peak_rss_growth_mib();
        assert_eq!((size, sha), (LEN, expected));
        eprintln!(
            "[figures] {name}: 64 MiB put {put_s:.2} s (peak RSS +{put_peak} MiB), get {get_s:.2} s (+{get_peak} MiB)"
        );
        // The object never sits whole in memory: a few 8 MiB part buffers at most.
        assert!(
            put_peak < 48 && get_peak < 48,
            "peak RSS grew {put_peak} / {get_peak} MiB for a 64 MiB object"
        );
    }

    pub async fn hostile_keys_round_trip_exactly_or_are_refused<S: ObjectStore>(b: &Backend<S>) {
        let p = &b.p;
        let mut keys = vec![
            format!("{p}/with space/and  two"),
            format!("{p}/ünïcödé/日本語/🚀"),
            format!("{p}/trailing/"),
            format!("{p}//double//slash"),
            format!("{p}/back\\slash"),
            format!("{p}/reserved!$&'()*+,;=:@?#[]%20%2F"),
            format!("{p}/a b/x"),
            format!("{p}/...dots.../.hidden"),
        ];
        let long = format!("{p}/{}", "k".repeat(MAX_KEY_BYTES - p.len() - 1));
        assert_eq!(long.len(), MAX_KEY_BYTES);
        keys.push(long);
        let long_segments = format!("{p}/{}/{}", "ü".repeat(150), "x".repeat(300));
        keys.push(long_segments);
        for (i, k) in keys.iter().enumerate() {
            put_bytes(&b.store, k, format!("body {i}").as_bytes()).await;
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(get_bytes(&b.store, k).await, format!("body {i}").as_bytes(), "{k:?}");
            assert_eq!(&b.store.head(k).await.expect("head").key, k);
        }

        // `..` and a leading `/` are part of a key, never path steps: `a b/ü/../x` must not
        // alias `a b/x`, nor `/p/x` alias `p/x`.
        let path_like = [
            format!("{p}/a b/ü/../x"),
            format!("{p}/./x"),
            format!("{p}/../../../escape"),
            format!("/{p}/a b/x"),
            format!("//{p}/a b/x"),
        ];
        for k in &path_like {
            let r = b.store.put(k, &b"dotted"[..]).await;
            if b.caps.path_like_keys {
                r.unwrap_or_else(|e| panic!("{k:?}: {e}"));
                assert_eq!(get_bytes(&b.store, k).await, b"dotted");
            } else {
                assert!(is_invalid_key(r), "{k:?} must be refused, not aliased");
                assert!(is_invalid_key(b.store.get(k).await), "{k:?}");
            }
        }
        assert_eq!(
            get_bytes(&b.store, &format!("{p}/a b/x")).await,
            b"body 6",
            "no path-like key aliased `a b/x`"
        );
        if b.caps.path_like_keys {
            keys.extend(path_like);
            let leading = list_all(&b.store, &format!("/{p}"), 1000).await;
            assert_eq!(leading, [format!("/{p}/a b/x")]);
            assert_eq!(list_all(&b.store, &format!("//{p}"), 1000).await, [format!("//{p}/a b/x")]);
        }

        let mut expected: Vec<String> = keys.iter().filter(|k| k.starts_with(p.as_str())).cloned().collect();
        expected.sort();
        assert_eq!(list_all(&b.store, p, 1000).await, expected, "listed exactly, in byte order");
    }

    pub async fn invalid_keys_are_refused_before_any_io<S: ObjectStore>(b: &Backend<S>) {
        let too_long = format!("{}/{}", b.p, "k".repeat(MAX_KEY_BYTES));
        for k in ["", too_long.as_str(), "nul\0byte", "new\nline", "del\u{7f}"] {
            assert!(is_invalid_key(b.store.put(k, &b"x"[..]).await), "put {k:?}");
            assert!(is_invalid_key(b.store.get(k).await), "get {k:?}");
            assert!(is_invalid_key(b.store.head(k).await), "head {k:?}");
            assert!(is_invalid_key(b.store.delete(k).await), "delete {k:?}");
        }
        assert!(is_invalid_key(b.store.list("bad\u{1}prefix", None, 10).await));
        assert!(b.store.list(&b.p, None, 10).await.expect("list").objects.is_empty());
    }

    pub async fn overwriting_changes_the_etag_and_keeps_one_object<S: ObjectStore>(b: &Backend<S>) {
        let key = format!("{}/doc.json", b.p);
        let first = put_bytes(&b.store, &key, b"{\"v\":1}").await;
        let second = put_bytes(&b.store, &key, b"{\"v\":2}").await;
        assert_ne!(first, second);
        assert_eq!(b.store.head(&key).await.expect("head").etag, second);
        assert_eq!(get_bytes(&b.store, &key).await, b"{\"v\":2}");
        let listed = b.store.list(&b.p, None, 10).await.expect("list").objects;
        assert_eq!(listed.len(), 1);
        assert_eq!(
            listed[0].etag, second,
            "the listing shows the new ETag (what the relay's reconciliation watches)"
        );
    }

    pub async fn a_failed_put_keeps_the_previous_object<S: ObjectStore>(b: &Backend<S>) {
        let key = format!("{}/kept", b.p);
        let etag = put_bytes(&b.store, &key, b"original").await;
        // Dies after 9 MiB: past the first multipart part on s3.
        let mut dying = Pattern::new(32 * 1024 * 1024, 7);
        dying.fail_after = Some(9 * 1024 * 1024);
        let err = b.store.put(&key, dying).await.expect_err("the body failed");
        assert!(matches!(err, ObjectStoreError::Io { .. }), "{err}");
        assert_eq!(get_bytes(&b.store, &key).await, b"original");
        assert_eq!(b.store.head(&key).await.expect("head").etag, etag);
        let dying = Pattern { fail_after: Some(10), ..Pattern::new(100, 1) };
        assert!(b.store.put(&format!("{}/never", b.p), dying).await.is_err());
        assert!(matches!(
            b.store.head(&format!("{}/never", b.p)).await,
            Err(ObjectStoreError::NotFound { .. })
        ));
    }

    pub async fn listing_pages_with_start_after_across_2600_keys<S: ObjectStore>(b: &Backend<S>) {
        let p = &b.p;
        let mut keys: Vec<String> = (0..2600).map(|i| format!("{p}/obj/{i:05}")).collect();
        // S3 order is byte order: `a-c` < `a/b` < `a0`, and `Z` < `a` < `é`.
        for k in ["k/a", "k/a-c", "k/a/b", "k/a0", "k/Z", "k/é", "k/a b", "k/a/b/c"] {
            keys.push(format!("{p}/{k}"));
        }
        // Neighbours outside the prefix must not show up.
        let outside = [p.clone(), format!("{p}.x"), format!("{p}0/y")];
        let all: Vec<&String> = keys.iter().chain(outside.iter()).collect();
        let t = Instant::now();
        let results: Vec<_> = futures_util::stream::iter(all.iter().map(|k| b.store.put(k, &b"."[..])))
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            r.expect("put");
        }
        eprintln!("[figures] {} small puts in {:.2} s", all.len(), t.elapsed().as_secs_f64());
        keys.sort();

        let prefix = format!("{p}/");
        let t = Instant::now();
        assert_eq!(list_all(&b.store, &prefix, 1000).await, keys);
        eprintln!(
            "[figures] listed {} keys in pages of 1000 in {:.2} s",
            keys.len(),
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        assert_eq!(list_all(&b.store, &prefix, 333).await, keys);
        eprintln!("[figures] listed in pages of 333 in {:.2} s", t.elapsed().as_secs_f64());
        let page = b.store.list(&prefix, None, 5000).await.expect("list");
        assert_eq!(page.objects.len(), 1000, "pages are capped at 1000");
        assert_eq!(b.store.list(&prefix, None, 0).await.expect("list").objects.len(), 1, "limit 0 means 1");

        // Resuming from any key (even one that does not exist) continues strictly after it.
        let resume_at = keys[1234].clone();
        let rest = b.store.list(&prefix, Some(&resume_at), 10).await.expect("list");
        let got: Vec<&str> = rest.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(got, keys[1235..1245].iter().map(String::as_str).collect::<Vec<_>>());
        let between = format!("{p}/obj/01234x");
        let rest = b.store.list(&prefix, Some(&between), 1).await.expect("list");
        let next = keys.partition_point(|k| k.as_str() <= between.as_str());
        assert_eq!(rest.objects[0].key, keys[next]);
        assert_eq!(rest.objects[0].key, format!("{p}/obj/01235"));
        let tail = b.store.list(&prefix, Some(keys.last().expect("keys")), 10).await.expect("list");
        assert!(tail.objects.is_empty() && tail.next_start_after.is_none());
        let nested = list_all(&b.store, &format!("{p}/k/a/"), 1000).await;
        assert_eq!(nested, [format!("{p}/k/a/b"), format!("{p}/k/a/b/c")]);
    }

    pub async fn delete_is_idempotent_and_missing_objects_are_not_found<S: ObjectStore>(b: &Backend<S>) {
        let key = format!("{}/gone", b.p);
        b.store.delete(&key).await.expect("deleting a missing key succeeds");
        assert!(matches!(b.store.head(&key).await, Err(ObjectStoreError::NotFound { .. })));
        assert!(matches!(b.store.get(&key).await, Err(ObjectStoreError::NotFound { .. })));
        put_bytes(&b.store, &key, b"x").await;
        b.store.delete(&key).await.expect("delete");
        b.store.delete(&key).await.expect("delete again");
        assert!(matches!(b.store.head(&key).await, Err(ObjectStoreError::NotFound { .. })));
        assert!(b.store.list(&b.p, None, 10).await.expect("list").objects.is_empty());
    }

    pub async fn copies_are_independent_objects<S: ObjectStore>(b: &Backend<S>) {
        let from = format!("{}/src dir/ü.bin", b.p);
        let to = format!("{}/dst+dir/copy %.bin", b.p);
        let body = vec![5u8; 100_000];
        let etag = put_bytes(&b.store, &from, &body).await;
        let meta = b.store.copy(&from, &to).await.expect("copy");
        assert_eq!((meta.key.as_str(), meta.size), (to.as_str(), body.len() as u64));
        assert_eq!(meta.etag, etag, "same bytes, same single-part ETag");
        b.store.delete(&from).await.expect("delete source");
        assert_eq!(get_bytes(&b.store, &to).await, body);
        let missing = format!("{}/missing", b.p);
        assert!(matches!(b.store.copy(&missing, &to).await, Err(ObjectStoreError::NotFound { .. })));
    }
}

macro_rules! contract {
    ($backend:ident, $open:path) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn puts_gets_heads_and_deletes_round_trip() {
                suite::puts_gets_heads_and_deletes_round_trip(&$open().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_zero_byte_object_is_an_object() {
                suite::a_zero_byte_object_is_an_object(&$open().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_64_mib_object_streams_both_ways_with_its_checksum() {
                suite::a_64_mib_object_streams_both_ways_with_its_checksum(
                    &$open().await,
                    stringify!($backend),
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn hostile_keys_round_trip_exactly_or_are_refused() {
                suite::hostile_keys_round_trip_exactly_or_are_refused(&$open().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn invalid_keys_are_refused_before_any_io() {
                suite::invalid_keys_are_refused_before_any_io(&$open().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn overwriting_changes_the_etag_and_keeps_one_object() {
                suite::overwriting_changes_the_etag_and_keeps_one_object(&$open().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_failed_put_keeps_the_previous_object() {
                suite::a_failed_put_keeps_the_previous_object(&$open().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn listing_pages_with_start_after_across_2600_keys() {
                suite::listing_pages_with_start_after_across_2600_keys(&$open().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn delete_is_idempotent_and_missing_objects_are_not_found() {
                suite::delete_is_idempotent_and_missing_objects_are_not_found(&$open().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn copies_are_independent_objects() {
                suite::copies_are_independent_objects(&$open().await).await;
            }
        }
    };
}

contract!(fs, fs_backend);
contract!(s3, s3_backend);

/// What only the s3 adapter can get wrong: talking to the server.
mod s3_server {
    use super::*;

    #[tokio::test]
    async fn wrong_credentials_are_a_clear_non_retryable_error() {
        let mut settings = s3_settings(&s3_env());
        settings.credentials =
            S3Credentials::new("GK0123456789abcdef01234567", "0".repeat(64)).expect("creds");
        let store = S3Store::new(settings).expect("store");
        let err = store.list("", None, 1).await.expect_err("denied");
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains("403") || err.to_string().contains("401"), "{err}");
        assert!(!err.to_string().contains(&"0".repeat(64)), "the secret never appears in errors");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_retryable() {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let mut settings = s3_settings(&s3_env());
        settings.endpoint = format!("http://127.0.0.1:{port}");
        let store = S3Store::new(settings).expect("store");
        let t = Instant::now();
        let err = store.head("k").await.expect_err("nothing listens");
        assert!(err.is_retryable(), "{err}");
        assert!(t.elapsed() < Duration::from_secs(30), "fails promptly");
    }

    #[tokio::test]
    async fn a_missing_bucket_is_not_mistaken_for_a_missing_object() {
        let mut settings = s3_settings(&s3_env());
        settings.bucket = format!("no-such-{}", uuid::Uuid::new_v4().simple());
        let store = S3Store::new(settings).expect("store");
        let err = store.get("k").await.err().expect("no bucket");
        assert!(!matches!(err, ObjectStoreError::NotFound { .. }), "{err}");
    }
}
