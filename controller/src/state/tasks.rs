//! Tasks in the store: created, placed, stopped and removed by the leader's reconciler in plans
//! (one Raft command per reconcile pass), and their status reported by the agents that run them.

use std::sync::Arc;

use tug_api::shared::Shared;
use tug_api::v1::{
    DesiredState, Service, ServiceSpec, Task, TaskState, TaskStatus, TaskStatusUpdate,
};

use super::allocations::Allocation;
use super::id_set::IdSet;
use super::store::{KeyRef, ServiceKey, Store, normalize_namespace};
use super::watch::{EventKind, Object};

/// One change of a plan to an existing task.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskChange {
    #[prost(string, tag = "1")]
    pub id: String,
    /// `Unspecified` leaves it as it is.
    #[prost(enumeration = "DesiredState", tag = "2")]
    pub desired_state: i32,
    /// Places a pending task on this node; empty leaves it as it is. A placed task never moves.
    #[prost(string, tag = "3")]
    pub node: String,
    /// Replaces the status (pending reason, lost).
    #[prost(message, optional, tag = "4")]
    pub status: Option<TaskStatus>,
}

/// What one reconcile pass decided, committed as one command.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Plan {
    #[prost(message, repeated, tag = "1")]
    pub create: Vec<Task>,
    #[prost(message, repeated, tag = "2")]
    pub update: Vec<TaskChange>,
    /// Ids of tasks to forget (finished and no longer wanted).
    #[prost(string, repeated, tag = "3")]
    pub remove: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.remove.is_empty()
    }
}

/// How much of a plan took effect; the rest referred to objects that changed meanwhile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanResult {
    pub created: usize,
    pub updated: usize,
    pub removed: usize,
}

/// A service's specs a task may run: the current one and the one before a template change.
pub(super) fn service_specs(service: &Service) -> impl Iterator<Item = &Shared<ServiceSpec>> {
    service.spec.iter().chain(service.previous_spec.iter())
}

/// Points `spec` at an equal one of `specs` (its service's), so that a service and its tasks
/// hold one copy; false if none is equal. What it holds does not change, only where.
pub(super) fn share_spec<'a>(
    spec: &mut Option<Shared<ServiceSpec>>,
    specs: impl IntoIterator<Item = &'a Shared<ServiceSpec>>,
) -> bool {
    let Some(own) = spec.as_ref() else {
        return false;
    };
    match specs.into_iter().find(|s| *s == own) {
        Some(same) => {
            *spec = Some(same.clone());
            true
        }
        None => false,
    }
}

/// Whether a task's container is finished for good (it will not run again).
pub fn is_terminal(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Exited | TaskState::Failed | TaskState::Lost | TaskState::Stopped
    )
}

impl Store {
    pub fn get_task(&self, id: &str) -> Option<&Task> {
        self.tasks.get(id).map(Arc::as_ref)
    }

    /// Every task, in no particular order.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values().map(Arc::as_ref)
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    pub fn tasks_of_service(&self, namespace: &str, name: &str) -> Vec<&Task> {
        let key = KeyRef(normalize_namespace(namespace), name);
        let ids = self.tasks_by_service.get(&key);
        self.ids_to_tasks(ids.into_iter().flat_map(IdSet::iter))
    }

    pub fn tasks_of_node(&self, node: &str) -> Vec<&Task> {
        self.ids_to_tasks(self.tasks_by_node.get(node).into_iter().flatten())
    }

    /// The keys of every service that has tasks (some may belong to deleted services), in no
    /// particular order.
    pub fn services_with_tasks(&self) -> impl Iterator<Item = &ServiceKey> {
        self.tasks_by_service.keys()
    }

    fn ids_to_tasks<'a>(&'a self, ids: impl Iterator<Item = &'a String>) -> Vec<&'a Task> {
        ids.filter_map(|id| self.get_task(id)).collect()
    }

    pub(super) fn index_task(&mut self, task: &Task) {
        let key = KeyRef(normalize_namespace(&task.namespace), &task.service);
        let ids = match self.tasks_by_service.get_mut(&key) {
            Some(ids) => ids,
            None => self
                .tasks_by_service
                .get_or_insert_default((key.0.to_string(), key.1.to_string())),
        };
        ids.insert(task.id.clone());
        if !task.node.is_empty() {
            self.tasks_by_node
                .entry(task.node.clone())
                .or_default()
                .insert(task.id.clone());
        }
    }

