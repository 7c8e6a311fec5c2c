use std::collections::HashMap;

use tug_api::v1::{
    NodeDescription, ObjectMeta, Resources, ServiceSpec, TaskStatusUpdate, UpdatePolicy,
    update_policy::Order,
};

use super::*;
use crate::state::Store;

/// A store driven the way the leader and the agents drive it, without Raft or containers.
struct Sim {
    store: Store,
    index: u64,
    now_ms: u64,
    next_id: u32,
}

impl Sim {
    fn new(nodes: &[(&str, &str)]) -> Sim {
        let mut sim = Sim {
            store: Store::new(10_000),
            index: 1,
            now_ms: 1_000_000,
            next_id: 0,
        };
        for (name, zone) in nodes {
            sim.add_node(name, zone, 4000, 4 << 30);
        }
        sim
    }

    fn next(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn add_node(&mut self, name: &str, zone: &str, cpu: u64, memory: u64) {
        let index = self.next();
        let desc = NodeDescription {
            name: name.into(),
            labels: HashMap::from([("zone".to_string(), zone.to_string())]),
            capacity: Some(Resources {
                cpu_millis: cpu,
                memory_bytes: memory,
            }),
            ..Default::default()
        };
        let _ = self.store.register_node(index, desc, self.now_ms, None);
    }

    fn apply(&mut self, name: &str, spec: ServiceSpec) {
        let index = self.next();
        let svc = Service {
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            spec: Some(spec.into()),
            previous_spec: None,
        };
        let _ = self.store.apply_services(index, vec![svc]);
    }

    /// One reconcile pass, committed; returns the plan.
    fn reconcile(&mut self) -> Plan {
        let mut counter = self.next_id;
        let outcome = reconcile(
            &self.store,
            self.now_ms,
            &ReconcileConfig::default(),
            &mut |svc: &str, slot: u32| {
                counter += 1;
                format!("{svc}.{slot}.{counter:04}")
            },
        );
        self.next_id = counter;
        let index = self.next();
        self.store.apply_plan(index, outcome.plan.clone());
        outcome.plan
    }

    /// Every agent on a ready node does what its tasks ask: runs the wanted ones (healthy), stops
    /// the others.
    fn agents_converge(&mut self) -> bool {
        let mut per_node: HashMap<String, Vec<TaskStatusUpdate>> = HashMap::new();
        for task in self.store.tasks() {
            let ready = self
                .store
                .get_node(&task.node)
                .is_some_and(|n| n.state() == NodeState::Ready);
            if !ready {
                continue;
            }
            let state = crate::views::task_state(task);
            let next = match task.desired_state() {
                DesiredState::Running if !is_terminal(state) => TaskState::Running,
                DesiredState::Shutdown if !is_terminal(state) => TaskState::Stopped,
                _ => continue,
            };
            if next == state {
                continue;
            }
            per_node
                .entry(task.node.clone())
                .or_default()
                .push(TaskStatusUpdate {
                    task_id: task.id.clone(),
                    namespace: task.namespace.clone(),
                    status: Some(TaskStatus {
                        state: next.into(),
                        health: TaskHealth::Healthy.into(),
                        updated_ms: self.now_ms,
                        ..Default::default()
                    }),
                });
        }
        let mut nodes: Vec<_> = per_node.into_iter().collect();
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        let changed = !nodes.is_empty();
        for (node, updates) in nodes {
            let index = self.next();
            self.store.apply_statuses(index, &node, updates);
        }
        changed
    }

    /// Reconcile and converge until nothing changes.
    fn settle(&mut self) {
        for _ in 0..50 {
            let plan = self.reconcile();
            let converged = !self.agents_converge();
            if plan.is_empty() && converged {
                return;
            }
        }
        panic!("the cluster did not settle");
    }

    fn running_per_node(&self, service: &str) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for t in self.store.tasks_of_service("default", service) {
            if crate::views::task_state(t) == TaskState::Running
                && t.desired_state() == DesiredState::Running
            {
                *out.entry(t.node.clone()).or_default() += 1;
            }
        }
        out
    }

    fn running(&self, service: &str) -> usize {
        self.running_per_node(service).values().sum()
    }

    fn set_node_down(&mut self, name: &str) {
        let index = self.next();
        let _ = self
            .store
            .set_node_state(index, name, NodeState::Down, "gone".into(), self.now_ms);
    }
}

fn spec(image: &str, replicas: u32) -> ServiceSpec {
    ServiceSpec {
        image: image.into(),
        replicas,
        resources: Some(Resources {
            cpu_millis: 100,
            memory_bytes: 64 << 20,
        }),
        ..Default::default()
    }
}

fn three() -> Sim {
    Sim::new(&[("n1", "a"), ("n2", "b"), ("n3", "c")])
}

#[test]
fn six_replicas_spread_two_per_node() {
    let mut sim = three();
    sim.apply("web", spec("img:1", 6));
    sim.settle();
    let per = sim.running_per_node("web");
    assert_eq!((per["n1"], per["n2"], per["n3"]), (2, 2, 2));
    assert_eq!(sim.store.task_count(), 6);
}

