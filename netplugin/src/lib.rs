//! tug's container networking (see `DESIGN.md`, "Network").
//!
//! Per node a bridge `tug0` ([`node::setup_node`]); per container a veth pair with `eth0` inside
//! the container's network namespace, an address from node-local IPAM ([`ipam::Ipam`]), and a
//! default route via the bridge ([`container::add`], [`container::del`], [`container::check`],
//! with CNI semantics); host-gw routes to the other nodes' subnets ([`routes::sync_peer_routes`])
//! or a VXLAN overlay ([`vxlan::setup_vxlan`], [`vxlan::sync_vxlan_peers`]).
//! Every link, address and route change goes through rtnetlink. Depends on nothing else of tug's.
//!
//! Every function works in the network namespace of the calling thread, except that container
//! work inside the container's namespace runs on a helper thread ([`netns`]). Callers in another
//! namespace (tests, a hook process) use [`netns::block_in_netns`] or [`netns::in_netns`].
//!
//! Between containers on different nodes an eBPF fast path skips the bridge and IP forwarding
//! ([`fastpath`]). Masquerade and published ports are iptables rules ([`nat`]); service names are answered by
//! [`dns`]; standard CNI plugins can replace the built-in container setup ([`cni`]).

pub mod big_tcp;
pub mod cni;
pub mod container;
pub mod dns;
pub mod error;
pub mod etc_files;
pub mod fastpath;
pub mod ipam;
pub mod nat;
mod netlink;
pub mod netns;
pub mod node;
pub mod routes;
pub mod subnet;
pub mod vxlan;

pub use container::{Attachment, ContainerNet, Drift, DriftItem, add, check, del, host_veth_name};
pub use error::{Error, Result};
pub use ipam::Ipam;
pub use node::{Mode, NodeConfig, NodeSetup, setup_node};
pub use routes::{HostGwConfig, RouteSync, sync_peer_routes};
pub use subnet::Subnet;
pub use vxlan::{VxlanConfig, setup_vxlan, sync_vxlan_peers};
