//! The in-memory object store. Writes come only from the state machine, in log order, and are
//! deterministic: the same commands at the same indices give the same objects on every replica.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Weak};

use hashbrown::Equivalent;

use tug_api::shared::Shared;
use tug_api::v1::{Node, ObjectMeta, Service, ServiceSpec, Task};

use super::allocations::Allocations;
use super::changes::ChangeTracker;
use super::id_set::IdSet;
use super::staggered_map::StaggeredMap;
use super::subnets::{ClusterNetwork, SubnetPool};
use super::tasks::{service_specs, share_spec};
use super::watch::{EventKind, Object, WatchError, WatchEvent, WatchHub, Watcher};

/// Objects are keyed by (namespace, name).
pub type ServiceKey = (String, String);

/// The maps behind point lookups: hashed (foldhash, seeded at random per process), since an
/// ordered map of string keys spent most of an apply comparing strings. Nothing applied depends
/// on their iteration order; whatever is shown or written in order is sorted where it is read.
/// The maps that grow with the services and tasks grow in small steps ([`StaggeredMap`]).
pub(super) type Map<K, V> = StaggeredMap<K, V>;

/// A borrowed [`ServiceKey`], to look one up without building its Strings. Hashes as the
/// tuple does (field by field, each as a `str`).
#[derive(Hash)]
pub(super) struct KeyRef<'a>(pub &'a str, pub &'a str);

impl Equivalent<ServiceKey> for KeyRef<'_> {
    fn equivalent(&self, key: &ServiceKey) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// The namespace an object without one lands in.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What an apply did to one object (like kubectl's created / configured / unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    Created,
    Configured,
    Unchanged,
}

/// The result of applying one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceResult {
    pub namespace: String,
    pub name: String,
    pub outcome: ApplyOutcome,
    pub generation: u64,
}

/// A command the store refuses; deterministic, so every replica refuses it the same way, and
/// nothing of the command is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("service #{position} of the request has no metadata")]
    MissingMetadata { position: usize },
    #[error("service #{position} of the request has an empty name")]
    EmptyName { position: usize },
    #[error("service {namespace}/{name} has no spec")]
    MissingSpec { namespace: String, name: String },
    #[error("service {namespace}/{name} not found")]
    ServiceNotFound { namespace: String, name: String },
    #[error("service {namespace}/{name} has no previous spec to go back to")]
    NoPreviousSpec { namespace: String, name: String },
    #[error("node {0} not found")]
    NodeNotFound(String),
    #[error("a node registration without a name")]
    NodeWithoutName,
    #[error("invalid cluster network: {0}")]
    BadClusterNetwork(String),
    #[error("the cluster has no container network configured")]
    NoClusterNetwork,
    #[error(
        "no free /{node_prefix} subnet left in the cluster CIDR {cidr} for node {node} (all \
         {capacity} are taken; remove nodes that are gone with `tug delete node NAME`)"
    )]
    SubnetsExhausted {
        cidr: String,
        node_prefix: u8,
        node: String,
        capacity: u64,
    },
    #[error(
        "node {0} is {1}: only a down node can be removed (stop its agent, or wait until it is \
         marked down)"
    )]
    NodeNotDown(String, &'static str),
}

/// Services, nodes and tasks, the revision of the last applied log entry, and the change log for
/// watches.
#[derive(Debug)]
pub struct Store {
    // Objects are shared (`Arc`) so that a snapshot can take the whole state in a few
    // milliseconds and encode it off the raft loop (see `Store::shared`).
    pub(super) services: Map<ServiceKey, Arc<Service>>,
    pub(super) nodes: BTreeMap<String, Arc<Node>>,
    pub(super) tasks: Map<String, Arc<Task>>,
    /// Task ids per service and per node (in id order): the reconciler and the agents' streams
    /// read by these.
    pub(super) tasks_by_service: Map<ServiceKey, IdSet>,
    pub(super) tasks_by_node: hashbrown::HashMap<String, BTreeSet<String>>,
    pub(super) allocations: Allocations,
    pub(super) subnets: SubnetPool,
    pub(super) revision: u64,
    pub(super) watch: WatchHub,
    /// The leader's reconciler's record of what changed (see [`Store::track_changes`]); held
    /// weakly, so nothing is recorded once the reconciler lets go of it.
    pub(super) tracker: Weak<ChangeTracker>,
}