#[test]
fn scale_up_and_down_and_forget_stopped_tasks() {
    let mut sim = three();
    sim.apply("web", spec("img:1", 6));
    sim.settle();
    sim.apply("web", spec("img:1", 9));
    sim.settle();
    assert_eq!(
        sim.running_per_node("web")
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![3, 3, 3]
    );
    sim.apply("web", spec("img:1", 3));
    sim.settle();
    assert_eq!(sim.running("web"), 3);
    let slots: BTreeSet<u32> = sim
        .store
        .tasks_of_service("default", "web")
        .iter()
        .map(|t| t.slot)
        .collect();
    assert_eq!(
        slots,
        BTreeSet::from([1, 2, 3]),
        "stopped slots are forgotten"
    );
    assert_eq!(sim.running_per_node("web").len(), 3, "still one per node");
}

#[test]
fn a_down_node_loses_its_tasks_to_the_others() {
    let mut sim = three();
    sim.apply("web", spec("img:1", 6));
    sim.settle();
    sim.set_node_down("n2");
    sim.settle();
    let per = sim.running_per_node("web");
    assert_eq!(per.get("n2"), None);
    assert_eq!((per["n1"], per["n3"]), (3, 3));
    let lost = sim
        .store
        .tasks_of_node("n2")
        .iter()
        .filter(|t| crate::views::task_state(t) == TaskState::Lost)
        .count();
    assert_eq!(lost, 2, "the lost tasks stay visible as history");
}

#[test]
fn a_drained_node_is_emptied_and_gets_nothing_new() {
    let mut sim = three();
    sim.apply("web", spec("img:1", 6));
    sim.settle();
    let index = sim.next();
    let _ = sim
        .store
        .set_node_availability(index, "n1", NodeAvailability::Drain);
    sim.settle();
    let per = sim.running_per_node("web");
    assert_eq!(per.get("n1"), None);
    assert_eq!((per["n2"], per["n3"]), (3, 3));
}

#[test]
fn what_fits_nowhere_stays_pending_with_the_reason() {
    let mut sim = three();
    let mut big = spec("img:1", 1);
    big.resources = Some(Resources {
        cpu_millis: 100,
        memory_bytes: 64 << 30,
    });
    sim.apply("huge", big);
    let index = sim.next();
    let _ = sim
        .store
        .set_node_availability(index, "n3", NodeAvailability::Drain);
    sim.settle();
    let tasks = sim.store.tasks_of_service("default", "huge");
    assert_eq!(tasks.len(), 1);
    let status = tasks[0].status.clone().unwrap_or_default();
    assert_eq!(status.state(), TaskState::Pending);
    assert_eq!(
        status.message,
        "0/3 nodes available: 1 drained, 2 insufficient memory"
    );
    // A node that fits arrives: the same task is placed there.
    let id = tasks[0].id.clone();
    sim.add_node("big", "d", 4000, 128 << 30);
    sim.settle();
    let task = sim.store.get_task(&id).cloned().unwrap_or_default();
    assert_eq!(task.node, "big");
    assert_eq!(crate::views::task_state(&task), TaskState::Running);
}

/// Runs a rolling update step by step and checks availability at every step.
fn roll(update: UpdatePolicy) -> Vec<usize> {
    let mut sim = three();
    let mut s = spec("img:1", 6);
    s.update = Some(update);
    sim.apply("web", s.clone());
    sim.settle();
    s.image = "img:2".into();
    sim.apply("web", s);
    let mut samples = Vec::new();
    for _ in 0..60 {
        let plan = sim.reconcile();
        samples.push(sim.running("web"));
        sim.agents_converge();
        samples.push(sim.running("web"));
        if plan.is_empty() {
            break;
        }
    }
    let tasks = sim.store.tasks_of_service("default", "web");
    let live_new = tasks
        .iter()
        .filter(|t| t.desired_state() == DesiredState::Running)
        .filter(|t| t.spec.as_deref().is_some_and(|s| s.image == "img:2"))
        .count();
    assert_eq!(live_new, 6, "every replica runs the new image");
    assert_eq!(sim.running("web"), 6);
    samples
}

#[test]
fn rolling_update_start_first_never_drops_below_replicas() {
    let samples = roll(UpdatePolicy {
        max_surge: 1,
        max_unavailable: 0,
        order: Order::StartFirst.into(),
    });
    assert!(samples.iter().all(|n| *n >= 6), "{samples:?}");
    assert!(samples.iter().all(|n| *n <= 7), "{samples:?}");
}

#[test]
fn rolling_update_stop_first_keeps_replicas_minus_max_unavailable() {
    let samples = roll(UpdatePolicy {
        max_surge: 0,
        max_unavailable: 2,
        order: Order::StopFirst.into(),
    });
    assert!(samples.iter().all(|n| *n >= 4), "{samples:?}");
    assert!(samples.contains(&4), "it does use its budget: {samples:?}");
}

