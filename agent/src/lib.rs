//! tug's node agent (see `DESIGN.md`, "Agent").
//!
//! Pulls and verifies images into a content-addressed store, builds overlay root filesystems,
//! runs containers in their own namespaces and cgroups under a per-container monitor, and
//! converges the node to the assignments the controller streams to it. It links `tug-api` and
//! `tug-netplugin`, never controller code.
//!
//! Built: the image store (`image`), the runtime and its per-container monitor (`runtime`), the
//! restart policy (`supervisor`). Not built yet: the worker that converges the node to the
//! controller's assignments (the "agents, scheduling, reconciliation" issue).

pub mod image;
pub mod runtime;
pub mod supervisor;
