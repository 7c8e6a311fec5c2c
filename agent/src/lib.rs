//! tug's node agent (see `DESIGN.md`, "Agent").
//!
//! Pulls and verifies images into a content-addressed store, builds overlay root filesystems,
//! runs containers in their own namespaces and cgroups under a per-container monitor, and
//! converges the node to the assignments the controller streams to it. It links `tug-api` and
//! `tug-netplugin`, never controller code.
//!
//! Not built yet: the image store arrives with the "Images" issue, the runtime and supervisor with
//! the "Runtime" issue, the worker with the "agents, scheduling, reconciliation" issue.

pub mod image;
pub mod runtime;
