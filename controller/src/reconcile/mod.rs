//! The reconciler: compares what the operator asked for (services) with what exists (tasks, on
//! nodes) and returns one [`Plan`] that moves the cluster toward it. A pure function of the store
//! and the time (STYLE.md §1.4); only the leader runs it, and commits its plan as one command.
//!
//! One pass, in order:
//! 1. nodes: tasks on a down node are lost (and replaced below); tasks on a drained node are
//!    stopped (and replaced below);
//! 2. services: every slot `1..=replicas` gets a live task (a failed slot after a back-off, a
//!    finished batch slot never again); slots above `replicas` are stopped; tasks of a spec that
//!    changed are replaced as [`rollout`] allows (maxSurge, maxUnavailable, only healthy new tasks
//!    count); tasks of deleted services are stopped;
//! 3. new and pending tasks are placed by the [`scheduler`](crate::scheduler) in one pass, so
//!    they see each other; what fits nowhere stays pending with the reason;
//! 4. finished tasks nobody needs any more are forgotten (the newest one per slot is kept).

mod rollout;
mod slots;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tug_api::shared::Shared;
use tug_api::v1::{
    DesiredState, NodeAvailability, NodeState, RestartPolicy, Service, ServiceSpec, Task,
    TaskHealth, TaskState, TaskStatus,
};

use crate::scheduler::{self, ClusterView, Request};
use crate::state::{Plan, ServiceKey, Store, TaskChange, is_terminal, same_template};

/// Limits of one pass.
#[derive(Debug, Clone, Copy)]
pub struct ReconcileConfig {
    /// Changes per plan: one Raft entry stays a reasonable size; the rest follows in the next
    /// pass, which the leader starts at once.
    pub max_changes: usize,
    /// Finished tasks kept per slot, for `tug describe` and `tug get tasks`.
    pub history_per_slot: usize,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            max_changes: 20_000,
            history_per_slot: 1,
        }
    }
}

/// What a pass decided, and where it stopped early at [`ReconcileConfig::max_changes`].
#[derive(Debug, Default)]
pub struct Outcome {
    pub plan: Plan,
    /// The services of the scope the pass did not reach (in order), because its plan was
    /// full; empty when it went through the whole scope. The next pass takes these up.
    pub rest: Vec<ServiceKey>,
    /// The earliest wall-clock time (ms) at which a waiting slot (failure back-off) may be
    /// filled: the leader runs a pass then even if nothing changes.
    pub wake_at_ms: Option<u64>,
}

/// Makes task ids: `(service, slot) -> id`. Ids must be unique; the leader uses random suffixes.
pub type IdSource<'a> = dyn FnMut(&str, u32) -> String + 'a;

/// Which services a pass looks at.
#[derive(Debug, Clone)]
pub enum Scope {
    All,
    /// Only these (the ones whose objects changed since the last pass), plus any whose tasks
    /// the node step touches.
    Services(BTreeSet<ServiceKey>),
}

/// One pass over the whole store.
pub fn reconcile(
    store: &Store,
    now_ms: u64,
    cfg: &ReconcileConfig,
    ids: &mut IdSource<'_>,
) -> Outcome {
    reconcile_scope(store, now_ms, cfg, ids, &Scope::All)
}

/// Every service a full pass looks at: each stored service, and each service that is gone but
/// still has tasks (the pass removes them). Sorted, without repeats.
pub fn all_keys(store: &Store) -> Vec<ServiceKey> {
    SweepTargets::take(store).into_keys()
}

/// The services a sweep looks at ([`all_keys`]), taken in two steps so that a large store's
/// read lock is held only for the cheap one: [`SweepTargets::take`] copies a pointer per
/// service and the key of each gone service that still has tasks; [`SweepTargets::into_keys`]
/// builds and sorts the keys after the lock is released. (Copying every key under the lock
/// held it for about 0.35 s at 400,000 services, and the leader's Raft loop could not apply
/// meanwhile.)
#[derive(Debug)]
pub struct SweepTargets {
    services: Vec<Arc<Service>>,
    gone: Vec<ServiceKey>,
}

impl SweepTargets {
    pub fn take(store: &Store) -> Self {
        SweepTargets {
            services: store.shared_services(),
            gone: store
                .services_with_tasks()
                .filter(|(namespace, name)| store.get_service(namespace, name).is_none())
                .cloned()
                .collect(),
        }
    }

