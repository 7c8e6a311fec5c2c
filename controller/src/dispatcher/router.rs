//! Routes the store's task changes to the assignment streams of their nodes. One subscriber to
//! the store per replica, whatever the number of agents: a change reaches only the streams of
//! the node it is about (with 10,000 agents, a broadcast to every stream would cost 10,000
//! filter checks per change). A stream that cannot keep up, and every stream when the router
//! itself falls behind the store, is cut off and resyncs with a COMPLETE set.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, watch};

use crate::raft::NodeHandle;
use crate::state::{WatchError, WatchEvent};

/// Changes buffered per stream before it is cut off.
const STREAM_QUEUE: usize = 4096;

#[derive(Debug)]
struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Arc<WatchEvent>>,
}

#[derive(Debug, Default)]
struct Routes {
    by_node: HashMap<String, Vec<Subscriber>>,
}

/// The router of one replica; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Arc<Mutex<Routes>>,
    next_id: Arc<AtomicU64>,
}

/// A stream's feed of its node's changes; dropping it unsubscribes. `recv` returning `None`
/// means the feed was cut: resync.
#[derive(Debug)]
pub struct Feed {
    pub rx: mpsc::Receiver<Arc<WatchEvent>>,
    node: String,
    id: u64,
    router: Router,
}

impl Drop for Feed {
    fn drop(&mut self) {
        let mut routes = self.router.lock();
        if let Some(subs) = routes.by_node.get_mut(&self.node) {
            subs.retain(|s| s.id != self.id);
            if subs.is_empty() {
                routes.by_node.remove(&self.node);
            }
        }
    }
}

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts routing the store of `handle` until `stopping` turns true.
    pub fn spawn(handle: NodeHandle, mut stopping: watch::Receiver<bool>) -> Router {
        let router = Router::default();
        let r = router.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = r.route(handle) => {}
                _ = stopping.wait_for(|s| *s) => {}
            }
            // Cut every stream off: they end with the shutdown.
            r.lock().by_node.clear();
        });
        router
    }

    /// Subscribes to the changes of `node`'s tasks from now on.
    pub fn subscribe(&self, node: &str) -> Feed {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .by_node
            .entry(node.to_string())
            .or_default()
            .push(Subscriber { id, tx });
        Feed {
            rx,
            node: node.to_string(),
            id,
            router: self.clone(),
        }
    }

    async fn route(&self, handle: NodeHandle) {
        loop {
            let mut watcher = match handle.watch(0) {
                Ok(w) => w,
                Err(WatchError::Closed) => return,
                Err(_) => continue,
            };
            loop {
                match watcher.next().await {
                    Ok(ev) => self.deliver(ev),
                    Err(WatchError::Closed) => return,
                    Err(err) => {
                        tracing::debug!(cause = %err, "assignment router resyncs every stream");
                        self.lock().by_node.clear();
                        break;
                    }
                }
            }
        }
    }

    fn deliver(&self, ev: Arc<WatchEvent>) {
        let Some(task) = ev.task() else {
            return;
        };
        if task.node.is_empty() {
            return;
        }
        let mut routes = self.lock();
        let Some(subs) = routes.by_node.get_mut(&task.node) else {
            return;
        };
        // A full queue cuts the stream off (its sender is dropped): it resyncs.
        subs.retain(|s| s.tx.try_send(Arc::clone(&ev)).is_ok());
        if subs.is_empty() {
            routes.by_node.remove(&task.node);
        }
    }
}
