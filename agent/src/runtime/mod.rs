//! The built-in container runtime (DESIGN.md, Agent).

pub mod cgroups;
pub mod container;
pub mod exec;
pub mod external;
pub mod init;
pub mod logs;
pub mod monitor;
pub mod mounts;
pub mod netns;
pub mod seccomp;
pub mod security;
pub mod spec;
pub mod state;
pub mod users;
