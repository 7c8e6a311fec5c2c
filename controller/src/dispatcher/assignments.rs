//! The assignment stream of one node (swarmkit's COMPLETE then INCREMENTAL, STYLE.md §4.3): the
//! node's tasks as one COMPLETE message, then batched changes from the [`Router`]; the feed is
//! subscribed before the state is read, so nothing falls between them. A resumed stream replays
//! from the agent's last revision when the history still holds it, else it starts with a
//! COMPLETE set; whenever the feed is cut (it fell behind) a COMPLETE set comes again.

use tokio::sync::mpsc;
use tonic::Status;
use tug_api::v1::{AssignmentsMessage, Task, assignments_message::Kind};

use super::router::{Feed, Router};
use crate::raft::NodeHandle;
use crate::state::{EventKind, WatchError, WatchEvent};

/// Changes gathered into one INCREMENTAL message at most.
const BATCH: usize = 512;

pub(super) type Sender = mpsc::Sender<Result<AssignmentsMessage, Status>>;

/// Streams `node`'s assignments until the receiver goes away or the store shuts down.
pub(super) async fn stream(
    handle: NodeHandle,
    router: Router,
    node: String,
    after_revision: u64,
    tx: Sender,
) -> Result<(), Status> {
    let mut resume = (after_revision > 0).then_some(after_revision);
    loop {
        // Subscribe first, then read the state: a change applied in between comes through the
        // feed and is skipped if the state already holds it (its revision is not newer).
        let mut feed = router.subscribe(&node);
        let seen = match resume.take() {
            Some(after) => match replay(&handle, &node, after, &tx).await? {
                Replay::Done(seen) => seen,
                Replay::Gone => return Ok(()),
                Replay::Compacted => match complete(&handle, &node, &tx).await? {
                    Some(seen) => seen,
                    None => return Ok(()),
                },
            },
            None => match complete(&handle, &node, &tx).await? {
                Some(seen) => seen,
                None => return Ok(()),
            },
        };
        if !forward(&mut feed, seen, &node, &tx).await? {
            return Ok(());
        }
        // The feed was cut (this stream or the router fell behind): resync.
        tracing::debug!(node, "assignment stream resyncs");
    }
}

/// Sends the feed's changes newer than `seen`, batched, until the feed is cut (`Ok(true)`) or
/// the agent goes away (`Ok(false)`).
async fn forward(feed: &mut Feed, seen: u64, node: &str, tx: &Sender) -> Result<bool, Status> {
    loop {
        let first = tokio::select! {
            ev = feed.rx.recv() => ev,
            () = tx.closed() => return Ok(false),
        };
        let Some(first) = first else {
            return Ok(true);
        };
        let mut message = AssignmentsMessage {
            kind: Kind::Incremental.into(),
            ..Default::default()
        };
        let mut next = Some(first);
        let mut gathered = 0;
        while let Some(ev) = next.take() {
            if ev.revision > seen {
                add(&mut message, &ev, node);
            }
            gathered += 1;
            if gathered < BATCH {
                next = feed.rx.try_recv().ok();
            }
        }
        let changed = !message.tasks.is_empty() || !message.removed.is_empty();
        if changed && tx.send(Ok(message)).await.is_err() {
            return Ok(false);
        }
    }
}

fn add(message: &mut AssignmentsMessage, ev: &WatchEvent, node: &str) {
    let Some(task) = ev.task().filter(|t| t.node == node) else {
        return;
    };
    match ev.kind {
        EventKind::Put => upsert(message, task),
        EventKind::Delete => {
            message.tasks.retain(|t| t.id != task.id);
            message.removed.push(task.id.clone());
        }
    }
    message.revision = message.revision.max(ev.revision);
}

enum Replay {
    /// Replayed up to this revision.
    Done(u64),
    /// The history no longer holds the revision: send a COMPLETE set.
    Compacted,
    /// The agent went away.
    Gone,
}

/// Replays the node's changes after `after` from the store's history (a resumed stream).
async fn replay(
    handle: &NodeHandle,
    node: &str,
    after: u64,
    tx: &Sender,
) -> Result<Replay, Status> {
    let Ok(mut watcher) = handle.watch(after + 1) else {
        return Ok(Replay::Compacted);
    };
    let mut seen = after.max(handle.store().read().revision());
    let mut message = AssignmentsMessage {
        kind: Kind::Incremental.into(),
        ..Default::default()
    };
    while let Some(ev) = watcher.try_next() {
        match ev {
            Ok(ev) => {
                seen = seen.max(ev.revision);
                add(&mut message, &ev, node);
            }
            Err(WatchError::Closed) => return Err(Status::unavailable("the store was shut down")),
            Err(_) => return Ok(Replay::Compacted),
        }
    }
    message.revision = message.revision.max(seen);
    if tx.send(Ok(message)).await.is_err() {
        return Ok(Replay::Gone);
    }
    Ok(Replay::Done(seen))
}

fn upsert(message: &mut AssignmentsMessage, task: &Task) {
    message.removed.retain(|id| *id != task.id);
    match message.tasks.iter_mut().find(|t| t.id == task.id) {
        Some(existing) => *existing = task.clone(),
        None => message.tasks.push(task.clone()),
    }
}

/// Sends the node's whole task set; returns the revision it reflects (None when the agent went
/// away).
async fn complete(handle: &NodeHandle, node: &str, tx: &Sender) -> Result<Option<u64>, Status> {
    let message = {
        let store = handle.store().read();
        AssignmentsMessage {
            kind: Kind::Complete.into(),
            tasks: store.tasks_of_node(node).into_iter().cloned().collect(),
            removed: Vec::new(),
            revision: store.revision(),
        }
    };
    let revision = message.revision;
    if tx.send(Ok(message)).await.is_err() {
        return Ok(None);
    }
    Ok(Some(revision))
}