/// See [`Store::shared`]: services and tasks in no particular order, nodes by name.
#[derive(Debug, Clone)]
pub struct SharedState {
    pub revision: u64,
    pub network: Option<ClusterNetwork>,
    pub services: Vec<Arc<Service>>,
    pub nodes: Vec<Arc<Node>>,
    pub tasks: Vec<Arc<Task>>,
}

impl SharedState {
    /// Services, tasks and nodes together, as [`Store::object_count`].
    pub fn object_count(&self) -> usize {
        self.services.len() + self.tasks.len() + self.nodes.len()
    }
}

impl Store {
    pub(crate) fn new(watch_history: usize) -> Self {
        Self {
            services: Map::new(),
            nodes: BTreeMap::new(),
            tasks: Map::new(),
            tasks_by_service: Map::new(),
            tasks_by_node: hashbrown::HashMap::new(),
            allocations: Allocations::default(),
            subnets: SubnetPool::default(),
            revision: 0,
            watch: WatchHub::new(watch_history),
            tracker: Weak::new(),
        }
    }

    /// A new record of which services change from now on, for the reconciler; it replaces
    /// any earlier one. Recording stops when the returned tracker is dropped.
    pub(crate) fn track_changes(&mut self) -> Arc<ChangeTracker> {
        let tracker = Arc::new(ChangeTracker::default());
        self.tracker = Arc::downgrade(&tracker);
        tracker
    }

    pub(super) fn publish(&mut self, kind: EventKind, object: Object, revision: u64) {
        if let Some(tracker) = self.tracker.upgrade() {
            tracker.note(&object);
        }
        self.watch.publish(WatchEvent {
            kind,
            object,
            revision,
        });
    }

