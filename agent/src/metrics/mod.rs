//! The agent's Prometheus metrics (DESIGN.md, "Observability"), served on `/metrics` by
//! [`serve`]:
//!
//! - per container, read at scrape time from its cgroup under cAdvisor's names and labels
//!   (`cadvisor`), for the containers in the [`ContainerTable`] the runners keep current;
//! - the machine: `machine_cpu_cores`, `machine_memory_bytes`;
//! - tug's own: image pull duration and bytes, container start duration (histograms), reconcile
//!   errors, task restarts, the network fast path's packets.
//!
//! Scrapes copy the table under a short lock and read the files on a blocking thread: they
//! never wait for a runner and no runner waits for them. [`UsageSampler`] makes the compact
//! usage summary sent with status reports.

mod cadvisor;
mod netdev;
mod table;
mod usage;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use prometheus::{Histogram, HistogramOpts, IntCounter, Registry, exponential_buckets};
use tokio::net::TcpListener;
use tug_api::metrics_http::{self, Family, Reply};
use tug_api::v1::TaskUsage;

pub use table::{ContainerTable, TaskLabels, Tracked};
pub use usage::UsageSampler;

use crate::network::FastPathSlot;
use crate::runtime::cgroups::CgroupDriver;

/// Default port of the agent's `/metrics`.
pub const DEFAULT_PORT: u16 = 7443;

/// Everything the agent measures, and the registry that renders it.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    node: String,
    driver: Option<CgroupDriver>,
    host_netns: Option<PathBuf>,
    cpu_cores: u64,
    memory_bytes: u64,
    pub containers: ContainerTable,
    pub usage: UsageSampler,
    pub pull_seconds: Histogram,
    pub pull_bytes: Histogram,
    pub start_seconds: Histogram,
    pub reconcile_errors: IntCounter,
    /// The node network's fast path, whose packet counters are rendered.
    fast_path: OnceLock<FastPathSlot>,
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Result<Histogram> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
}