#[test]
fn a_failed_slot_is_refilled_after_a_back_off() {
    let mut sim = three();
    sim.apply("web", spec("img:1", 1));
    sim.settle();
    let task = sim.store.tasks_of_service("default", "web")[0].clone();
    let index = sim.next();
    sim.store.apply_statuses(
        index,
        &task.node,
        vec![TaskStatusUpdate {
            task_id: task.id.clone(),
            namespace: task.namespace.clone(),
            status: Some(TaskStatus {
                state: TaskState::Failed.into(),
                message: "pull failed".into(),
                updated_ms: sim.now_ms,
                ..Default::default()
            }),
        }],
    );
    let outcome = reconcile(
        &sim.store,
        sim.now_ms,
        &ReconcileConfig::default(),
        &mut |_: &str, _: u32| "x".to_string(),
    );
    assert!(outcome.plan.create.is_empty(), "not before the back-off");
    assert_eq!(outcome.wake_at_ms, Some(sim.now_ms + 1000));
    sim.now_ms += 1000;
    let plan = sim.reconcile();
    assert_eq!(plan.create.len(), 1);
    assert_eq!(plan.create[0].attempt, 1);
}

#[test]
fn a_finished_batch_slot_is_not_refilled() {
    let mut sim = three();
    let mut s = spec("img:1", 1);
    s.restart_policy = RestartPolicy::OnFailure.into();
    sim.apply("job", s);
    sim.settle();
    let task = sim.store.tasks_of_service("default", "job")[0].clone();
    let index = sim.next();
    sim.store.apply_statuses(
        index,
        &task.node,
        vec![TaskStatusUpdate {
            task_id: task.id.clone(),
            namespace: task.namespace.clone(),
            status: Some(TaskStatus {
                state: TaskState::Exited.into(),
                exit_code: 0,
                updated_ms: sim.now_ms,
                ..Default::default()
            }),
        }],
    );
    let plan = sim.reconcile();
    assert!(plan.create.is_empty(), "{plan:?}");
}

#[test]
fn deleting_a_service_stops_then_forgets_its_tasks() {
    let mut sim = three();
    sim.apply("web", spec("img:1", 3));
    sim.settle();
    let index = sim.next();
    sim.store.delete_service(index, "default", "web");
    sim.reconcile();
    assert!(
        sim.store
            .tasks()
            .all(|t| t.desired_state() == DesiredState::Shutdown)
    );
    sim.settle();
    let left: Vec<_> = sim
        .store
        .tasks()
        .map(|t| (t.id.clone(), t.status.clone()))
        .collect();
    assert_eq!(sim.store.task_count(), 0, "{left:?}");
}

#[test]
fn a_full_plan_names_the_services_it_did_not_reach() {
    let mut sim = three();
    for name in ["a", "b", "c", "d"] {
        sim.apply(name, spec("busybox", 3));
    }
    let cfg = ReconcileConfig {
        max_changes: 4,
        ..ReconcileConfig::default()
    };
    let mut n = 0;
    let mut ids = |svc: &str, slot: u32| {
        n += 1;
        format!("{svc}.{slot}.{n:04}")
    };
    let key = |name: &str| ("default".to_string(), name.to_string());

    // "a" (3 tasks) leaves room, "b" fills the plan past 4: "c" and "d" are not reached.
    let first = reconcile_scope(&sim.store, sim.now_ms, &cfg, &mut ids, &Scope::All);
    assert_eq!(first.plan.create.len(), 6);
    assert!(first.truncated());
    assert_eq!(first.rest, vec![key("c"), key("d")]);
    let index = sim.next();
    sim.store.apply_plan(index, first.plan);

    // The next pass over just those finishes the job.
    let scope = Scope::Services(first.rest.into_iter().collect());
    let second = reconcile_scope(&sim.store, sim.now_ms, &cfg, &mut ids, &scope);
    let mut services: Vec<_> = second
        .plan
        .create
        .iter()
        .map(|t| t.service.clone())
        .collect();
    services.dedup();
    assert_eq!(services, ["c", "d"]);
    assert!(!second.truncated());
}

#[test]
fn a_sweep_looks_at_every_service_and_at_gone_ones_that_still_have_tasks() {
    let mut sim = three();
    sim.apply("web", spec("img:1", 2));
    sim.apply("api", spec("img:1", 1));
    sim.apply("idle", spec("img:1", 0));
    sim.settle();
    let index = sim.next();
    sim.store.delete_service(index, "default", "api");
    let key = |name: &str| ("default".to_string(), name.to_string());

    // "api" is gone, but its task is still there until a pass stops and forgets it.
    assert_eq!(sim.store.tasks_of_service("default", "api").len(), 1);
    let keys = super::SweepTargets::take(&sim.store).into_keys();
    assert_eq!(keys, vec![key("api"), key("idle"), key("web")]);
    assert_eq!(super::all_keys(&sim.store), keys);

    sim.settle();
    let keys = super::SweepTargets::take(&sim.store).into_keys();
    assert_eq!(keys, vec![key("idle"), key("web")]);
}
