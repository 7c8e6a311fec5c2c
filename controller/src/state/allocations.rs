//! What the tasks placed on each node hold (cpu, memory, host ports), kept up to date as tasks
//! change, so the scheduler and `tug nodes` read it in O(nodes) instead of walking every task.

use std::collections::HashMap;

use tug_api::v1::{Task, TaskState};

use super::tasks::is_terminal;

/// The resources held on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Tasks holding resources.
    pub tasks: u32,
    /// (protocol, host port) -> how many tasks publish it (more than one only transiently).
    pub ports: HashMap<(i32, u32), u32>,
}

pub fn task_state(task: &Task) -> TaskState {
    task.status
        .as_ref()
        .map_or(TaskState::Pending, |s| s.state())
}

/// Whether a task holds resources on its node: placed, and its container not finished.
pub fn holds_resources(task: &Task) -> bool {
    !task.node.is_empty() && !is_terminal(task_state(task))
}

/// The cpu (millicores) and memory (bytes) a task asks for.
pub fn requested(task: &Task) -> (u64, u64) {
    task.spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .map_or((0, 0), |r| (r.cpu_millis, r.memory_bytes))
}

/// The host ports a task publishes.
pub fn host_ports(task: &Task) -> impl Iterator<Item = (i32, u32)> + '_ {
    task.spec
        .iter()
        .flat_map(|s| s.ports.iter())
        .filter(|p| p.host_port != 0)
        .map(|p| (p.protocol, p.host_port))
}

impl Allocation {
    pub(super) fn add(&mut self, task: &Task) {
        let (cpu, memory) = requested(task);
        self.cpu_millis += cpu;
        self.memory_bytes += memory;
        self.tasks += 1;
        for port in host_ports(task) {
            *self.ports.entry(port).or_default() += 1;
        }
    }

    pub(super) fn remove(&mut self, task: &Task) {
        let (cpu, memory) = requested(task);
        self.cpu_millis = self.cpu_millis.saturating_sub(cpu);
        self.memory_bytes = self.memory_bytes.saturating_sub(memory);
        self.tasks = self.tasks.saturating_sub(1);
        for port in host_ports(task) {
            if let Some(n) = self.ports.get_mut(&port) {
                *n -= 1;
                if *n == 0 {
                    self.ports.remove(&port);
                }
            }
        }
    }
}

/// Allocations of every node, updated per task change.
#[derive(Debug, Clone, Default)]
pub(super) struct Allocations(HashMap<String, Allocation>);

impl Allocations {
    pub(super) fn get(&self, node: &str) -> Option<&Allocation> {
        self.0.get(node)
    }

    /// Accounts the change of one task from `old` to `new` (either may be absent).
    pub(super) fn update(&mut self, old: Option<&Task>, new: Option<&Task>) {
        if let Some(old) = old.filter(|t| holds_resources(t))
            && let Some(a) = self.0.get_mut(&old.node)
        {
            a.remove(old);
        }
        if let Some(new) = new.filter(|t| holds_resources(t)) {
            self.0.entry(new.node.clone()).or_default().add(new);
        }
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}
