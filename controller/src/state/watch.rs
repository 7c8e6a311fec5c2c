//! The change log behind watches: every replica keeps its most recent changes in memory and
//! streams them, in apply order, to subscribers from a given revision on.
//!
//! A subscriber asking for a revision older than what is kept, one that falls too far behind,
//! and every subscriber of a replica that restores a snapshot (its history is replaced
//! wholesale) gets an error saying so; the API answers that with a full resync
//! (list at a revision, then watch from the next one).

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast;
use tug_api::v1::{Node, Service, Task};

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created or changed; the event carries the new object.
    Put,
    /// Deleted; the event carries the object as it was before the delete.
    Delete,
}

/// The object a change is about: the same allocation the store holds (or held), so publishing
/// a change copies nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    Task(Arc<Task>),
    Node(Arc<Node>),
}

/// One change, at the revision (log index) that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub object: Object,
    pub revision: u64,
}

impl WatchEvent {
    pub fn service(&self) -> Option<&Service> {
        match &self.object {
            Object::Service(s) => Some(s.as_ref()),
            _ => None,
        }
    }

    pub fn task(&self) -> Option<&Task> {
        match &self.object {
            Object::Task(t) => Some(t.as_ref()),
            _ => None,
        }
    }
}

/// Why a watch cannot continue from where it is; every case means "resync, then watch again".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error(
        "revision {requested} has been compacted (changes up to {compacted} are no longer kept); \
         resync with a full list"
    )]
    Compacted { requested: u64, compacted: u64 },
    #[error(
        "the watcher fell {missed} updates behind (a change, or the changes of one log entry) and \
         they were dropped; resync with a full list"
    )]
    Lagged { missed: u64 },
    #[error("the replica restored a snapshot at revision {revision}; resync with a full list")]
    Reset { revision: u64 },
    #[error("the store was shut down")]
    Closed,
}

#[derive(Debug, Clone)]
enum Change {
    Event(Arc<WatchEvent>),
    /// The changes of one log entry (a plan touches many tasks), sent at once so that
    /// subscribers are woken once for all of them.
    Batch(Arc<[Arc<WatchEvent>]>),
    Reset {
        revision: u64,
    },
}

/// Recent history plus the fan-out channel. Mutated only under the store's write lock, so a
/// subscriber (under the read lock) sees history and live events without gap or overlap.
#[derive(Debug)]
pub(crate) struct WatchHub {
    history: VecDeque<Arc<WatchEvent>>,
    capacity: usize,
    /// Changes at revisions `<= compacted` are not in `history` any more.
    compacted: u64,
    tx: broadcast::Sender<Change>,
    /// While held (see [`WatchHub::hold`]), published changes wait here to be sent as one.
    held: Option<Vec<Arc<WatchEvent>>>,
}

impl WatchHub {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity.clamp(64, 65_536));
        Self {
            history: VecDeque::new(),
            capacity,
            compacted: 0,
            tx,
            held: None,
        }
    }

    /// From now until [`WatchHub::release`], changes go to the history at once but to
    /// subscribers together. Both happen under the store's write lock, so a subscriber sees
    /// every change once: in its backlog or in the batch.
    pub(crate) fn hold(&mut self) {
        self.held.get_or_insert_with(Vec::new);
    }

    /// Sends the changes held since [`WatchHub::hold`].
    pub(crate) fn release(&mut self) {
        let Some(mut held) = self.held.take() else {
            return;
        };
        let change = match held.len() {
            0 => return,
            1 => held.pop().map(Change::Event),
            _ => Some(Change::Batch(held.into())),
        };
        if let Some(change) = change {
            // No receivers is fine: nobody is watching.
            let _ = self.tx.send(change);
        }
    }

    pub(crate) fn publish(&mut self, event: WatchEvent) {
        let event = Arc::new(event);
        if self.history.len() >= self.capacity
            && let Some(old) = self.history.pop_front()
        {
            self.compacted = self.compacted.max(old.revision);
        }
        self.history.push_back(Arc::clone(&event));
        match &mut self.held {
            Some(held) => held.push(event),
            // No receivers is fine: nobody is watching.
            None => {
                let _ = self.tx.send(Change::Event(event));
            }
        }
    }

    /// The state was replaced (snapshot restore) at `revision`: history is gone, and every
    /// current subscriber must resync.
    pub(crate) fn reset(&mut self, revision: u64) {
        self.release();
        self.history.clear();
        self.compacted = revision;
        let _ = self.tx.send(Change::Reset { revision });
    }

    /// Changes with revision `>= from`, or from the next change on if `from` is 0.
    pub(crate) fn subscribe(&self, from: u64, current: u64) -> Result<Watcher, WatchError> {
        let from = if from == 0 { current + 1 } else { from };
        if from <= self.compacted {
            return Err(WatchError::Compacted {
                requested: from,
                compacted: self.compacted,
            });
        }
        let backlog = self
            .history
            .iter()
            .filter(|e| e.revision >= from)
            .cloned()
            .collect();
        Ok(Watcher {
            backlog,
            rx: self.tx.subscribe(),
            from,
        })
    }

    pub(crate) fn compacted(&self) -> u64 {
        self.compacted
    }
}

/// A stream of changes in apply order. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Watcher {
    backlog: VecDeque<Arc<WatchEvent>>,
    rx: broadcast::Receiver<Change>,
    from: u64,
}

