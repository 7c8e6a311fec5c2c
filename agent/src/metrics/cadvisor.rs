//! The per-container series, read at scrape time from each container's cgroup (and its
//! network namespace), under the names and labels cAdvisor and the kubelet use, so existing
//! dashboards and alerts work: `container_cpu_usage_seconds_total`,
//! `container_memory_working_set_bytes` (usage minus inactive file cache, on v1 and v2), ...

use std::collections::BTreeMap;
use std::path::Path;

use tug_api::metrics_http::Family;

use super::netdev;
use super::table::Tracked;
use crate::runtime::cgroups::{Cgroup, CgroupDriver, Stats};

/// Every family this module writes: name, help, whether it is a counter.
const FAMILIES: &[(&str, &str, bool)] = &[
    (
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed in seconds.",
        true,
    ),
    (
        "container_cpu_user_seconds_total",
        "Cumulative user cpu time consumed in seconds.",
        true,
    ),
    (
        "container_cpu_system_seconds_total",
        "Cumulative system cpu time consumed in seconds.",
        true,
    ),
    (
        "container_cpu_cfs_throttled_periods_total",
        "Number of throttled period intervals.",
        true,
    ),
    (
        "container_cpu_cfs_throttled_seconds_total",
        "Total time duration the container has been throttled.",
        true,
    ),
    (
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed.",
        false,
    ),
    (
        "container_memory_working_set_bytes",
        "Current working set in bytes (usage minus inactive file cache).",
        false,
    ),
    ("container_memory_rss", "Size of RSS in bytes.", false),
    (
        "container_memory_cache",
        "Number of bytes of page cache memory.",
        false,
    ),
    (
        "container_memory_max_usage_bytes",
        "Maximum memory usage recorded in bytes.",
        false,
    ),
    (
        "container_spec_memory_limit_bytes",
        "Memory limit for the container (0: unlimited).",
        false,
    ),
    (
        "container_spec_cpu_quota",
        "CPU quota of the container (microseconds per period).",
        false,
    ),
    (
        "container_spec_cpu_period",
        "CPU period of the container (microseconds).",
        false,
    ),
    (
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received.",
        true,
    ),
    (
        "container_network_receive_packets_total",
        "Cumulative count of packets received.",
        true,
    ),
    (
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving.",
        true,
    ),
    (
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving.",
        true,
    ),
    (
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted.",
        true,
    ),
    (
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted.",
        true,
    ),
    (
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting.",
        true,
    ),
    (
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting.",
        true,
    ),
    (
        "container_processes",
        "Number of processes (tasks) running inside the container.",
        false,
    ),
    (
        "container_spec_pids_limit",
        "Most tasks the container may run (0: unlimited).",
        false,
    ),
    (
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds.",
        false,
    ),
    (
        "container_last_seen",
        "Last time a container was seen by the exporter.",
        false,
    ),
    (
        "container_oom_events_total",
        "Count of out of memory events observed for the container.",
        true,
    ),
    (
        "tug_agent_task_restarts_total",
        "Restarts of the task's container on this node.",
        true,
    ),
];

