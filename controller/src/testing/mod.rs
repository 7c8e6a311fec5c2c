//! Test support, compiled into the library so integration tests (and later the API server's
//! tests) can use it: an in-memory network that injects faults between Raft nodes, and a
//! harness that runs a cluster of nodes on it.

mod cluster;
mod network;

pub use cluster::{HarnessError, TestCluster, fast_config, service, services};
pub use network::{LinkFaults, MemNetwork, NetStats};
