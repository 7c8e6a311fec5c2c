//! The compact per-task usage summary the agent sends with its status reports (for `tug top`):
//! CPU in millicores averaged since the previous sample, and the memory working set.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use tug_api::v1::TaskUsage;

use super::cadvisor::read_stats;
use super::table::Tracked;
use crate::runtime::cgroups::CgroupDriver;

/// Remembers each task's CPU time at the previous sample.
#[derive(Debug, Default)]
pub struct UsageSampler {
    last: Mutex<HashMap<String, (u64, Instant)>>,
}

/// Millicores used between two readings of a CPU time counter.
pub fn millicores(cpu_ns_before: u64, cpu_ns_now: u64, wall_ns: u128) -> u64 {
    if wall_ns == 0 {
        return 0;
    }
    let used = u128::from(cpu_ns_now.saturating_sub(cpu_ns_before));
    u64::try_from(used * 1000 / wall_ns).unwrap_or(u64::MAX)
}

impl UsageSampler {
    /// The usage of every running container in `entries` (blocking: reads cgroup files). A
    /// task sampled for the first time gets its average since it started.
    pub fn sample(
        &self,
        driver: &CgroupDriver,
        entries: &[Tracked],
        now_secs: f64,
    ) -> Vec<TaskUsage> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashMap::with_capacity(entries.len());
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries.iter().filter(|e| e.running) {
            let Some(stats) = read_stats(driver, &entry.cgroup_path) else {
                continue;
            };
            let task = &entry.labels.task;
            let cpu_millis = match last.get(task) {
                Some((before, at)) => millicores(
                    *before,
                    stats.cpu_usage_ns,
                    now.duration_since(*at).as_nanos(),
                ),
                None => {
                    let lived = (now_secs - entry.started_at).max(0.0);
                    millicores(0, stats.cpu_usage_ns, (lived * 1e9) as u128)
                }
            };
            seen.insert(task.clone(), (stats.cpu_usage_ns, now));
            out.push(TaskUsage {
                task_id: task.clone(),
                namespace: entry.labels.namespace.clone(),
                cpu_millis,
                memory_bytes: stats.memory_working_set,
            });
        }
        *last = seen;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millicores_are_cpu_time_over_wall_time() {
        assert_eq!(millicores(0, 500_000_000, 1_000_000_000), 500);
        assert_eq!(
            millicores(1_000_000_000, 3_000_000_000, 1_000_000_000),
            2000
        );
        assert_eq!(millicores(5, 1, 1_000), 0, "a counter reset reads as idle");
        assert_eq!(millicores(0, 1, 0), 0);
    }
}
