//! The built-in container runtime (DESIGN.md, Agent).

pub mod cgroups;
pub mod spec;
pub mod users;
