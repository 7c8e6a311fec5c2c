//! The containers the metrics describe: one entry per task the worker supervises on this node,
//! written by its runner when the container starts, exits or is removed, and read (copied out
//! under a short lock) at scrape time. Removing the entry removes the container's series.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// The labels every container series carries (besides `node`), as cAdvisor/kubelet name them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskLabels {
    pub namespace: String,
    pub service: String,
    pub task: String,
    pub image: String,
}

/// What is known about one task's container between scrapes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tracked {
    pub labels: TaskLabels,
    /// The container's cgroup, relative to the hierarchies' roots (`tug/<id>`).
    pub cgroup_path: String,
    /// CFS quota and period in microseconds, when limited.
    pub cpu_quota: Option<(i64, u64)>,
    /// The container's init process (its network namespace is read through it).
    pub pid: i32,
    /// Unix seconds when the container last started.
    pub started_at: f64,
    pub restarts: u32,
    /// OOM kills in the task's earlier containers (a restart makes a new cgroup).
    pub past_oom_events: u64,
    /// False once the container exited: only its counters stay until it is removed.
    pub running: bool,
}

/// Every tracked container of the node, by task id.
#[derive(Debug, Default)]
pub struct ContainerTable {
    entries: Mutex<BTreeMap<String, Tracked>>,
}

impl ContainerTable {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Tracked>> {
        // Every write is a single insert or field update: a poisoned map is still consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The container of `running.labels.task` runs (started, restarted or adopted). OOM kills
    /// counted for earlier containers of the task are kept.
    pub fn running(&self, mut running: Tracked) {
        let mut entries = self.lock();
        if let Some(old) = entries.get(&running.labels.task) {
            running.past_oom_events = old.past_oom_events;
        }
        running.running = true;
        entries.insert(running.labels.task.clone(), running);
    }

    /// The container exited; `oom_events` were counted in its cgroup.
    pub fn exited(&self, task: &str, oom_events: u64) {
        if let Some(entry) = self.lock().get_mut(task)
            && entry.running
        {
            entry.running = false;
            entry.pid = 0;
            entry.past_oom_events = entry.past_oom_events.saturating_add(oom_events);
        }
    }

    /// The task is gone from the node: its series disappear.
    pub fn remove(&self, task: &str) {
        self.lock().remove(task);
    }

    pub fn get(&self, task: &str) -> Option<Tracked> {
        self.lock().get(task).cloned()
    }

    /// A copy of every entry, taken under the lock (scrapes read files without holding it).
    pub fn snapshot(&self) -> Vec<Tracked> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(task: &str) -> Tracked {
        Tracked {
            labels: TaskLabels {
                task: task.into(),
                ..TaskLabels::default()
            },
            pid: 7,
            ..Tracked::default()
        }
    }

    #[test]
    fn oom_events_survive_restarts_and_removal_forgets_the_task() {
        let table = ContainerTable::default();
        table.running(tracked("a"));
        table.exited("a", 2);
        table.exited("a", 5); // a second exit report of the same container counts nothing
        let after_exit = table.snapshot();
        assert_eq!(after_exit[0].past_oom_events, 2);
        assert!(!after_exit[0].running);
        table.running(tracked("a"));
        let restarted = table.snapshot();
        assert_eq!(restarted[0].past_oom_events, 2);
        assert!(restarted[0].running && restarted[0].pid == 7);
        table.remove("a");
        assert!(table.is_empty());
    }
}
