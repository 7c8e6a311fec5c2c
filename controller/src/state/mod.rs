//! The replicated state every controller holds in memory: the objects (services, nodes with their
//! container subnets, tasks), each stamped with the Raft log index that last changed it, and
//! the change log that feeds watches, and the reconciler's record of which services changed.
//!
//! Only the state machine (`crate::fsm`) writes to it, in log order; the API server reads it
//! through [`SharedStore::read`] after a ReadIndex round (linearizable) or directly (stale).

mod allocations;
pub mod changes;
mod id_set;
mod nodes;
mod staggered_map;
mod store;
mod subnets;
mod tasks;
pub mod watch;

pub use allocations::{Allocation, holds_resources, host_ports, requested, task_state};
pub use changes::{ChangeTracker, Changes};
pub use store::service_key;
pub use store::{
    ApplyOutcome, DEFAULT_NAMESPACE, Restored, ServiceKey, ServiceResult, SharedState, Store,
    StoreError, normalize_namespace, same_template,
};
pub use subnets::ClusterNetwork;
pub use tasks::{Plan, PlanResult, TaskChange, is_terminal};
pub use watch::{EventKind, Object, WatchError, WatchEvent, Watcher};

use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The store shared between the Raft node (the only writer) and readers such as the API server.
#[derive(Debug, Clone)]
pub struct SharedStore(Arc<RwLock<Store>>);

impl SharedStore {
    /// A store holding nothing, at revision 0, keeping up to `watch_history` events for watches.
    pub fn new(watch_history: usize) -> Self {
        Self(Arc::new(RwLock::new(Store::new(watch_history))))
    }

    /// Read access. A panic while the lock was held cannot leave the store half-written (apply
    /// mutates only after validating), so a poisoned lock is still read.
    pub fn read(&self) -> RwLockReadGuard<'_, Store> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Store> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}