    pub fn into_keys(self) -> Vec<ServiceKey> {
        let mut keys: Vec<ServiceKey> = self
            .services
            .iter()
            .map(|svc| crate::state::service_key(svc))
            .chain(self.gone)
            .collect();
        // (The two parts are disjoint, and each is free of repeats.)
        keys.sort_unstable();
        keys
    }
}

/// One pass over the services of `scope`.
pub fn reconcile_scope(
    store: &Store,
    now_ms: u64,
    cfg: &ReconcileConfig,
    ids: &mut IdSource<'_>,
    scope: &Scope,
) -> Outcome {
    let mut pass = Pass {
        store,
        now_ms,
        cfg,
        view: ClusterView::from_store(store),
        changes: BTreeMap::new(),
        creates: Vec::new(),
        removes: BTreeSet::new(),
        wake_at_ms: None,
    };
    pass.nodes();
    let mut keys: BTreeSet<ServiceKey> = match scope {
        Scope::All => all_keys(store).into_iter().collect(),
        Scope::Services(keys) => keys.clone(),
    };
    for id in pass.changes.keys() {
        if let Some(task) = store.get_task(id) {
            keys.insert((task.namespace.clone(), task.service.clone()));
        }
    }
    let mut keys = keys.into_iter();
    let mut rest = Vec::new();
    for key in keys.by_ref() {
        if pass.size() >= cfg.max_changes {
            rest.push(key);
            break;
        }
        match store.get_service(&key.0, &key.1) {
            Some(service) => pass.service(&key, service, ids),
            None => pass.orphans(&key),
        }
    }
    rest.extend(keys);
    Outcome {
        wake_at_ms: pass.wake_at_ms,
        plan: pass.into_plan(),
        rest,
    }
}

impl Outcome {
    /// Whether the pass stopped before the end of its scope.
    pub fn truncated(&self) -> bool {
        !self.rest.is_empty()
    }
}

/// Back-off before a failed slot gets its next task: 1 s, doubling per failure in a row, at most
/// a minute.
pub fn failure_backoff_ms(attempt: u32) -> u64 {
    1000u64.saturating_mul(1u64 << attempt.min(6)).min(60_000)
}

struct Pass<'a> {
    store: &'a Store,
    now_ms: u64,
    cfg: &'a ReconcileConfig,
    view: ClusterView,
    /// Changes to existing tasks, merged per task id.
    changes: BTreeMap<String, TaskChange>,
    creates: Vec<Task>,
    removes: BTreeSet<String>,
    wake_at_ms: Option<u64>,
}

/// A task as this pass sees it: its stored state with the pass's changes on top.
#[derive(Debug, Clone, Copy)]
struct Effective {
    desired: DesiredState,
    state: TaskState,
    health: TaskHealth,
}

impl Effective {
    fn live(&self) -> bool {
        self.desired == DesiredState::Running && !is_terminal(self.state)
    }

    /// Running and, if it has a health check, healthy: counts toward availability.
    fn available(&self) -> bool {
        self.live()
            && self.state == TaskState::Running
            && matches!(
                self.health,
                TaskHealth::Unspecified | TaskHealth::None | TaskHealth::Healthy
            )
    }
}

impl<'a> Pass<'a> {
    fn size(&self) -> usize {
        self.changes.len() + self.creates.len() + self.removes.len()
    }

    fn effective(&self, task: &Task) -> Effective {
        let change = self.changes.get(&task.id);
        let desired = change
            .map(|c| c.desired_state())
            .filter(|d| *d != DesiredState::Unspecified)
            .unwrap_or(task.desired_state());
        let status = change
            .and_then(|c| c.status.as_ref())
            .or(task.status.as_ref());
        Effective {
            desired,
            state: status.map_or(TaskState::Pending, |s| s.state()),
            health: status.map_or(TaskHealth::Unspecified, |s| s.health()),
        }
    }

    fn change(&mut self, id: &str) -> &mut TaskChange {
        self.changes
            .entry(id.to_string())
            .or_insert_with(|| TaskChange {
                id: id.to_string(),
                ..Default::default()
            })
    }

