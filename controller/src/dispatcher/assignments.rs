//! The assignment stream of one node (swarmkit's COMPLETE then INCREMENTAL, STYLE.md §4.3): the
//! node's tasks as one COMPLETE message taken under the same read lock as the watch that follows,
//! so nothing falls between them; then batched changes. A resumed stream replays from the
//! agent's last revision when the history still holds it, else it starts with a COMPLETE set;
//! whenever the history cannot serve it (lagged, snapshot installed) a COMPLETE set comes again.

use tokio::sync::mpsc;
use tonic::Status;
use tug_api::v1::{AssignmentsMessage, Task, assignments_message::Kind};

use crate::raft::NodeHandle;
use crate::state::{EventKind, WatchError, Watcher};

/// Changes gathered into one INCREMENTAL message at most.
const BATCH: usize = 512;

pub(super) type Sender = mpsc::Sender<Result<AssignmentsMessage, Status>>;

/// Streams `node`'s assignments until the receiver goes away or the store shuts down.
pub(super) async fn stream(
    handle: NodeHandle,
    node: String,
    after_revision: u64,
    tx: Sender,
) -> Result<(), Status> {
    let resumed = if after_revision > 0 {
        handle.watch(after_revision + 1).ok()
    } else {
        None
    };
    let mut watcher = match resumed {
        Some(w) => w,
        None => match complete(&handle, &node, &tx).await? {
            Some(w) => w,
            None => return Ok(()),
        },
    };
    loop {
        let first = tokio::select! {
            next = watcher.next() => next,
            () = tx.closed() => return Ok(()),
        };
        let mut message = AssignmentsMessage {
            kind: Kind::Incremental.into(),
            ..Default::default()
        };
        let mut next = Some(first);
        let mut gathered = 0;
        let mut resync = false;
        while let Some(event) = next.take() {
            match event {
                Ok(ev) => {
                    if let Some(task) = ev.task().filter(|t| t.node == node) {
                        match ev.kind {
                            EventKind::Put => upsert(&mut message, task),
                            EventKind::Delete => {
                                message.tasks.retain(|t| t.id != task.id);
                                message.removed.push(task.id.clone());
                            }
                        }
                        message.revision = ev.revision;
                    }
                }
                Err(WatchError::Closed) => {
                    return Err(Status::unavailable("the store was shut down"));
                }
                Err(err) => {
                    tracing::debug!(node, cause = %err, "assignment stream resyncs");
                    resync = true;
                    break;
                }
            }
            gathered += 1;
            if gathered < BATCH {
                next = watcher.try_next();
            }
        }
        let changed = !message.tasks.is_empty() || !message.removed.is_empty();
        if changed && tx.send(Ok(message)).await.is_err() {
            return Ok(());
        }
        if resync {
            watcher = match complete(&handle, &node, &tx).await? {
                Some(w) => w,
                None => return Ok(()),
            };
        }
    }
}

fn upsert(message: &mut AssignmentsMessage, task: &Task) {
    message.removed.retain(|id| *id != task.id);
    match message.tasks.iter_mut().find(|t| t.id == task.id) {
        Some(existing) => *existing = task.clone(),
        None => message.tasks.push(task.clone()),
    }
}

/// Sends the node's whole task set and returns the watcher for what follows (None when the
/// agent went away).
async fn complete(handle: &NodeHandle, node: &str, tx: &Sender) -> Result<Option<Watcher>, Status> {
    let (message, watcher) = {
        let store = handle.store().read();
        let revision = store.revision();
        let tasks = store.tasks_of_node(node).into_iter().cloned().collect();
        let watcher = store
            .watch(revision + 1)
            .map_err(|err| Status::unavailable(format!("cannot watch the store: {err}")))?;
        (
            AssignmentsMessage {
                kind: Kind::Complete.into(),
                tasks,
                removed: Vec::new(),
                revision,
            },
            watcher,
        )
    };
    if tx.send(Ok(message)).await.is_err() {
        return Ok(None);
    }
    Ok(Some(watcher))
}