    /// The log index of the last entry applied to this store.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn get_service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .get(&KeyRef(normalize_namespace(namespace), name))
            .map(Arc::as_ref)
    }

    /// Services in `namespace` (every namespace if `None`) whose labels include all of
    /// `selector`, ordered by namespace and name.
    pub fn list_services(
        &self,
        namespace: Option<&str>,
        selector: &HashMap<String, String>,
    ) -> Vec<&Service> {
        let mut found: Vec<(&ServiceKey, &Service)> = self
            .services
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|want| ns == normalize_namespace(want)))
            .filter(|(_, svc)| {
                let labels = svc.metadata.as_ref().map(|m| &m.labels);
                selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .map(|(key, svc)| (key, svc.as_ref()))
            .collect();
        found.sort_unstable_by(|a, b| a.0.cmp(b.0));
        found.into_iter().map(|(_, svc)| svc).collect()
    }

    /// The whole state as shared references: a copy of pointers, taken in a few milliseconds
    /// for a large state, to be read elsewhere while the store changes on (snapshots). Services
    /// and tasks come in no particular order.
    pub fn shared(&self) -> SharedState {
        SharedState {
            revision: self.revision,
            network: self.cluster_network(),
            services: self.shared_services(),
            nodes: self.nodes.values().cloned().collect(),
            tasks: self.tasks.values().cloned().collect(),
        }
    }

    /// Shared references to every service, in no particular order: a copy of pointers, no
    /// strings (what a sweep takes under the read lock).
    pub fn shared_services(&self) -> Vec<Arc<Service>> {
        self.services.values().cloned().collect()
    }

    /// Every service, in no particular order (`list_services` sorts).
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values().map(Arc::as_ref)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Services, tasks and nodes together: what a snapshot holds.
    pub fn object_count(&self) -> usize {
        self.services.len() + self.task_count() + self.nodes.len()
    }

    /// Changes with revision `>= from_revision` (0: from the next change on). A revision older
    /// than the kept history fails with [`WatchError::Compacted`]: list, then watch from
    /// `revision() + 1` under the same read lock.
    pub fn watch(&self, from_revision: u64) -> Result<Watcher, WatchError> {
        self.watch.subscribe(from_revision, self.revision)
    }

    /// Changes at or below this revision are no longer available to watches.
    pub fn compacted_revision(&self) -> u64 {
        self.watch.compacted()
    }

    /// Changes made from now on reach watchers together, at [`Store::release_changes`]: one
    /// wake-up per log entry, not one per object it changed.
    pub(crate) fn hold_changes(&mut self) {
        self.watch.hold();
    }

    pub(crate) fn release_changes(&mut self) {
        self.watch.release();
    }

    /// Marks the entry at `index` applied (every entry, whatever it changed).
    pub(crate) fn advance(&mut self, index: u64) {
        self.revision = self.revision.max(index);
    }

    /// Create-or-update a batch of services at log index `index`. All of the batch is applied or,
    /// if any service is invalid, none of it.
    pub(crate) fn apply_services(
        &mut self,
        index: u64,
        services: Vec<Service>,
    ) -> Result<Vec<ServiceResult>, StoreError> {
        for (position, svc) in services.iter().enumerate() {
            let meta = svc
                .metadata
                .as_ref()
                .ok_or(StoreError::MissingMetadata { position })?;
            if meta.name.is_empty() {
                return Err(StoreError::EmptyName { position });
            }
            if svc.spec.is_none() {
                return Err(StoreError::MissingSpec {
                    namespace: normalize_namespace(&meta.namespace).to_string(),
                    name: meta.name.clone(),
                });
            }
        }
        let mut results = Vec::with_capacity(services.len());
        for svc in services {
            results.push(self.apply_service(index, svc));
        }
        Ok(results)
    }

    fn apply_service(&mut self, index: u64, svc: Service) -> ServiceResult {
        let meta = svc.metadata.unwrap_or_default();
        let namespace = normalize_namespace(&meta.namespace).to_string();
        let key = (namespace.clone(), meta.name.clone());
        let (outcome, stored) = match self.services.get(&key) {
            None => {
                let stored = Service {
                    metadata: Some(ObjectMeta {
                        name: meta.name,
                        namespace,
                        labels: meta.labels,
                        create_revision: index,
                        revision: index,
                        generation: 1,
                    }),
                    spec: svc.spec,
                    previous_spec: None,
                };
                (ApplyOutcome::Created, stored)
            }
            Some(old) => {
                let old_meta = old.metadata.clone().unwrap_or_default();
                let spec_changed = old.spec != svc.spec;
                if !spec_changed && old_meta.labels == meta.labels {
                    return ServiceResult {
                        namespace: key.0,
                        name: key.1,
                        outcome: ApplyOutcome::Unchanged,
                        generation: old_meta.generation,
                    };
                }
                // Only a change of the template (not of the replica count) is something to
                // roll back from.
                let previous_spec = if !same_template(old.spec.as_deref(), svc.spec.as_deref()) {
                    old.spec.clone()
                } else {
                    old.previous_spec.clone()
                };
                // An unchanged spec stays the one the service's tasks share, and going back to
                // the previous one (an undo, or its manifest applied again) takes the copy the
                // previous generation's tasks share.
                let spec = if spec_changed {
                    let mut spec = svc.spec;
                    share_spec(&mut spec, old.previous_spec.iter());
                    spec
                } else {
                    old.spec.clone()
                };
                let stored = Service {
                    metadata: Some(ObjectMeta {
                        labels: meta.labels,
                        revision: index,
                        generation: old_meta.generation + u64::from(spec_changed),
                        ..old_meta
                    }),
                    spec,
                    previous_spec,
                };
                (ApplyOutcome::Configured, stored)
            }
        };
        let generation = stored.metadata.as_ref().map_or(0, |m| m.generation);
        let stored = Arc::new(stored);
        self.services.insert(key.clone(), Arc::clone(&stored));
        self.publish(EventKind::Put, Object::Service(stored), index);
        ServiceResult {
            namespace: key.0,
            name: key.1,
            outcome,
            generation,
        }
    }

    /// Deletes a service at log index `index`; false if there was none.
    pub(crate) fn delete_service(&mut self, index: u64, namespace: &str, name: &str) -> bool {
        match self
            .services
            .remove(&KeyRef(normalize_namespace(namespace), name))
        {
            Some(old) => {
                self.publish(EventKind::Delete, Object::Service(old), index);
                true
            }
            None => false,
        }
    }

    /// Sets the replica count of a service: a new generation if it changes.
    pub(crate) fn scale_service(
        &mut self,
        index: u64,
        namespace: &str,
        name: &str,
        replicas: u32,
    ) -> Result<ServiceResult, StoreError> {
        let mut svc = self.existing_service(namespace, name)?;
        if let Some(spec) = svc.spec.as_mut() {
            Shared::make_mut(spec).replicas = replicas;
        }
        Ok(self.apply_service(index, svc))
    }

    /// Makes the previous spec current again, as a new generation (`tug rollout undo`).
    pub(crate) fn undo_service(
        &mut self,
        index: u64,
        namespace: &str,
        name: &str,
    ) -> Result<ServiceResult, StoreError> {
        let mut svc = self.existing_service(namespace, name)?;
        let Some(previous) = svc.previous_spec.take() else {
            return Err(StoreError::NoPreviousSpec {
                namespace: normalize_namespace(namespace).to_string(),
                name: name.to_string(),
            });
        };
        let replicas = svc
            .spec
            .as_deref()
            .map_or(previous.replicas, |s| s.replicas);
        svc.spec = Some(
            ServiceSpec {
                replicas,
                ..Shared::into_inner(previous)
            }
            .into(),
        );
        Ok(self.apply_service(index, svc))
    }

    fn existing_service(&self, namespace: &str, name: &str) -> Result<Service, StoreError> {
        self.get_service(namespace, name)
            .cloned()
            .ok_or_else(|| StoreError::ServiceNotFound {
                namespace: normalize_namespace(namespace).to_string(),
                name: name.to_string(),
            })
    }

    /// Replaces everything with restored state at `revision` (snapshot install); watchers resync.
    pub(crate) fn replace(&mut self, revision: u64, restored: Restored) {
        self.services = restored
            .services
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect();
        self.nodes = restored
            .nodes
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect();
        self.subnets.restore(
            restored.network,
            self.nodes
                .iter()
                .map(|(name, node)| (name.as_str(), node.subnet.as_str())),
        );
        self.tasks = Map::new();
        self.tasks_by_node = hashbrown::HashMap::new();
        self.tasks_by_service = Map::new();
        self.allocations.clear();
        // Tasks share their service's spec again, as before the snapshot; tasks of an older
        // generation (a scale keeps them) share one copy per service and spec.
        let mut older: HashMap<ServiceKey, Vec<Shared<ServiceSpec>>> = HashMap::new();
        for mut task in restored.tasks {
            let key = KeyRef(normalize_namespace(&task.namespace), &task.service);
            let service = self.services.get(&key);
            if !service.is_some_and(|s| share_spec(&mut task.spec, service_specs(s)))
                && let Some(own) = task.spec.clone()
            {
                let seen = older
                    .entry((key.0.to_string(), key.1.to_string()))
                    .or_default();
                if !share_spec(&mut task.spec, seen.iter()) {
                    seen.push(own);
                }
            }
            self.index_task(&task);
            self.allocations.update(None, Some(&task));
            self.tasks.insert(task.id.clone(), Arc::new(task));
        }
        self.revision = revision;
        self.watch.reset(revision);
        if let Some(tracker) = self.tracker.upgrade() {
            tracker.note_all();
        }
    }
}

