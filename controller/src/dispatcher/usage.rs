//! The agents' usage summaries (`tug top`), in the leader's memory only: each report that
//! carries usage replaces what was known of its node. Never a Raft write: usage changes every
//! few seconds on every node, and a new leader learns it again within one report period.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tug_api::v1::TaskUsage;

/// One node's last report: when it arrived (wall-clock ms) and its tasks' usage.
#[derive(Debug, Clone, Default)]
struct NodeUsage {
    reported_ms: u64,
    tasks: Vec<TaskUsage>,
}

#[derive(Debug, Clone, Default)]
pub struct UsageBoard {
    inner: Arc<Mutex<HashMap<String, NodeUsage>>>,
}

/// One task's usage as last reported, with its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub node: String,
    pub reported_ms: u64,
    pub usage: TaskUsage,
}

impl UsageBoard {
    pub fn record(&self, node: &str, tasks: Vec<TaskUsage>, now_ms: u64) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                node.to_string(),
                NodeUsage {
                    reported_ms: now_ms,
                    tasks,
                },
            );
    }

    /// Every task's usage, from reports newer than `since_ms`.
    pub fn all(&self, since_ms: u64) -> Vec<Reported> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<Reported> = inner
            .iter()
            .filter(|(_, n)| n.reported_ms >= since_ms)
            .flat_map(|(node, n)| {
                n.tasks.iter().map(|u| Reported {
                    node: node.clone(),
                    reported_ms: n.reported_ms,
                    usage: u.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.usage.task_id.cmp(&b.usage.task_id));
        out
    }

    pub fn clear(&self) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(task: &str, cpu: u64) -> TaskUsage {
        TaskUsage {
            task_id: task.into(),
            namespace: "default".into(),
            cpu_millis: cpu,
            memory_bytes: 1,
        }
    }

    #[test]
    fn a_report_replaces_its_nodes_usage_and_old_reports_are_left_out() {
        let board = UsageBoard::default();
        board.record("n1", vec![usage("a", 10), usage("b", 20)], 1000);
        board.record("n2", vec![usage("c", 30)], 500);
        board.record("n1", vec![usage("a", 15)], 2000);
        let all = board.all(0);
        assert_eq!(
            all.iter()
                .map(|r| (r.usage.task_id.as_str(), r.usage.cpu_millis))
                .collect::<Vec<_>>(),
            [("a", 15), ("c", 30)]
        );
        assert_eq!(board.all(1000).len(), 1, "n2's report is too old");
        board.clear();
        assert!(board.all(0).is_empty());
    }
}
