//! tug's control plane (see `DESIGN.md`, "Control plane").
//!
//! One Raft group (tikv's `raft` crate) of 1, 3 or 5 controllers stores the desired state
//! (services, tasks, nodes, subnet allocations) and serves the operator's API from `tug_api`.
//! The leader schedules replicas onto nodes and reconciles. This crate links `tug-api` only:
//! it meets the agent on the wire, never in code.
//!
//! Not built yet: the Raft node, state machine and API server arrive with the "Controller" issue;
//! nodes, scheduler and reconciler with the "agents, scheduling, reconciliation" issue.
