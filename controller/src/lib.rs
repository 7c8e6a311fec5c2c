//! tug's control plane (see `DESIGN.md`, "Control plane").
//!
//! One Raft group (tikv's `raft` crate) of 1, 3 or 5 controllers stores the desired state
//! (services, tasks, nodes, subnet allocations) and serves the operator's API from `tug_api`.
//! The leader schedules replicas onto nodes and reconciles. This crate links `tug-api` only:
//! it meets the agent on the wire, never in code.
//!
//! - [`raft`]: durable log and snapshots, the node running raft-rs's Ready loop, the transport
//!   seam, and the [`raft::NodeHandle`] the API server proposes and reads through;
//! - [`fsm`]: the deterministic state machine (typed commands, snapshots);
//! - [`state`]: the in-memory store it applies to, with the change log behind watches;
//! - [`testing`]: an in-memory fault-injecting network and a cluster harness for tests;
//! - [`api_server`]: the operator's Control API (any replica accepts any call; writes are
//!   forwarded to the leader);
//! - [`server`]: one replica (node, gRPC peer transport and API on one listener), [`run`].
//!
//! Not built yet: nodes, scheduler and reconciler (a later issue).

pub mod api_server;
pub mod dispatcher;
pub mod fsm;
pub mod leader;
pub mod metrics;
pub mod orchestrator;
pub mod raft;
pub mod reconcile;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod testing;
pub mod views;

pub use server::{ControllerConfig, ServerError, run, run_with_metrics};
