//! The built-in container runtime (DESIGN.md, Agent).

pub mod cgroups;