/// The families of one scrape, created on first use.
#[derive(Debug, Default)]
struct Families(BTreeMap<&'static str, Family>);

impl Families {
    fn add(&mut self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        let family = self.0.entry(name).or_insert_with(|| {
            let (help, counter) = FAMILIES
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or(("", false), |(_, h, c)| (*h, *c));
            if counter {
                Family::counter(name, help)
            } else {
                Family::gauge(name, help)
            }
        });
        family.add(labels, value);
    }
}

/// What a scrape needs besides the table.
#[derive(Debug)]
pub struct Scrape<'a> {
    pub node: &'a str,
    /// `None` when the host has no usable cgroups (then only the counters are reported).
    pub driver: Option<&'a CgroupDriver>,
    /// The agent's own network namespace (containers sharing it report no network series).
    pub host_netns: Option<&'a Path>,
    /// Unix seconds of this scrape.
    pub now: f64,
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The series of every tracked container: cgroup and network values for running ones, the
/// counters that outlive a container (OOM events, restarts) for all.
pub fn collect(scrape: &Scrape<'_>, entries: &[Tracked]) -> Vec<Family> {
    let mut out = Families::default();
    for entry in entries {
        let l = &entry.labels;
        let id = format!("/{}", entry.cgroup_path.trim_start_matches('/'));
        let labels = [
            ("id", id.as_str()),
            ("image", l.image.as_str()),
            ("name", l.task.as_str()),
            ("namespace", l.namespace.as_str()),
            ("node", scrape.node),
            ("service", l.service.as_str()),
            ("task", l.task.as_str()),
        ];
        let stats = match (entry.running, scrape.driver) {
            (true, Some(driver)) => read_stats(driver, &entry.cgroup_path),
            _ => None,
        };
        let current_ooms = stats.as_ref().map_or(0, |s| s.oom_kills);
        out.add(
            "container_oom_events_total",
            &labels,
            entry.past_oom_events.saturating_add(current_ooms) as f64,
        );
        out.add(
            "tug_agent_task_restarts_total",
            &labels,
            f64::from(entry.restarts),
        );
        let Some(stats) = stats else {
            continue;
        };
        add_stats(&mut out, &labels, &stats);
        if let Some((quota, period)) = entry.cpu_quota.filter(|(q, _)| *q > 0) {
            out.add("container_spec_cpu_quota", &labels, quota as f64);
            out.add("container_spec_cpu_period", &labels, period as f64);
        }
        out.add("container_start_time_seconds", &labels, entry.started_at);
        out.add("container_last_seen", &labels, scrape.now);
        for nic in netdev::read(entry.pid, scrape.host_netns) {
            let mut with_nic = labels.to_vec();
            with_nic.push(("interface", nic.name.as_str()));
            let nic_values = [
                ("container_network_receive_bytes_total", nic.rx_bytes),
                ("container_network_receive_packets_total", nic.rx_packets),
                ("container_network_receive_errors_total", nic.rx_errors),
                (
                    "container_network_receive_packets_dropped_total",
                    nic.rx_dropped,
                ),
                ("container_network_transmit_bytes_total", nic.tx_bytes),
                ("container_network_transmit_packets_total", nic.tx_packets),
                ("container_network_transmit_errors_total", nic.tx_errors),
                (
                    "container_network_transmit_packets_dropped_total",
                    nic.tx_dropped,
                ),
            ];
            for (name, value) in nic_values {
                out.add(name, &with_nic, value as f64);
            }
        }
    }
    out.0.into_values().collect()
}

/// A running container's cgroup values; `None` when its cgroup is gone (it exited between the
/// table's snapshot and the read) or unreadable.
pub fn read_stats(driver: &CgroupDriver, cgroup_path: &str) -> Option<Stats> {
    let stats = Cgroup::open(driver, cgroup_path).and_then(|cg| cg.stats());
    match stats {
        Ok(stats) => Some(stats),
        Err(err) => {
            tracing::debug!(cgroup = cgroup_path, cause = %err, "no stats for the container");
            None
        }
    }
}

fn add_stats(out: &mut Families, labels: &[(&str, &str)], s: &Stats) {
    let values = [
        ("container_cpu_usage_seconds_total", seconds(s.cpu_usage_ns)),
        ("container_cpu_user_seconds_total", seconds(s.cpu_user_ns)),
        (
            "container_cpu_system_seconds_total",
            seconds(s.cpu_system_ns),
        ),
        (
            "container_cpu_cfs_throttled_periods_total",
            s.cpu_throttled_periods as f64,
        ),
        (
            "container_cpu_cfs_throttled_seconds_total",
            seconds(s.cpu_throttled_ns),
        ),
        ("container_memory_usage_bytes", s.memory_usage as f64),
        (
            "container_memory_working_set_bytes",
            s.memory_working_set as f64,
        ),
        ("container_memory_rss", s.memory_rss as f64),
        ("container_memory_cache", s.memory_cache as f64),
        (
            "container_spec_memory_limit_bytes",
            s.memory_limit.unwrap_or(0) as f64,
        ),
        ("container_processes", s.pids_current as f64),
        (
            "container_spec_pids_limit",
            s.pids_limit.unwrap_or(0) as f64,
        ),
    ];
    for (name, value) in values {
        out.add(name, labels, value);
    }
    if let Some(max) = s.memory_max_usage {
        out.add("container_memory_max_usage_bytes", labels, max as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::table::TaskLabels;
    use crate::runtime::cgroups::v1::Mounts;

    fn write(path: &Path, text: &str) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text)
    }

    /// A fake v1 tree holding one container's files, as the kernel lays them out.
    fn v1_tree(root: &Path) -> std::io::Result<CgroupDriver> {
        let mut mounts = Mounts::default();
        for c in ["cpu", "cpuacct", "memory", "pids", "freezer"] {
            mounts = mounts.with(c, root.join(c));
        }
        let files = [
            ("cpuacct", "cpuacct.usage", "2500000000\n"),
            ("cpuacct", "cpuacct.stat", "user 150\nsystem 50\n"),
            (
                "cpu",
                "cpu.stat",
                "nr_periods 10\nnr_throttled 3\nthrottled_time 4000000000\n",
            ),
            ("memory", "memory.usage_in_bytes", "104857600\n"),
            ("memory", "memory.limit_in_bytes", "134217728\n"),
            ("memory", "memory.max_usage_in_bytes", "110000000\n"),
            (
                "memory",
                "memory.stat",
                "cache 30000000\nrss 60000000\ninactive_file 1\ntotal_cache 31457280\n\
                 total_rss 62914560\ntotal_inactive_file 20971520\n",
            ),
            (
                "memory",
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ),
            ("pids", "pids.current", "4\n"),
            ("pids", "pids.max", "max\n"),
        ];
        for (controller, file, text) in files {
            write(&root.join(controller).join("tug/t1").join(file), text)?;
        }
        Ok(CgroupDriver::V1 { mounts })
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn a_v1_container_is_reported_as_cadvisor_does() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let driver = v1_tree(root.path())?;
        let entry = Tracked {
            labels: TaskLabels {
                namespace: "shop".into(),
                service: "web".into(),
                task: "web.1.abc".into(),
                image: "busybox:1".into(),
            },
            cgroup_path: "tug/t1".into(),
            cpu_quota: Some((50_000, 100_000)),
            pid: 0,
            started_at: 1_700_000_000.0,
            restarts: 1,
            past_oom_events: 3,
            running: true,
        };
        let stopped = Tracked {
            labels: TaskLabels {
                task: "web.2.def".into(),
                ..entry.labels.clone()
            },
            cgroup_path: "tug/gone".into(),
            running: false,
            past_oom_events: 1,
            ..entry.clone()
        };
        let scrape = Scrape {
            node: "n1",
            driver: Some(&driver),
            host_netns: None,
            now: 1_700_000_100.0,
        };
        let families = collect(&scrape, &[entry, stopped]);
        let text = String::from_utf8(
            tug_api::metrics_http::render(&prometheus::Registry::new(), families).body,
        )?;
        let series = |name: &str| {
            format!(
                "{name}{{id=\"/tug/t1\",image=\"busybox:1\",name=\"web.1.abc\",namespace=\"shop\",node=\"n1\",service=\"web\",task=\"web.1.abc\"}}"
            )
        };
        let v = |name: &str| value(&text, &series(name));
        assert_eq!(v("container_cpu_usage_seconds_total"), Some(2.5), "{text}");
        assert_eq!(v("container_cpu_user_seconds_total"), Some(1.5));
        assert_eq!(v("container_cpu_cfs_throttled_seconds_total"), Some(4.0));
        assert_eq!(v("container_memory_usage_bytes"), Some(104857600.0));
        // usage - total_inactive_file
        assert_eq!(v("container_memory_working_set_bytes"), Some(83886080.0));
        assert_eq!(v("container_memory_rss"), Some(62914560.0));
        assert_eq!(v("container_spec_memory_limit_bytes"), Some(134217728.0));
        assert_eq!(v("container_spec_cpu_quota"), Some(50000.0));
        assert_eq!(v("container_processes"), Some(4.0));
        assert_eq!(v("container_start_time_seconds"), Some(1_700_000_000.0));
        assert_eq!(v("container_last_seen"), Some(1_700_000_100.0));
        assert_eq!(
            v("container_oom_events_total"),
            Some(5.0),
            "3 before + 2 now"
        );
        assert_eq!(v("tug_agent_task_restarts_total"), Some(1.0));
        // The exited container keeps its counters only.
        assert!(
            text.contains("container_oom_events_total{id=\"/tug/gone\""),
            "{text}"
        );
        assert!(!text.contains("container_memory_usage_bytes{id=\"/tug/gone\""));
        assert!(text.contains("# TYPE container_cpu_usage_seconds_total counter"));
        assert!(text.contains("# TYPE container_memory_working_set_bytes gauge"));
        Ok(())
    }

    #[test]
    fn a_v2_working_set_is_current_minus_inactive_file() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("tug/t2");
        let files = [
            (
                "cpu.stat",
                "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
            ),
            ("memory.current", "52428800\n"),
            ("memory.max", "max\n"),
            (
                "memory.stat",
                "anon 31457280\nfile 20971520\ninactive_file 10485760\n",
            ),
            ("memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n"),
            ("pids.current", "2\n"),
            ("pids.max", "64\n"),
        ];
        for (file, text) in files {
            write(&dir.join(file), text)?;
        }
        let driver = CgroupDriver::V2 {
            root: root.path().to_path_buf(),
        };
        let stats = read_stats(&driver, "tug/t2").ok_or("no stats")?;
        assert_eq!(stats.memory_working_set, 52428800 - 10485760);
        assert_eq!(stats.memory_rss, 31457280);
        assert_eq!(stats.cpu_usage_ns, 1_500_000_000);
        assert_eq!(stats.oom_kills, 1);
        assert_eq!(stats.memory_limit, None);
        assert!(
            read_stats(&driver, "tug/gone").is_none(),
            "a removed cgroup has no stats"
        );
        Ok(())
    }

    #[test]
    fn every_family_written_has_help() {
        for (name, help, _) in FAMILIES {
            assert!(!help.is_empty(), "{name}");
        }
    }
}