    fn unindex_task(&mut self, task: &Task) {
        let key = KeyRef(normalize_namespace(&task.namespace), &task.service);
        if let Some(ids) = self.tasks_by_service.get_mut(&key) {
            ids.remove(&task.id);
            if ids.is_empty() {
                self.tasks_by_service.remove(&key);
            }
        }
        if let Some(ids) = self.tasks_by_node.get_mut(&task.node) {
            ids.remove(&task.id);
            if ids.is_empty() {
                self.tasks_by_node.remove(&task.node);
            }
        }
    }

    /// Applies a reconcile plan at log index `index`. Parts that no longer fit the state (a task
    /// that exists already or is gone, a service deleted meanwhile, a placed task asked to move)
    /// are skipped, the same way on every replica.
    pub(crate) fn apply_plan(&mut self, index: u64, plan: Plan) -> PlanResult {
        let mut result = PlanResult::default();
        for mut task in plan.create {
            if task.id.is_empty() || self.tasks.contains_key(&task.id) {
                continue;
            }
            let Some(service) = self.get_service(&task.namespace, &task.service) else {
                continue;
            };
            share_spec(&mut task.spec, service_specs(service));
            task.namespace = normalize_namespace(&task.namespace).to_string();
            task.create_revision = index;
            task.revision = index;
            self.put_task(index, task);
            result.created += 1;
        }
        for change in plan.update {
            let Some(old) = self.get_task(&change.id).cloned() else {
                continue;
            };
            if !change.node.is_empty() && !old.node.is_empty() && old.node != change.node {
                continue;
            }
            let mut task = old.clone();
            if change.desired_state() != DesiredState::Unspecified {
                task.desired_state = change.desired_state;
            }
            if !change.node.is_empty() && task.node.is_empty() {
                self.unindex_task(&task);
                task.node = change.node;
            }
            if let Some(status) = change.status {
                task.status = Some(status);
            }
            if task == old {
                continue;
            }
            task.revision = index;
            self.put_task(index, task);
            result.updated += 1;
        }
        result.removed = self.remove_tasks(index, plan.remove);
        result
    }

    /// Forgets the tasks `ids` (those still there); returns how many went.
    pub(super) fn remove_tasks(&mut self, index: u64, ids: Vec<String>) -> usize {
        let mut removed = 0;
        for id in ids {
            if let Some(task) = self.tasks.remove(&id) {
                self.unindex_task(&task);
                self.allocations.update(Some(&task), None);
                self.publish(EventKind::Delete, Object::Task(task), index);
                removed += 1;
            }
        }
        removed
    }

    /// Applies status reports from the agent of `node`. Reports about tasks that are gone, that
    /// belong to another node, or that the controller already declared lost are ignored. Returns
    /// how many changed something.
    pub(crate) fn apply_statuses(
        &mut self,
        index: u64,
        node: &str,
        updates: Vec<TaskStatusUpdate>,
    ) -> usize {
        let mut applied = 0;
        for update in updates {
            let Some(status) = update.status else {
                continue;
            };
            let Some(old) = self.tasks.get(&update.task_id) else {
                continue;
            };
            let current = old
                .status
                .as_ref()
                .map_or(TaskState::Pending, |s| s.state());
            if old.node != node
                || current == TaskState::Lost
                || old.status.as_ref() == Some(&status)
            {
                continue;
            }
            let task = Task {
                status: Some(status),
                revision: index,
                ..(**old).clone()
            };
            self.put_task(index, task);
            applied += 1;
        }
        applied
    }

    fn put_task(&mut self, index: u64, task: Task) {
        self.index_task(&task);
        let task = Arc::new(task);
        let old = self.tasks.insert(task.id.clone(), Arc::clone(&task));
        self.allocations.update(old.as_deref(), Some(&task));
        self.publish(EventKind::Put, Object::Task(task), index);
    }