impl AgentMetrics {
    /// Metrics of node `node` with `cpu_cores` and `memory_bytes`; the cgroup driver is
    /// detected here (without one, containers report only their counters).
    pub fn new(node: &str, cpu_cores: u64, memory_bytes: u64) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let pull_seconds = histogram(
            "tug_agent_image_pull_duration_seconds",
            "Time to pull and unpack an image.",
            exponential_buckets(0.05, 2.0, 14)?,
        )?;
        let pull_bytes = histogram(
            "tug_agent_image_pull_bytes",
            "Compressed size of the layers of each image pulled.",
            exponential_buckets(64.0 * 1024.0, 4.0, 10)?,
        )?;
        let start_seconds = histogram(
            "tug_agent_container_start_duration_seconds",
            "Time to create and start a container (image already present).",
            exponential_buckets(0.005, 2.0, 12)?,
        )?;
        let reconcile_errors = IntCounter::new(
            "tug_agent_reconcile_errors_total",
            "Tasks the agent failed to converge (pull, create or start failed).",
        )?;
        for c in [&pull_seconds, &pull_bytes, &start_seconds] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(reconcile_errors.clone()))?;
        let driver = match CgroupDriver::detect() {
            Ok(d) => Some(d),
            Err(err) => {
                tracing::warn!(cause = %err, "no cgroups: container metrics are limited to counters");
                None
            }
        };
        Ok(AgentMetrics {
            registry,
            node: node.to_string(),
            driver,
            host_netns: netdev::own_netns(),
            cpu_cores,
            memory_bytes,
            containers: ContainerTable::default(),
            usage: UsageSampler::default(),
            pull_seconds,
            pull_bytes,
            start_seconds,
            reconcile_errors,
            fast_path: OnceLock::new(),
        })
    }

    /// The text exposition of everything (blocking: reads every container's cgroup files).
    pub fn render(&self) -> Reply {
        let now = unix_now();
        let scrape = cadvisor::Scrape {
            node: &self.node,
            driver: self.driver.as_ref(),
            host_netns: self.host_netns.as_deref(),
            now,
        };
        let entries = self.containers.snapshot();
        let mut families = cadvisor::collect(&scrape, &entries);
        let node = [("node", self.node.as_str())];
        let mut cores = Family::gauge("machine_cpu_cores", "Number of logical CPU cores.");
        cores.add(&node, self.cpu_cores as f64);
        let mut memory = Family::gauge(
            "machine_memory_bytes",
            "Amount of memory installed on the machine.",
        );
        memory.add(&node, self.memory_bytes as f64);
        let mut running = Family::gauge(
            "tug_agent_containers",
            "Task containers tracked on this node, by whether they run.",
        );
        let up = entries.iter().filter(|e| e.running).count();
        running.add(
            &[("node", self.node.as_str()), ("state", "running")],
            up as f64,
        );
        running.add(
            &[("node", self.node.as_str()), ("state", "exited")],
            (entries.len() - up) as f64,
        );
        families.extend([cores, memory, running]);
        families.extend(self.fast_path_families());
        metrics_http::render(&self.registry, families)
    }

    /// Render the packet counters of the node network's fast path (set once, by the worker).
    pub fn watch_fast_path(&self, slot: FastPathSlot) {
        let _ = self.fast_path.set(slot);
    }

    fn fast_path_families(&self) -> Vec<Family> {
        let Some(fast) = self
            .fast_path
            .get()
            .and_then(|slot| slot.lock().unwrap_or_else(|p| p.into_inner()).clone())
        else {
            return Vec::new();
        };
        let stats = match fast.stats() {
            Ok(stats) => stats,
            Err(e) => {
                tracing::debug!(cause = %e, "fast path counters unreadable");
                return Vec::new();
            }
        };
        let mut families = vec![self.node_counters(
            "tug_agent_fast_path_packets_total",
            "Packets the eBPF fast path carried between this node's containers and other nodes \
             (GSO packets count once), by direction, since it was loaded.",
            "direction",
            [
                ("to_nodes", stats.to_nodes),
                ("to_containers", stats.to_containers),
            ],
        )];
        if fast.carries_vxlan() {
            families.push(self.node_counters(
                "tug_agent_fast_path_vxlan_packets_total",
                "Of those, the packets the fast path's programs put into VXLAN or took out of it \
                 themselves (vxlan mode; the others went through the VXLAN device).",
                "operation",
                [
                    ("encapsulated", stats.encapsulated),
                    ("decapsulated", stats.decapsulated),
                ],
            ));
        }
        families
    }

    /// Counter family `name` with one sample of this node per `(label value, count)`.
    fn node_counters(
        &self,
        name: &str,
        help: &str,
        label: &str,
        counts: [(&str, u64); 2],
    ) -> Family {
        let mut family = Family::counter(name, help);
        for (value, count) in counts {
            family.add(
                &[("node", self.node.as_str()), (label, value)],
                count as f64,
            );
        }
        family
    }

    /// The container of `task` exited (blocking: reads its cgroup's OOM kill count, which a
    /// restart's new cgroup starts again from 0). `oom_killed`: the runtime saw its init killed
    /// by the OOM killer (counted when the cgroup cannot tell).
    pub fn container_exited(&self, task: &str, oom_killed: bool) {
        let Some(entry) = self.containers.get(task) else {
            return;
        };
        let counted = match (&self.driver, entry.running) {
            (Some(driver), true) => {
                cadvisor::read_stats(driver, &entry.cgroup_path).map_or(0, |s| s.oom_kills)
            }
            _ => 0,
        };
        self.containers
            .exited(task, counted.max(u64::from(oom_killed)));
    }

    /// The usage of every running task (blocking), for the next status report.
    pub fn task_usage(&self) -> Vec<TaskUsage> {
        match &self.driver {
            Some(driver) => self
                .usage
                .sample(driver, &self.containers.snapshot(), unix_now()),
            None => Vec::new(),
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Serve `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    metrics: Arc<AgentMetrics>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let handler: metrics_http::Handler =
        Arc::new(move |path| (path == "/metrics").then(|| metrics.render()));
    metrics_http::serve(listener, handler, shutdown).await;
}
