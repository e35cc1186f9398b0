//! The manager's compute threads: a fixed set of long-lived threads that run every load and
//! every request, so engine work never runs on the async runtime's workers.
//!
//! Why not `spawn_blocking`: llama.cpp computes with OpenMP, and every thread that calls into it
//! becomes the master of its own OpenMP team, whose workers stay alive while the caller does.
//! Tokio's blocking pool hands requests to whichever thread is free and keeps idle ones for a
//! while, so after a few requests the process holds more OpenMP threads than CPUs; libgomp then
//! stops spinning between operations and sleeps on a futex instead, which cost up to 7× the
//! decode speed of a small model (measured: 1,000 against 4,600 tokens/s). A fixed thread per
//! concurrent request keeps one team per request and llama.cpp's speed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::{InferenceError, Result};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed pool of named compute threads fed by a bounded channel, started with the first job
/// (an agent that never infers keeps no idle threads). The threads end when the pool is dropped
/// (after the job each is running, if any).
pub(super) struct ComputePool {
    threads: usize,
    queue: usize,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

impl ComputePool {
    /// `threads` compute threads; at most `queue` jobs wait for one (callers then wait to send).
    pub(super) fn new(threads: usize, queue: usize) -> Self {
        Self { threads: threads.max(1), queue: queue.max(1), jobs: Mutex::new(None) }
    }

    fn sender(&self) -> Result<mpsc::Sender<Job>> {
        let mut jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = jobs.as_ref() {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel::<Job>(self.queue);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..self.threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("outpost-infer-{n}"))
                .spawn(move || serve(&rx))
                .map_err(|e| InferenceError::engine("compute", format!("starting a compute thread: {e}")))?;
        }
        *jobs = Some(tx.clone());
        Ok(tx)
    }

    /// Runs `f` on a compute thread and waits for its result.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            // The caller is gone (its request was dropped while the job waited): skip the work.
            if tx.is_closed() {
                return;
            }
            let _ = tx.send(f());
        });
        self.sender()?.send(job).await.map_err(|_| InferenceError::WorkerGone)?;
        rx.await.map_err(|_| InferenceError::WorkerGone)?
    }
}

/// A compute thread: runs jobs until the pool (the channel's sender) is gone.
fn serve(rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // One idle thread waits on the channel at a time; the others wait for the lock.
        let job = match rx.lock() {
            Ok(mut rx) => rx.blocking_recv(),
            Err(_) => None,
        };
        let Some(job) = job else { break };
        // Where panics unwind (tests, debug builds), a panicking engine fails its request (its
        // result sender drops), not the thread. Release builds abort on a panic
        // (`panic = "abort"`): engines must turn bad input into errors, which is why untrusted
        // model files are checked before native code sees them.
        let _ = catch_unwind(AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_pools_named_threads_and_a_panic_fails_only_its_job() {
        let pool = ComputePool::new(1, 2);
        let name = pool.run(|| Ok(std::thread::current().name().map(str::to_owned))).await.expect("run");
        assert_eq!(name.as_deref(), Some("outpost-infer-0"));
        let first = pool.run(|| Ok(std::thread::current().id())).await.expect("run");

        let panicked = pool.run::<()>(|| panic!("engine bug")).await;
        assert!(matches!(panicked, Err(InferenceError::WorkerGone)), "{panicked:?}");

        // The same single thread still serves the next job.
        let again = pool.run(|| Ok(std::thread::current().id())).await.expect("run after a panic");
        assert_eq!(first, again);
        let err = pool.run::<()>(|| Err(InferenceError::BadRequest("no".into()))).await;
        assert!(matches!(err, Err(InferenceError::BadRequest(_))), "{err:?}");
    }

    #[tokio::test]
    async fn a_job_whose_caller_is_gone_before_it_starts_is_skipped() {
        let pool = Arc::new(ComputePool::new(1, 4));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = hold.recv();
                    Ok(())
                })
                .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let queued = {
            let (pool, ran) = (pool.clone(), ran.clone());
            tokio::spawn(async move {
                pool.run(move || {
                    ran.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                })
                .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        queued.abort();
        let _ = queued.await;
        release.send(()).expect("release");
        busy.await.expect("join").expect("busy job");
        // The next job runs after the skipped one: the queue moved on without running it.
        pool.run(|| Ok(())).await.expect("next job");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "the abandoned job ran");
    }

    #[tokio::test]
    async fn concurrent_jobs_share_the_fixed_threads() {
        let pool = Arc::new(ComputePool::new(2, 4));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.run(|| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    Ok(std::thread::current().id())
                })
                .await
            }));
        }
        let mut ids = std::collections::HashSet::new();
        for t in tasks {
            ids.insert(t.await.expect("join").expect("run"));
        }
        assert!(!ids.is_empty() && ids.len() <= 2, "{} threads served 16 jobs", ids.len());
    }
}
