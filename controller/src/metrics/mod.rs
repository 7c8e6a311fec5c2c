//! The controller's Prometheus metrics (DESIGN.md, "Observability") and its HTTP endpoints:
//! `/metrics` and `/sd` (Prometheus HTTP service discovery of the whole cluster, see `sd`).
//!
//! - Raft: term, leader, is_leader, commit/applied/snapshot index (read from the node's status
//!   at scrape time), leader changes seen, proposal latency and snapshot duration (histograms
//!   the node records into, see [`RaftMetrics`]);
//! - state: services, tasks by state, nodes by state (read from this replica's store at scrape
//!   time);
//! - scheduling: reconcile-pass latency and placements (recorded by the leader's orchestrator);
//! - API: requests and latency by method and code (a layer around the gRPC server).

pub mod api;
mod raft;
pub mod sd;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use prometheus::{Histogram, HistogramOpts, IntCounter, Registry, exponential_buckets};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tug_api::metrics_http::{self, Family, Reply};
use tug_api::v1::{NodeState, TaskState};

pub use api::{ApiMetrics, ApiMetricsLayer};
pub use raft::RaftMetrics;

use crate::raft::{NodeHandle, NodeStatus, PeerAddresses};
use crate::state::Store;

/// Default port of a controller's `/metrics` and `/sd`.
pub const DEFAULT_PORT: u16 = 7442;

/// The reconciler's instruments (unset where metrics are not served).
#[derive(Debug, Clone, Default)]
pub struct SchedulingMetrics {
    pub pass_seconds: Option<Histogram>,
    pub placements: Option<IntCounter>,
}

impl SchedulingMetrics {
    /// One committed (or empty) reconcile pass that took `seconds` and placed `placed` tasks.
    pub fn observe_pass(&self, seconds: f64, placed: usize) {
        if let Some(h) = &self.pass_seconds {
            h.observe(seconds);
        }
        if let Some(c) = &self.placements {
            c.inc_by(placed as u64);
        }
    }
}

/// Every instrument of one replica and the registry that renders them.
#[derive(Debug, Clone)]
pub struct ControllerMetrics {
    registry: Registry,
    pub raft: RaftMetrics,
    pub api: ApiMetrics,
    pub scheduling: SchedulingMetrics,
    pub leader_changes: IntCounter,
}

impl ControllerMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let raft = RaftMetrics::new()?;
        let api = ApiMetrics::new()?;
        let pass_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tug_scheduler_pass_duration_seconds",
                "Time of one reconcile pass (reconcile and schedule, then commit the plan).",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 16)?),
        )?;
        let placements = IntCounter::new(
            "tug_scheduler_placements_total",
            "Tasks placed onto nodes by the scheduler.",
        )?;
        let leader_changes = IntCounter::new(
            "tug_raft_leader_changes_total",
            "Leader changes this replica has seen (the first election included).",
        )?;
        for h in [&raft.proposal_seconds, &raft.snapshot_seconds]
            .into_iter()
            .flatten()
        {
            registry.register(Box::new(h.clone()))?;
        }
        registry.register(Box::new(api.requests.clone()))?;
        registry.register(Box::new(api.seconds.clone()))?;
        registry.register(Box::new(pass_seconds.clone()))?;
        registry.register(Box::new(placements.clone()))?;
        registry.register(Box::new(leader_changes.clone()))?;
        Ok(ControllerMetrics {
            registry,
            raft,
            api,
            scheduling: SchedulingMetrics {
                pass_seconds: Some(pass_seconds),
                placements: Some(placements),
            },
            leader_changes,
        })
    }

    /// The text exposition: the instruments plus what is read now from `handle`.
    pub fn render(&self, handle: &NodeHandle) -> Reply {
        let status = handle.status();
        let families = {
            let store = handle.store().read();
            state_families(&status, &store)
        };
        metrics_http::render(&self.registry, families)
    }
}

/// `TASK_STATE_RUNNING` -> `running`.
fn state_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