/// Everything a snapshot holds.
#[derive(Debug, Default)]
pub struct Restored {
    pub revision: u64,
    pub services: BTreeMap<ServiceKey, Service>,
    pub nodes: BTreeMap<String, Node>,
    pub tasks: Vec<Task>,
    pub network: Option<ClusterNetwork>,
}

/// Whether two specs run the same containers: equal but for the replica count. Tasks made from
/// either need no rolling update to the other.
pub fn same_template(a: Option<&ServiceSpec>, b: Option<&ServiceSpec>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            if std::ptr::eq(a, b) {
                true
            } else if a.replicas == b.replicas {
                a == b
            } else {
                ServiceSpec {
                    replicas: b.replicas,
                    ..a.clone()
                } == *b
            }
        }
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// The empty namespace is the default one.
pub fn normalize_namespace(namespace: &str) -> &str {
    if namespace.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        namespace
    }
}

/// The key a service is stored under.
pub fn service_key(svc: &Service) -> ServiceKey {
    let KeyRef(namespace, name) = service_key_ref(svc);
    (namespace.to_string(), name.to_string())
}

/// [`service_key`], borrowed from the service.
pub(super) fn service_key_ref(svc: &Service) -> KeyRef<'_> {
    let meta = svc.metadata.as_ref();
    KeyRef(
        normalize_namespace(meta.map_or("", |m| m.namespace.as_str())),
        meta.map_or("", |m| m.name.as_str()),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    pub(crate) fn service(name: &str, image: &str) -> Service {
        Service {
            metadata: Some(ObjectMeta {
                name: name.into(),
                labels: [("app".to_string(), name.to_string())].into(),
                ..Default::default()
            }),
            spec: Some(
                ServiceSpec {
                    image: image.into(),
                    replicas: 1,
                    ..Default::default()
                }
                .into(),
            ),
            previous_spec: None,
        }
    }

    fn meta(store: &Store, name: &str) -> ObjectMeta {
        store
            .get_service("default", name)
            .and_then(|s| s.metadata.clone())
            .unwrap_or_default()
    }

    #[test]
    fn apply_creates_configures_and_leaves_unchanged() -> Result<(), StoreError> {
        let mut store = Store::new(100);
        let r = store.apply_services(5, vec![service("web", "nginx:1")])?;
        assert_eq!(r[0].outcome, ApplyOutcome::Created);
        assert_eq!(r[0].generation, 1);
        assert_eq!(r[0].namespace, "default");
        let m = meta(&store, "web");
        assert_eq!((m.create_revision, m.revision, m.generation), (5, 5, 1));

        let r = store.apply_services(6, vec![service("web", "nginx:1")])?;
        assert_eq!(r[0].outcome, ApplyOutcome::Unchanged);
        assert_eq!(
            meta(&store, "web").revision,
            5,
            "unchanged keeps the revision"
        );

        let r = store.apply_services(7, vec![service("web", "nginx:2")])?;
        assert_eq!(
            (r[0].outcome, r[0].generation),
            (ApplyOutcome::Configured, 2)
        );
        let m = meta(&store, "web");
        assert_eq!((m.create_revision, m.revision, m.generation), (5, 7, 2));

        // A label-only change is configured but not a new generation.
        let mut relabeled = service("web", "nginx:2");
        if let Some(m) = relabeled.metadata.as_mut() {
            m.labels.insert("tier".into(), "front".into());
        }
        let r = store.apply_services(8, vec![relabeled])?;
        assert_eq!(
            (r[0].outcome, r[0].generation),
            (ApplyOutcome::Configured, 2)
        );
        assert_eq!(meta(&store, "web").revision, 8);
        Ok(())
    }

    #[test]
    fn an_invalid_service_rejects_the_whole_batch() {
        let mut store = Store::new(100);
        let mut nameless = service("", "x");
        if let Some(m) = nameless.metadata.as_mut() {
            m.name.clear();
        }
        let err = store.apply_services(3, vec![service("ok", "x"), nameless]);
        assert_eq!(err, Err(StoreError::EmptyName { position: 1 }));
        assert!(store.get_service("default", "ok").is_none());
    }

    #[test]
    fn list_filters_by_namespace_and_labels() -> Result<(), StoreError> {
        let mut store = Store::new(100);
        let mut other = service("db", "pg");
        if let Some(m) = other.metadata.as_mut() {
            m.namespace = "prod".into();
        }
        store.apply_services(2, vec![service("web", "x"), service("api", "y"), other])?;
        let none = HashMap::new();
        assert_eq!(store.list_services(None, &none).len(), 3);
        assert_eq!(store.list_services(Some("default"), &none).len(), 2);
        assert_eq!(store.list_services(Some(""), &none).len(), 2);
        let sel = [("app".to_string(), "api".to_string())].into();
        let names: Vec<_> = store
            .list_services(None, &sel)
            .iter()
            .map(|s| service_key(s).1)
            .collect();
        assert_eq!(names, vec!["api".to_string()]);
        Ok(())
    }

    #[test]
    fn delete_removes_and_reports_absence() -> Result<(), StoreError> {
        let mut store = Store::new(100);
        store.apply_services(2, vec![service("web", "x")])?;
        assert!(store.delete_service(3, "", "web"));
        assert!(!store.delete_service(4, "default", "web"));
        assert!(store.get_service("default", "web").is_none());
        Ok(())
    }

    #[test]
    fn changes_reach_watchers_in_order() -> Result<(), Box<dyn std::error::Error>> {
        let mut store = Store::new(100);
        let mut w = store.watch(0)?;
        store.apply_services(2, vec![service("web", "x")])?;
        store.apply_services(3, vec![service("web", "x")])?; // unchanged: no event
        store.delete_service(4, "default", "web");
        let first = w.try_next().ok_or("no event")??;
        assert_eq!((first.kind, first.revision), (EventKind::Put, 2));
        let second = w.try_next().ok_or("no event")??;
        assert_eq!((second.kind, second.revision), (EventKind::Delete, 4));
        assert!(w.try_next().is_none());
        Ok(())
    }
}