impl Watcher {
    /// The next change, waiting for one if none is pending.
    pub async fn next(&mut self) -> Result<Arc<WatchEvent>, WatchError> {
        if let Some(event) = self.backlog.pop_front() {
            return Ok(event);
        }
        loop {
            let change = self.rx.recv().await;
            if let Some(result) = self.filter(change) {
                return result;
            }
        }
    }

    /// The next change if one is already pending, without waiting.
    pub fn try_next(&mut self) -> Option<Result<Arc<WatchEvent>, WatchError>> {
        if let Some(event) = self.backlog.pop_front() {
            return Some(Ok(event));
        }
        loop {
            let change = match self.rx.try_recv() {
                Err(broadcast::error::TryRecvError::Empty) => return None,
                Ok(change) => Ok(change),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(broadcast::error::RecvError::Lagged(n))
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    Err(broadcast::error::RecvError::Closed)
                }
            };
            if let Some(result) = self.filter(change) {
                return Some(result);
            }
        }
    }

    fn filter(
        &mut self,
        change: Result<Change, broadcast::error::RecvError>,
    ) -> Option<Result<Arc<WatchEvent>, WatchError>> {
        match change {
            Ok(Change::Event(event)) if event.revision >= self.from => Some(Ok(event)),
            Ok(Change::Event(_)) => None,
            Ok(Change::Batch(events)) => {
                let from = self.from;
                self.backlog
                    .extend(events.iter().filter(|e| e.revision >= from).cloned());
                self.backlog.pop_front().map(Ok)
            }
            Ok(Change::Reset { revision }) => Some(Err(WatchError::Reset { revision })),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                Some(Err(WatchError::Lagged { missed }))
            }
            Err(broadcast::error::RecvError::Closed) => Some(Err(WatchError::Closed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tug_api::v1::ObjectMeta;

    fn event(name: &str, revision: u64) -> WatchEvent {
        WatchEvent {
            kind: EventKind::Put,
            object: Object::Service(Arc::new(Service {
                metadata: Some(ObjectMeta {
                    name: name.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            revision,
        }
    }

    fn name(e: &WatchEvent) -> &str {
        e.service()
            .and_then(|s| s.metadata.as_ref())
            .map_or("", |m| m.name.as_str())
    }

    #[tokio::test]
    async fn history_then_live_events_without_gap_or_overlap() -> Result<(), WatchError> {
        let mut hub = WatchHub::new(10);
        hub.publish(event("a", 2));
        hub.publish(event("b", 3));
        let mut w = hub.subscribe(3, 3)?;
        hub.publish(event("c", 4));
        assert_eq!(name(&*w.next().await?), "b");
        assert_eq!(name(&*w.next().await?), "c");
        assert!(w.try_next().is_none());
        Ok(())
    }

    #[tokio::test]
    async fn held_changes_arrive_together_in_order_once_released() -> Result<(), WatchError> {
        let mut hub = WatchHub::new(10);
        let mut w = hub.subscribe(0, 1)?;
        hub.hold();
        for (n, rev) in [("a", 2), ("b", 2), ("c", 2)] {
            hub.publish(event(n, rev));
        }
        assert!(w.try_next().is_none(), "nothing is sent while held");
        assert_eq!(w.rx.len(), 0);
        // The history has them at once: a subscriber from revision 2 gets them as backlog.
        assert_eq!(
            hub.subscribe(2, 2)?
                .try_next()
                .map(|e| e.map(|e| e.revision)),
            Some(Ok(2))
        );
        hub.release();
        assert_eq!(w.rx.len(), 1, "the held changes went out as one message");
        hub.publish(event("d", 3));
        let mut names = Vec::new();
        while let Some(e) = w.try_next() {
            names.push(name(&*e?).to_string());
        }
        assert_eq!(names, ["a", "b", "c", "d"]);
        Ok(())
    }

    #[tokio::test]
    async fn zero_means_from_now_on() -> Result<(), WatchError> {
        let mut hub = WatchHub::new(10);
        hub.publish(event("a", 2));
        let mut w = hub.subscribe(0, 2)?;
        assert!(w.try_next().is_none());
        hub.publish(event("b", 3));
        assert_eq!(name(&*w.next().await?), "b");
        Ok(())
    }

    #[test]
    fn an_evicted_revision_is_reported_compacted() {
        let mut hub = WatchHub::new(2);
        for rev in 2..6 {
            hub.publish(event("x", rev));
        }
        assert_eq!(hub.compacted(), 3);
        assert_eq!(
            hub.subscribe(3, 5).err(),
            Some(WatchError::Compacted {
                requested: 3,
                compacted: 3
            })
        );
        assert!(hub.subscribe(4, 5).is_ok());
    }

    #[tokio::test]
    async fn a_reset_makes_every_watcher_resync() -> Result<(), WatchError> {
        let mut hub = WatchHub::new(10);
        let mut w = hub.subscribe(0, 1)?;
        hub.reset(50);
        assert_eq!(
            w.next().await.err(),
            Some(WatchError::Reset { revision: 50 })
        );
        assert!(matches!(
            hub.subscribe(50, 50),
            Err(WatchError::Compacted { .. })
        ));
        Ok(())
    }
}