    /// What the tasks on `node` hold.
    pub fn allocation(&self, node: &str) -> Option<&Allocation> {
        self.allocations.get(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::Restored;
    use crate::state::store::tests::service;
    use tug_api::v1::ObjectMeta;

    fn task(id: &str, node: &str) -> Task {
        Task {
            id: id.into(),
            namespace: String::new(),
            service: "web".into(),
            slot: 1,
            node: node.into(),
            desired_state: DesiredState::Running.into(),
            status: Some(TaskStatus {
                state: TaskState::Assigned.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn status(state: TaskState) -> TaskStatus {
        TaskStatus {
            state: state.into(),
            ..Default::default()
        }
    }

    #[test]
    fn plans_create_place_update_and_remove() -> Result<(), Box<dyn std::error::Error>> {
        let mut store = Store::new(100);
        store.apply_services(2, vec![service("web", "x")])?;
        let r = store.apply_plan(
            3,
            Plan {
                create: vec![task("web.1.a", "n1"), task("web.2.b", ""), {
                    let mut t = task("api.1.c", "n1");
                    t.service = "api".into();
                    t
                }],
                ..Default::default()
            },
        );
        assert_eq!(r.created, 2, "a task of an unknown service is skipped");
        assert_eq!(store.tasks_of_node("n1").len(), 1);
        assert_eq!(store.tasks_of_service("default", "web").len(), 2);

        let r = store.apply_plan(
            4,
            Plan {
                update: vec![
                    TaskChange {
                        id: "web.2.b".into(),
                        node: "n2".into(),
                        ..Default::default()
                    },
                    TaskChange {
                        id: "web.1.a".into(),
                        node: "n3".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        );
        assert_eq!(r.updated, 1, "a placed task never moves");
        assert_eq!(store.tasks_of_node("n2").len(), 1);
        assert_eq!(
            store.get_task("web.1.a").map(|t| t.node.as_str()),
            Some("n1")
        );

        let r = store.apply_plan(
            5,
            Plan {
                remove: vec!["web.1.a".into(), "nope".into()],
                ..Default::default()
            },
        );
        assert_eq!(r.removed, 1);
        assert!(store.tasks_of_node("n1").is_empty());
        assert_eq!(store.task_count(), 1);
        Ok(())
    }

    /// A task of `web` at `generation`, its spec decoded on its own as from a log entry.
    fn task_of(id: &str, image: &str, replicas: u32, generation: u64) -> Task {
        let mut t = task(id, "");
        t.spec_generation = generation;
        t.spec = Some(
            ServiceSpec {
                image: image.into(),
                replicas,
                ..Default::default()
            }
            .into(),
        );
        t
    }

    fn same(a: Option<&Shared<ServiceSpec>>, b: Option<&Shared<ServiceSpec>>) -> bool {
        matches!((a, b), (Some(a), Some(b)) if Shared::ptr_eq(a, b))
    }

    #[test]
    fn a_service_and_its_tasks_hold_one_spec() -> Result<(), Box<dyn std::error::Error>> {
        let mut store = Store::new(100);
        store.apply_services(2, vec![service("web", "x")])?;
        store.apply_plan(
            3,
            Plan {
                create: vec![task_of("t1", "x", 1, 1), task_of("t2", "x", 1, 1)],
                ..Default::default()
            },
        );
        let spec_of = |store: &Store, id: &str| store.get_task(id).and_then(|t| t.spec.clone());
        let svc_spec = |store: &Store| {
            store
                .get_service("default", "web")
                .and_then(|s| s.spec.clone())
        };
        assert!(same(
            spec_of(&store, "t1").as_ref(),
            svc_spec(&store).as_ref()
        ));
        assert!(same(
            spec_of(&store, "t2").as_ref(),
            svc_spec(&store).as_ref()
        ));

        // A task's own copy stays where no spec of its service is equal.
        store.apply_plan(
            4,
            Plan {
                create: vec![task_of("t3", "y", 1, 7)],
                ..Default::default()
            },
        );
        assert_eq!(
            spec_of(&store, "t3").map(|s| s.image.clone()),
            Some("y".into())
        );
        assert!(!same(
            spec_of(&store, "t3").as_ref(),
            svc_spec(&store).as_ref()
        ));

        // A status change or a label change keeps it shared.
        store.apply_statuses(
            5,
            "",
            vec![TaskStatusUpdate {
                task_id: "t1".into(),
                namespace: String::new(),
                status: Some(status(TaskState::Running)),
            }],
        );
        let mut relabelled = service("web", "x");
        if let Some(m) = relabelled.metadata.as_mut() {
            m.labels.insert("tier".into(), "front".into());
        }
        store.apply_services(6, vec![relabelled])?;
        assert!(same(
            spec_of(&store, "t1").as_ref(),
            svc_spec(&store).as_ref()
        ));

        // After a template change the old tasks share the previous spec.
        store.apply_services(7, vec![service("web", "z")])?;
        let previous = store
            .get_service("default", "web")
            .and_then(|s| s.previous_spec.clone());
        assert!(same(spec_of(&store, "t2").as_ref(), previous.as_ref()));

        // Going back to it takes that copy again.
        store.apply_services(8, vec![service("web", "x")])?;
        assert!(same(
            spec_of(&store, "t2").as_ref(),
            svc_spec(&store).as_ref()
        ));
        store.undo_service(9, "default", "web")?;
        let z = svc_spec(&store);
        store.undo_service(10, "default", "web")?;
        assert!(same(
            spec_of(&store, "t2").as_ref(),
            svc_spec(&store).as_ref()
        ));
        let previous = store
            .get_service("default", "web")
            .and_then(|s| s.previous_spec.clone());
        assert!(same(z.as_ref(), previous.as_ref()));
        Ok(())
    }

    #[test]
    fn a_restored_state_shares_specs_again() -> Result<(), Box<dyn std::error::Error>> {
        let mut web = service("web", "x");
        web.metadata = web.metadata.map(|m| ObjectMeta {
            namespace: "default".into(),
            ..m
        });
        let restored = Restored {
            revision: 9,
            services: [(("default".to_string(), "web".to_string()), web)].into(),
            tasks: vec![
                task_of("now1", "x", 1, 1),
                task_of("now2", "x", 1, 1),
                // Before a scale: the same template at another replica count.
                task_of("old1", "x", 3, 0),
                task_of("old2", "x", 3, 0),
            ],
            ..Default::default()
        };
        let mut store = Store::new(100);
        store.replace(9, restored);
        let spec_of = |id: &str| store.get_task(id).and_then(|t| t.spec.clone());
        let current = store
            .get_service("default", "web")
            .and_then(|s| s.spec.clone());
        assert!(same(spec_of("now1").as_ref(), current.as_ref()));
        assert!(same(spec_of("now2").as_ref(), current.as_ref()));
        assert!(same(spec_of("old1").as_ref(), spec_of("old2").as_ref()));
        assert!(!same(spec_of("old1").as_ref(), current.as_ref()));
        assert_eq!(spec_of("old2").map(|s| s.replicas), Some(3));
        Ok(())
    }

    #[test]
    fn status_reports_only_from_the_owning_node_and_never_over_lost()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut store = Store::new(100);
        store.apply_services(2, vec![service("web", "x")])?;
        store.apply_plan(
            3,
            Plan {
                create: vec![task("t1", "n1"), task("t2", "n1")],
                ..Default::default()
            },
        );
        let report = |id: &str, state| TaskStatusUpdate {
            task_id: id.into(),
            namespace: String::new(),
            status: Some(status(state)),
        };
        assert_eq!(
            store.apply_statuses(4, "n2", vec![report("t1", TaskState::Running)]),
            0
        );
        assert_eq!(
            store.apply_statuses(4, "n1", vec![report("t1", TaskState::Running)]),
            1
        );
        store.apply_plan(
            5,
            Plan {
                update: vec![TaskChange {
                    id: "t2".into(),
                    status: Some(status(TaskState::Lost)),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        assert_eq!(
            store.apply_statuses(6, "n1", vec![report("t2", TaskState::Running)]),
            0
        );
        let state = |id| {
            store
                .get_task(id)
                .and_then(|t| t.status.as_ref())
                .map(|s| s.state())
        };
        assert_eq!(state("t1"), Some(TaskState::Running));
        assert_eq!(state("t2"), Some(TaskState::Lost));
        Ok(())
    }
}