/// Raft status and object counts, as gauges.
pub fn state_families(status: &NodeStatus, store: &Store) -> Vec<Family> {
    let gauge = |name: &str, help: &str, value: f64| {
        let mut f = Family::gauge(name, help);
        f.add(&[], value);
        f
    };
    let mut out = vec![
        gauge(
            "tug_raft_term",
            "The current Raft term.",
            status.term as f64,
        ),
        gauge(
            "tug_raft_is_leader",
            "1 if this replica is the leader, else 0.",
            f64::from(u8::from(status.is_leader())),
        ),
        gauge(
            "tug_raft_leader_id",
            "The id of the leader this replica knows (0: none).",
            status.leader_id.unwrap_or(0) as f64,
        ),
        gauge(
            "tug_raft_commit_index",
            "The highest log index known to be committed.",
            status.commit_index as f64,
        ),
        gauge(
            "tug_raft_applied_index",
            "The highest log index applied to the state machine.",
            status.applied_index as f64,
        ),
        gauge(
            "tug_raft_snapshot_index",
            "The log index of the latest state machine snapshot.",
            status.snapshot_index as f64,
        ),
        gauge(
            "tug_raft_voters",
            "Voting members of the Raft group.",
            status.voters.len() as f64,
        ),
        gauge(
            "tug_controller_services",
            "Services in the store.",
            store.service_count() as f64,
        ),
    ];
    let mut tasks: BTreeMap<String, u64> = TASK_STATES
        .iter()
        .map(|s| (state_name(s.as_str_name(), "TASK_STATE_"), 0))
        .collect();
    for t in store.tasks() {
        let state = t.status.as_ref().map(|s| s.state()).unwrap_or_default();
        *tasks
            .entry(state_name(state.as_str_name(), "TASK_STATE_"))
            .or_default() += 1;
    }
    let mut by_state = Family::gauge("tug_controller_tasks", "Tasks in the store, by state.");
    for (state, n) in &tasks {
        by_state.add(&[("state", state)], *n as f64);
    }
    out.push(by_state);
    let mut nodes: BTreeMap<String, u64> = [NodeState::Ready, NodeState::Down]
        .iter()
        .map(|s| (state_name(s.as_str_name(), "NODE_STATE_"), 0))
        .collect();
    for n in store.nodes() {
        *nodes
            .entry(state_name(n.state().as_str_name(), "NODE_STATE_"))
            .or_default() += 1;
    }
    let mut by_state = Family::gauge("tug_controller_nodes", "Nodes in the store, by state.");
    for (state, n) in &nodes {
        by_state.add(&[("state", state)], *n as f64);
    }
    out.push(by_state);
    out
}

const TASK_STATES: &[TaskState] = &[
    TaskState::Pending,
    TaskState::Assigned,
    TaskState::Pulling,
    TaskState::Starting,
    TaskState::Running,
    TaskState::Exited,
    TaskState::Failed,
    TaskState::Stopped,
    TaskState::Lost,
];

/// Counts every change of leader this replica sees, until `stopping`.
pub async fn count_leader_changes(
    handle: NodeHandle,
    counter: IntCounter,
    mut stopping: watch::Receiver<bool>,
) {
    let mut updates = handle.status_updates();
    let mut leader = None;
    loop {
        let now = updates.borrow_and_update().leader_id;
        if now.is_some() && now != leader {
            counter.inc();
        }
        if now.is_some() {
            leader = now;
        }
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { return },
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

/// What the metrics endpoint serves and where it says it is.
#[derive(Debug)]
pub struct Endpoint {
    pub listener: TcpListener,
    /// This replica's metrics `host:port` as others reach it (listed in `/sd`).
    pub advertise: String,
}

/// Serve `/metrics` and `/sd` until `shutdown`.
pub async fn serve(
    metrics: ControllerMetrics,
    handle: NodeHandle,
    peers: PeerAddresses,
    endpoint: Endpoint,
    shutdown: impl Future<Output = ()>,
) {
    let port = endpoint
        .listener
        .local_addr()
        .map_or(DEFAULT_PORT, |a| a.port());
    let advertise = endpoint.advertise;
    let handler: metrics_http::Handler = Arc::new(move |path| match path {
        "/metrics" => Some(metrics.render(&handle)),
        "/sd" => {
            let status = handle.status();
            let mut members = status.voters.clone();
            members.extend(&status.learners);
            let mut targets = sd::controller_targets(
                &peers.snapshot(),
                &members,
                port,
                (handle.id(), &advertise),
            );
            targets.extend(sd::agent_targets(&handle.store().read()));
            Some(Reply {
                content_type: metrics_http::JSON,
                body: sd::document(&targets),
            })
        }
        _ => None,
    });
    metrics_http::serve(endpoint.listener, handler, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_counts_are_rendered() -> Result<(), Box<dyn std::error::Error>> {
        let metrics = ControllerMetrics::new()?;
        metrics.leader_changes.inc();
        metrics.scheduling.observe_pass(0.01, 3);
        metrics.raft.observe_proposal(0.002);
        let status = NodeStatus {
            id: 1,
            leader_id: Some(1),
            role: crate::raft::Role::Leader,
            term: 4,
            commit_index: 10,
            applied_index: 9,
            voters: vec![1, 2, 3],
            ..NodeStatus::default()
        };
        let store = Store::new(10);
        let families = state_families(&status, &store);
        let text = String::from_utf8(metrics_http::render(&metrics.registry, families).body)?;
        for line in [
            "tug_raft_term 4",
            "tug_raft_is_leader 1",
            "tug_raft_commit_index 10",
            "tug_raft_applied_index 9",
            "tug_raft_leader_changes_total 1",
            "tug_scheduler_placements_total 3",
            "tug_raft_proposal_duration_seconds_count 1",
            "tug_controller_tasks{state=\"running\"} 0",
            "tug_controller_nodes{state=\"ready\"} 0",
            "tug_controller_services 0",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing in:\n{text}"
            );
        }
        Ok(())
    }
}
