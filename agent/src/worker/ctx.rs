//! What every part of the worker shares: the image store, the runtime, the status board, the
//! saved task files, the converge limit and the shutdown signal.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::records::TaskFiles;
use super::reporter::StatusBoard;
use crate::image::ImageStore;
use crate::metrics::AgentMetrics;
use crate::network::NodeNetwork;
use crate::runtime::container::Runtime;

#[derive(Debug)]
pub(crate) struct Ctx {
    pub data_dir: PathBuf,
    pub store: ImageStore,
    pub runtime: Runtime,
    pub oci_runtime: Option<PathBuf>,
    pub board: StatusBoard,
    pub files: TaskFiles,
    /// Bounds how many pulls, creates, stops and removals run at once.
    pub converge: Arc<Semaphore>,
    /// Ids whose container is being removed right now (not orphans to remove again).
    pub removing: Mutex<BTreeSet<String>>,
    /// The agent is stopping: runners let go of their containers, which keep running.
    pub shutdown: CancellationToken,
    /// One pull at a time per image reference: tasks of one service share an image, and two
    /// concurrent pulls of the same reference race on the store's record file (its temp name
    /// is per reference), failing one of them.
    pub pulls: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The node's metrics: runners keep its container table current and time pulls and starts.
    pub metrics: Arc<AgentMetrics>,
    /// The node's container network (bridge, peers, DNS, published ports).
    pub network: Arc<NodeNetwork>,
}

impl Ctx {
    /// The lock serialising pulls of `reference`.
    pub(crate) fn pull_lock(&self, reference: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        pulls.entry(reference.to_string()).or_default().clone()
    }

    pub(crate) fn removing(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.removing.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Run blocking work (the runtime and image store APIs) off the async threads; a panic in it
/// becomes an error message.
pub(crate) fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl Future<Output = Result<T, String>> {
    let handle = tokio::task::spawn_blocking(f);
    async move { handle.await.map_err(|e| format!("internal error: {e}")) }
}

/// Wall-clock milliseconds, as status timestamps carry them.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
