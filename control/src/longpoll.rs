//! Wakes a node's held long-poll when a job is submitted for it. One `Notify` per node that
//! has polled; the map is bounded by the number of enrolled nodes (only authenticated nodes
//! get an entry).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
pub struct NodeWakers {
    by_node: Mutex<HashMap<String, Arc<Notify>>>,
}

impl NodeWakers {
    /// The waker of `node_id`, created on first use.
    pub fn waker(&self, node_id: &str) -> Arc<Notify> {
        match self.by_node.lock() {
            Ok(mut map) => map.entry(node_id.to_owned()).or_default().clone(),
            // A poisoned map only means some thread panicked while holding it; a fresh Notify
            // degrades to "wake on timeout", never to a wrong answer.
            Err(_) => Arc::new(Notify::new()),
        }
    }

    /// Wakes every held poll of every node (they look again and wait on if nothing changed).
    pub fn wake_all(&self) {
        let wakers: Vec<Arc<Notify>> =
            self.by_node.lock().map(|map| map.values().cloned().collect()).unwrap_or_default();
        for waker in wakers {
            waker.notify_waiters();
        }
    }

    /// Wakes every poll `node_id` is holding right now (and those that have called
    /// `Notified::enable` but not yet awaited).
    pub fn wake(&self, node_id: &str) {
        let waker = self.by_node.lock().ok().and_then(|map| map.get(node_id).cloned());
        if let Some(waker) = waker {
            waker.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_wake_reaches_a_poll_that_registered_before_it() {
        let wakers = NodeWakers::default();
        let waker = wakers.waker("n1");
        let notified = waker.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        wakers.wake("n1");
        tokio::time::timeout(Duration::from_secs(1), notified).await.unwrap();
    }
}
