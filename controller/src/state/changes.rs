//! Which services changed since the reconciler last looked.
//!
//! The leader's reconciler needs only the set of services to look at again, never the changes
//! themselves. A watch stream would give it those changes one by one through a bounded buffer:
//! under a high write rate a long pass lets the buffer overflow, and a reconciler that lost
//! changes must look at every service again, which makes the next pass long too. The tracker is
//! a set instead: it can never overflow (it holds each service once, however often it changed),
//! so a pass over everything happens only when something can really affect every service (a
//! node changed, the state was replaced by a snapshot).
//!
//! The store records into it while applying (under its write lock); the reconciler takes the
//! set out between passes. The store holds it weakly, so a replica that stops leading stops
//! recording as soon as its reconciler drops the tracker.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use hashbrown::HashSet;
use tokio::sync::Notify;

use super::store::{KeyRef, ServiceKey, normalize_namespace, service_key_ref};
use super::watch::Object;

/// What changed since the last [`ChangeTracker::take`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Something that can affect any service changed: look at all of them.
    pub all: bool,
    /// Services whose own object or one of whose tasks changed (not kept once `all` is set).
    pub services: BTreeSet<ServiceKey>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }
}

/// The set of changes since the reconciler last took it, and a wake-up for it.
#[derive(Debug, Default)]
pub struct ChangeTracker {
    pending: Mutex<Pending>,
    changed: Notify,
}

/// [`Changes`] as recorded: hashed, so that noting a service already recorded (the common case:
/// a service's tasks change one after another) is one lookup that builds no key.
#[derive(Debug, Default)]
struct Pending {
    all: bool,
    services: HashSet<ServiceKey>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }
}

impl ChangeTracker {
    /// Records a change of `object`.
    pub(super) fn note(&self, object: &Object) {
        let key = match object {
            Object::Service(s) => service_key_ref(s),
            Object::Task(t) => KeyRef(normalize_namespace(&t.namespace), &t.service),
            // A node changing (down, drained, new) can affect any service.
            Object::Node(_) => return self.note_all(),
        };
        let mut pending = self.lock();
        if pending.all || pending.services.contains(&key) {
            return;
        }
        let was_empty = pending.services.is_empty();
        pending
            .services
            .insert((key.0.to_string(), key.1.to_string()));
        drop(pending);
        if was_empty {
            self.changed.notify_one();
        }
    }

    /// Records a change that can affect every service.
    pub(super) fn note_all(&self) {
        let mut pending = self.lock();
        let was_empty = pending.is_empty();
        pending.all = true;
        pending.services = HashSet::new();
        drop(pending);
        if was_empty {
            self.changed.notify_one();
        }
    }

    /// Takes what changed since the last call, leaving the tracker empty.
    pub fn take(&self) -> Changes {
        let pending = std::mem::take(&mut *self.lock());
        Changes {
            all: pending.all,
            services: pending.services.into_iter().collect(),
        }
    }

    /// Resolves once something was recorded since the last [`ChangeTracker::take`] (at once if
    /// something already is).
    pub async fn changed(&self) {
        loop {
            if !self.lock().is_empty() {
                return;
            }
            self.changed.notified().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // The guarded set is valid after any panic (each update is one insert or clear).
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tug_api::v1::{Node, ObjectMeta, Service, Task};

    use super::*;
    use crate::state::store::tests as store_tests;
    use crate::state::{Restored, Store};

    fn service(namespace: &str, name: &str) -> Object {
        Object::Service(Arc::new(Service {
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: namespace.into(),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    fn task(namespace: &str, service: &str) -> Object {
        Object::Task(Arc::new(Task {
            id: format!("{service}.1.x"),
            namespace: namespace.into(),
            service: service.into(),
            ..Default::default()
        }))
    }

    fn key(namespace: &str, name: &str) -> ServiceKey {
        (namespace.to_string(), name.to_string())
    }

    #[test]
    fn services_and_the_services_of_tasks_are_recorded_once_each() {
        let tracker = ChangeTracker::default();
        assert!(tracker.take().is_empty());
        tracker.note(&service("", "web"));
        tracker.note(&task("default", "web"));
        tracker.note(&task("prod", "db"));
        tracker.note(&service("prod", "db"));
        let changes = tracker.take();
        assert!(!changes.all);
        assert_eq!(
            changes.services,
            BTreeSet::from([key("default", "web"), key("prod", "db")])
        );
        assert!(tracker.take().is_empty(), "take leaves it empty");
    }

    #[test]
    fn a_node_change_or_a_reset_means_every_service() {
        let tracker = ChangeTracker::default();
        tracker.note(&service("", "web"));
        tracker.note(&Object::Node(Arc::new(Node::default())));
        tracker.note(&service("", "api"));
        assert_eq!(
            tracker.take(),
            Changes {
                all: true,
                services: BTreeSet::new()
            }
        );
        tracker.note_all();
        assert!(tracker.take().all);
    }

    #[test]
    fn it_never_overflows_however_many_changes_wait() {
        let tracker = ChangeTracker::default();
        for round in 0..3 {
            for i in 0..100_000 {
                tracker.note(&task("default", &format!("svc-{i}")));
            }
            let changes = tracker.take();
            assert!(!changes.all, "round {round}");
            assert_eq!(changes.services.len(), 100_000);
        }
    }

    #[test]
    fn a_store_records_what_it_applies_far_past_its_watch_buffer() {
        // A watch history (and channel) of 64 changes; 1,000 services change.
        let mut store = Store::new(64);
        let tracker = store.track_changes();
        for i in 0..1_000u64 {
            let svc = store_tests::service(&format!("svc-{i:04}"), "busybox");
            let applied = store.apply_services(i + 2, vec![svc]);
            assert!(applied.is_ok(), "{applied:?}");
        }
        let changes = tracker.take();
        assert!(!changes.all);
        assert_eq!(changes.services.len(), 1_000);
        assert!(changes.services.contains(&key("default", "svc-0999")));

        // A restored snapshot replaces everything: every service is looked at again.
        store.replace(5_000, Restored::default());
        assert!(tracker.take().all);

        // Once the reconciler lets go, nothing is recorded any more.
        drop(tracker);
        assert_eq!(store.tracker.strong_count(), 0);
    }

    #[tokio::test]
    async fn changed_wakes_for_a_change_made_before_or_while_waiting() {
        let tracker = Arc::new(ChangeTracker::default());
        let waiting = tokio::time::timeout(Duration::from_millis(50), tracker.changed()).await;
        assert!(waiting.is_err(), "nothing changed yet");

        // Recorded before anyone waits: the next wait returns at once.
        tracker.note(&service("", "web"));
        let woke = tokio::time::timeout(Duration::from_secs(5), tracker.changed()).await;
        assert!(woke.is_ok(), "a recorded change");
        // It stays recorded until taken.
        let woke = tokio::time::timeout(Duration::from_secs(5), tracker.changed()).await;
        assert!(woke.is_ok(), "still recorded");
        tracker.take();

        // Recorded while a waiter waits.
        let waiter = {
            let tracker = Arc::clone(&tracker);
            tokio::spawn(async move { tracker.changed().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        tracker.note(&task("default", "web"));
        let woke = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(woke, Ok(Ok(()))), "the waiter woke: {woke:?}");
    }
}
