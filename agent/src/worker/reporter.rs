//! The status board behind the reporter (STYLE.md §4.4): the latest status of each task, which
//! of them the controller has not heard yet, and a wake-up for the session's report loop.
//! Runners write to it whenever they like; a slow or absent controller never blocks them, and
//! a burst of changes to one task reaches the controller as its last state only.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;
use tug_api::v1::{TaskStatus, TaskStatusUpdate};

#[derive(Debug, Default)]
struct Board {
    /// Task id -> (namespace, latest status).
    latest: BTreeMap<String, (String, TaskStatus)>,
    /// Ids whose latest status the controller has not acknowledged.
    dirty: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub(crate) struct StatusBoard {
    board: Mutex<Board>,
    changed: Notify,
}

/// Equal but for the time it was observed: nothing new to say.
fn same(a: &TaskStatus, b: &TaskStatus) -> bool {
    TaskStatus {
        updated_ms: 0,
        ..a.clone()
    } == TaskStatus {
        updated_ms: 0,
        ..b.clone()
    }
}

impl StatusBoard {
    fn board(&self) -> MutexGuard<'_, Board> {
        // A runner that panicked while holding the lock left a consistent map behind (every
        // write is a single insert), so the poison is ignored.
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record `status` as the task's latest. Ignored when it is older than what is recorded
    /// (a regression) or says nothing new. Returns whether it was recorded.
    pub(crate) fn update(&self, id: &str, namespace: &str, status: TaskStatus) -> bool {
        let mut b = self.board();
        if let Some((_, old)) = b.latest.get(id)
            && (status.updated_ms < old.updated_ms || same(old, &status))
        {
            return false;
        }
        b.latest
            .insert(id.to_string(), (namespace.to_string(), status));
        b.dirty.insert(id.to_string());
        drop(b);
        self.changed.notify_one();
        true
    }

    /// Up to `max` unsent statuses, taken off the dirty list (`requeue` them if the send fails).
    pub(crate) fn take(&self, max: usize) -> Vec<TaskStatusUpdate> {
        let mut b = self.board();
        let ids: Vec<String> = b.dirty.iter().take(max).cloned().collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            b.dirty.remove(&id);
            if let Some((namespace, status)) = b.latest.get(&id) {
                out.push(TaskStatusUpdate {
                    task_id: id.clone(),
                    namespace: namespace.clone(),
                    status: Some(status.clone()),
                });
            }
        }
        out
    }

    /// A send failed: these go again (with whatever is latest by then).
    pub(crate) fn requeue(&self, sent: &[TaskStatusUpdate]) {
        let mut b = self.board();
        for u in sent {
            if b.latest.contains_key(&u.task_id) {
                b.dirty.insert(u.task_id.clone());
            }
        }
        drop(b);
        self.changed.notify_one();
    }

    /// A new session: the controller may have missed anything, so everything goes again.
    pub(crate) fn mark_all_dirty(&self) {
        let mut b = self.board();
        b.dirty = b.latest.keys().cloned().collect();
        drop(b);
        self.changed.notify_one();
    }

    /// The task is gone from the node: nothing more to say about it.
    pub(crate) fn forget(&self, id: &str) {
        let mut b = self.board();
        b.latest.remove(id);
        b.dirty.remove(id);
    }

    pub(crate) fn has_dirty(&self) -> bool {
        !self.board().dirty.is_empty()
    }

    /// Wait until something may be dirty (a permit is kept if nobody waits, so no change is
    /// missed between `take` and the next wait).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tug_api::v1::TaskState;

    fn status(state: TaskState, at: u64) -> TaskStatus {
        TaskStatus {
            state: state.into(),
            updated_ms: at,
            ..Default::default()
        }
    }

    fn states(batch: &[TaskStatusUpdate]) -> Vec<(String, TaskState)> {
        batch
            .iter()
            .map(|u| {
                (
                    u.task_id.clone(),
                    u.status.as_ref().map(|s| s.state()).unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn only_the_latest_status_of_a_task_is_sent() {
        let b = StatusBoard::default();
        assert!(b.update("a", "ns", status(TaskState::Pulling, 1)));
        assert!(b.update("a", "ns", status(TaskState::Starting, 2)));
        assert!(b.update("a", "ns", status(TaskState::Running, 3)));
        assert!(b.update("b", "ns", status(TaskState::Running, 3)));
        let batch = b.take(100);
        assert_eq!(
            states(&batch),
            [
                ("a".into(), TaskState::Running),
                ("b".into(), TaskState::Running)
            ]
        );
        assert_eq!(batch[0].namespace, "ns");
        assert!(b.take(100).is_empty(), "sent once");
    }

    #[test]
    fn regressions_and_repeats_are_ignored() {
        let b = StatusBoard::default();
        b.update("a", "ns", status(TaskState::Running, 5));
        assert!(
            !b.update("a", "ns", status(TaskState::Starting, 4)),
            "older"
        );
        b.take(10);
        assert!(
            !b.update("a", "ns", status(TaskState::Running, 9)),
            "nothing new"
        );
        assert!(!b.has_dirty());
    }

    #[test]
    fn failed_sends_and_new_sessions_send_again() {
        let b = StatusBoard::default();
        b.update("a", "ns", status(TaskState::Running, 1));
        b.update("b", "ns", status(TaskState::Running, 1));
        let batch = b.take(1);
        assert_eq!(states(&batch), [("a".into(), TaskState::Running)]);
        b.update("a", "ns", status(TaskState::Exited, 2));
        b.requeue(&batch);
        assert_eq!(
            states(&b.take(10)),
            [
                ("a".into(), TaskState::Exited),
                ("b".into(), TaskState::Running)
            ],
            "a requeued task goes with its newest status"
        );
        b.mark_all_dirty();
        assert_eq!(b.take(10).len(), 2);
        b.forget("a");
        b.mark_all_dirty();
        assert_eq!(states(&b.take(10)), [("b".into(), TaskState::Running)]);
    }
}
