//! Wakes a node's held long-poll when a job is submitted for it. One `Notify` per node that
//! has polled; the map is bounded by the number of enrolled nodes (only authenticated nodes
//! get an entry). It also knows which nodes hold a poll right now, for the periodic re-check
//! of a shared store (a notice from another replica that was lost costs a held poll at most
//! one re-check interval).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
pub struct NodeWakers {
    by_node: Mutex<HashMap<String, Waker>>,
}

#[derive(Default)]
struct Waker {
    notify: Arc<Notify>,
    /// Polls of this node held right now.
    held: usize,
}

/// A poll held for a node, counted until dropped (see [`NodeWakers::held`]).
pub struct Holding<'a> {
    wakers: &'a NodeWakers,
    node_id: &'a str,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.wakers.by_node.lock()
            && let Some(w) = map.get_mut(self.node_id)
        {
            w.held = w.held.saturating_sub(1);
        }
    }
}

impl NodeWakers {
    /// The waker of `node_id`, created on first use.
    pub fn waker(&self, node_id: &str) -> Arc<Notify> {
        match self.by_node.lock() {
            Ok(mut map) => map.entry(node_id.to_owned()).or_default().notify.clone(),
            // A poisoned map only means some thread panicked while holding it; a fresh Notify
            // degrades to "wake on timeout", never to a wrong answer.
            Err(_) => Arc::new(Notify::new()),
        }
    }

    /// Counts a poll of `node_id` as held until the guard is dropped.
    pub fn hold<'a>(&'a self, node_id: &'a str) -> Holding<'a> {
        if let Ok(mut map) = self.by_node.lock() {
            map.entry(node_id.to_owned()).or_default().held += 1;
        }
        Holding { wakers: self, node_id }
    }

    /// The nodes that hold a poll right now, in no particular order.
    pub fn held(&self) -> Vec<String> {
        self.by_node
            .lock()
            .map(|map| map.iter().filter(|(_, w)| w.held > 0).map(|(id, _)| id.clone()).collect())
            .unwrap_or_default()
    }

    /// Wakes every held poll of every node (they look again and wait on if nothing changed).
    pub fn wake_all(&self) {
        let wakers: Vec<Arc<Notify>> = self
            .by_node
            .lock()
            .map(|map| map.values().map(|w| w.notify.clone()).collect())
            .unwrap_or_default();
        for waker in wakers {
            waker.notify_waiters();
        }
    }

    /// Wakes every poll `node_id` is holding right now (and those that have called
    /// `Notified::enable` but not yet awaited).
    pub fn wake(&self, node_id: &str) {
        let waker = self.by_node.lock().ok().and_then(|map| map.get(node_id).map(|w| w.notify.clone()));
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

    #[test]
    fn a_node_is_held_while_any_of_its_polls_is() {
        let wakers = NodeWakers::default();
        let _ = wakers.waker("n0");
        assert!(wakers.held().is_empty(), "a node that polled but holds nothing is not held");
        let a = wakers.hold("n1");
        let b = wakers.hold("n1");
        let c = wakers.hold("n2");
        let mut held = wakers.held();
        held.sort();
        assert_eq!(held, ["n1", "n2"]);
        drop(a);
        drop(c);
        assert_eq!(wakers.held(), ["n1"]);
        drop(b);
        assert!(wakers.held().is_empty());
    }
}