    fn stop(&mut self, task: &Task) {
        if task.desired_state() != DesiredState::Shutdown {
            self.change(&task.id).desired_state = DesiredState::Shutdown.into();
        }
        // A task never placed has no container to stop: it is done at once.
        if task.node.is_empty() && !is_terminal(self.effective(task).state) {
            let status = TaskStatus {
                state: TaskState::Stopped.into(),
                message: "stopped before it was placed".into(),
                updated_ms: self.now_ms,
                ..Default::default()
            };
            self.change(&task.id).status = Some(status);
        }
    }

    /// Step 1: tasks on down nodes are lost; tasks on drained nodes are stopped.
    fn nodes(&mut self) {
        for node in self.store.nodes() {
            let name = node.description.as_ref().map_or("", |d| d.name.as_str());
            let down = node.state() == NodeState::Down;
            let drained = node.availability() == NodeAvailability::Drain;
            if !down && !drained {
                continue;
            }
            for task in self.store.tasks_of_node(name) {
                let eff = self.effective(task);
                if down && !is_terminal(eff.state) {
                    let status = TaskStatus {
                        state: TaskState::Lost.into(),
                        message: format!("node {name} is down"),
                        updated_ms: self.now_ms,
                        ..task.status.clone().unwrap_or_default()
                    };
                    let change = self.change(&task.id);
                    change.status = Some(status);
                    change.desired_state = DesiredState::Shutdown.into();
                    self.view.release(task);
                } else if drained && eff.desired == DesiredState::Running {
                    self.stop(task);
                }
            }
        }
    }

    /// Tasks whose service was deleted: stopped, and forgotten once finished.
    fn orphans(&mut self, key: &ServiceKey) {
        for task in self.store.tasks_of_service(&key.0, &key.1) {
            self.stop(task);
            let eff = self.effective(task);
            if is_terminal(eff.state) {
                self.removes.insert(task.id.clone());
            }
        }
    }

    fn service(&mut self, key: &ServiceKey, service: &Service, ids: &mut IdSource<'_>) {
        let Some(spec) = service.spec.as_ref() else {
            return;
        };
        let generation = service.metadata.as_ref().map_or(0, |m| m.generation);
        let tasks = self.store.tasks_of_service(&key.0, &key.1);
        let slots = slots::by_slot(&tasks);
        let mut new_slots: Vec<(u32, u32)> = Vec::new(); // (slot, attempt)
        let mut pending: Vec<&Task> = Vec::new();

        // Slots above the replica count go away.
        for (_, in_slot) in slots.range(spec.replicas.saturating_add(1)..) {
            for task in in_slot {
                if self.effective(task).live() {
                    self.stop(task);
                }
            }
        }
        // Every slot gets a live task.
        let is_current = |t: &Task| {
            t.spec_generation == generation || same_template(t.spec.as_deref(), Some(spec))
        };
        let mut outdated = Vec::new();
        for slot in 1..=spec.replicas {
            let in_slot: &[&Task] = slots.get(&slot).map_or(&[], Vec::as_slice);
            let live: Vec<&Task> = in_slot
                .iter()
                .copied()
                .filter(|t| self.effective(t).live())
                .collect();
            let (current, old): (Vec<&Task>, Vec<&Task>) =
                live.iter().copied().partition(|t| is_current(t));
            // More than one current task in a slot (never planned, but harmless to mend): keep
            // the newest.
            for extra in current.iter().skip(1) {
                self.stop(extra);
            }
            if let Some(task) = current.first().filter(|t| t.node.is_empty()) {
                pending.push(task);
            }
            if !old.is_empty() {
                outdated.push(rollout::Slot {
                    slot,
                    old,
                    new: current.first().copied(),
                });
                continue;
            }
            if !live.is_empty() {
                continue;
            }
            match slots::refill(in_slot, spec, self.now_ms) {
                slots::Refill::Done => {}
                slots::Refill::Now { attempt } => {
                    for t in in_slot {
                        if self.effective(t).desired == DesiredState::Running {
                            self.stop(t);
                        }
                    }
                    new_slots.push((slot, attempt));
                }
                slots::Refill::At(ms) => {
                    self.wake_at_ms = Some(self.wake_at_ms.map_or(ms, |w| w.min(ms)));
                }
            }
        }
        let update = spec.update.unwrap_or_default();
        let available = |pass: &Self, slot: u32| {
            slots
                .get(&slot)
                .is_some_and(|ts| ts.iter().any(|t| pass.effective(t).available()))
        };
        let available_slots = (1..=spec.replicas).filter(|s| available(self, *s)).count();
        let steps = rollout::steps(
            &outdated,
            &update,
            spec.replicas as usize,
            available_slots,
            |t| self.effective(t).available(),
        );
        for step in steps {
            match step {
                rollout::Step::Stop(task) => self.stop(task),
                rollout::Step::Start(slot) => new_slots.push((slot, 0)),
            }
        }
        self.place(key, service, spec, generation, pending, new_slots, ids);
        self.collect_garbage(&slots, spec.replicas);
    }

