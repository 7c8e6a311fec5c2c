//! tug's node agent (see `DESIGN.md`, "Agent").
//!
//! Pulls and verifies images into a content-addressed store, builds overlay root filesystems,
//! runs containers in their own namespaces and cgroups under a per-container monitor, and
//! converges the node to the assignments the controller streams to it. It links `tug-api` and
//! `tug-netplugin`, never controller code.
//!
//! Parts: the image store (`image`), the runtime and its per-container monitor (`runtime`), the
//! restart policy (`supervisor`), and the worker (`worker`): the session with the controllers,
//! converging the node to its assignments, status reports, health checks, re-adoption of
//! containers after an agent restart, and the agent API (logs, exec).

pub mod image;
pub mod metrics;
pub mod network;
pub mod runtime;
pub mod supervisor;
pub mod worker;