    #[allow(clippy::too_many_arguments)]
    fn place(
        &mut self,
        key: &ServiceKey,
        service: &Service,
        // Shared with the tasks made from it.
        spec: &Shared<ServiceSpec>,
        generation: u64,
        pending: Vec<&Task>,
        new_slots: Vec<(u32, u32)>,
        ids: &mut IdSource<'_>,
    ) {
        let wanted = pending.len() + new_slots.len();
        if wanted == 0 {
            return;
        }
        self.view.load_service(self.store, key);
        let placements = match Request::from_spec(key, spec) {
            Ok(req) => scheduler::place(&mut self.view, &req, wanted),
            Err(err) => scheduler::Placements {
                nodes: Vec::new(),
                reason: err.to_string(),
            },
        };
        let mut nodes = placements.nodes.into_iter();
        let pending_status = |now_ms| TaskStatus {
            state: TaskState::Pending.into(),
            message: placements.reason.clone(),
            updated_ms: now_ms,
            ..Default::default()
        };
        for task in pending {
            match nodes.next() {
                Some(node) => {
                    let now_ms = self.now_ms;
                    let change = self.change(&task.id);
                    change.node = node;
                    change.status = Some(assigned(now_ms));
                }
                None => {
                    let same = task
                        .status
                        .as_ref()
                        .is_some_and(|s| s.message == placements.reason);
                    if !same {
                        self.change(&task.id).status = Some(pending_status(self.now_ms));
                    }
                }
            }
        }
        let name = service.metadata.as_ref().map_or("", |m| m.name.as_str());
        for (slot, attempt) in new_slots {
            let node = nodes.next();
            let status = match node {
                Some(_) => assigned(self.now_ms),
                None => pending_status(self.now_ms),
            };
            self.creates.push(Task {
                id: ids(name, slot),
                namespace: key.0.clone(),
                service: key.1.clone(),
                slot,
                spec_generation: generation,
                spec: Some(spec.clone()),
                node: node.unwrap_or_default(),
                desired_state: DesiredState::Running.into(),
                status: Some(status),
                created_ms: self.now_ms,
                attempt,
                ..Default::default()
            });
        }
    }

    /// Step 4: finished, unwanted tasks beyond the newest `history_per_slot` of a slot (all of
    /// them above the replica count) are forgotten.
    fn collect_garbage(&mut self, slots: &BTreeMap<u32, Vec<&Task>>, replicas: u32) {
        for (slot, in_slot) in slots {
            let keep = if *slot <= replicas {
                self.cfg.history_per_slot
            } else {
                0
            };
            let mut kept = 0;
            // Newest first.
            for task in in_slot {
                let eff = self.effective(task);
                if eff.desired != DesiredState::Shutdown || !is_terminal(eff.state) {
                    continue;
                }
                if kept < keep {
                    kept += 1;
                } else {
                    self.removes.insert(task.id.clone());
                    self.changes.remove(&task.id);
                }
            }
        }
    }

    fn into_plan(self) -> Plan {
        Plan {
            create: self.creates,
            update: self.changes.into_values().collect(),
            remove: self.removes.into_iter().collect(),
        }
    }
}

fn assigned(now_ms: u64) -> TaskStatus {
    TaskStatus {
        state: TaskState::Assigned.into(),
        updated_ms: now_ms,
        ..Default::default()
    }
}

/// Whether a finished task's restart policy means its slot is done for good.
pub(crate) fn finished_for_good(task: &Task, policy: RestartPolicy) -> bool {
    let status = task.status.as_ref();
    let state = status.map_or(TaskState::Pending, |s| s.state());
    let code = status.map_or(0, |s| s.exit_code);
    match (state, policy) {
        (TaskState::Exited, RestartPolicy::Never) => true,
        (TaskState::Exited, RestartPolicy::OnFailure) => code == 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
