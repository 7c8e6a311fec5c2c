//! The plugin's one error type. Every variant reads as one sentence that names the object
//! (bridge, veth, namespace, subnet, file) so the agent can pass it to the operator unchanged.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::container::Drift;
use crate::subnet::Subnet;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while wiring a node or a container into the network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A netlink request was refused or failed; `what` names the operation and the object.
    #[error("could not {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },

    /// Opening the netlink socket itself failed (no NETLINK_ROUTE in this namespace?).
    #[error("could not open a netlink socket: {0}")]
    NetlinkSocket(#[source] std::io::Error),

    /// A file or sysctl could not be read or written.
    #[error("could not {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A `bpf(2)` call of the fast path failed; `what` names the operation and the object.
    #[error("could not {what}: {source}")]
    Bpf {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// The kernel refused to load a fast-path program; `log` is the end of the verifier's log.
    #[error("the kernel refused fast-path program {program}: {source}{}", if log.is_empty() { String::new() } else { format!("; verifier: {log}") })]
    BpfLoad {
        program: String,
        #[source]
        source: std::io::Error,
        log: String,
    },

    /// A fast-path request that makes no sense (the address is not the node's).
    #[error("could not {what}: {reason}")]
    FastPath { what: String, reason: String },

    /// A network namespace file could not be opened or entered.
    #[error("could not {what} network namespace {}: {source}", path.display())]
    Netns {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The helper thread that works inside a namespace died.
    #[error("the helper thread working inside network namespace {} panicked", path.display())]
    NetnsThread { path: PathBuf },

    /// A text could not be parsed as `a.b.c.d/len`.
    #[error("{text:?} is not an IPv4 subnet (expected a.b.c.d/len): {reason}")]
    InvalidSubnet { text: String, reason: String },

    /// The subnet is too small to hold a bridge and at least one container.
    #[error(
        "subnet {0} is too small: it needs room for the network, bridge, broadcast and one container address (at most /30)"
    )]
    SubnetTooSmall(Subnet),

    /// A container id that cannot name anything (empty, or with characters a file name can't hold).
    #[error("container id {0:?} is invalid: it must be non-empty and free of control characters")]
    InvalidContainerId(String),

    /// Every address of the subnet is handed out.
    #[error(
        "no free address left in subnet {subnet} ({allocated} containers hold one each); delete a container or give the node a larger subnet"
    )]
    IpamExhausted { subnet: Subnet, allocated: usize },

    /// The IPAM state file is not what this version writes.
    #[error("the IPAM state file {} is corrupt: {reason}", path.display())]
    IpamCorrupt { path: PathBuf, reason: String },

    /// The IPAM state file was written for another subnet.
    #[error("the IPAM state file {} belongs to subnet {stored}, but this node's subnet is {configured}; remove the file once no container uses the old subnet", path.display())]
    IpamSubnetMismatch {
        path: PathBuf,
        stored: Subnet,
        configured: Subnet,
    },

    /// A link named in the configuration does not exist.
    #[error("network interface {name:?} does not exist{hint}")]
    LinkNotFound { name: String, hint: &'static str },

    /// A link named as the bridge exists but is something else.
    #[error(
        "network interface {name:?} exists but is a {kind}, not a bridge; rename it or choose another bridge name"
    )]
    NotABridge { name: String, kind: String },

    /// A link named as the VXLAN device exists but is something else.
    #[error(
        "network interface {name:?} exists but is a {kind}, not a VXLAN device; rename it or choose another device name"
    )]
    NotAVxlan { name: String, kind: String },

    /// The container's namespace already holds an `eth0` that is not ours.
    #[error("container {id}'s network namespace {} already has an interface named eth0", netns.display())]
    Eth0Exists { id: String, netns: PathBuf },

    /// Host-gw input that would program a wrong or conflicting route.
    #[error("peer subnet {peer} (via {via}) is invalid: {reason}")]
    InvalidPeer {
        peer: Subnet,
        via: Ipv4Addr,
        reason: String,
    },

    /// A CNI configuration or plugin call failed.
    #[error("could not {what}: {reason}")]
    Cni { what: String, reason: String },

    /// The node subnet overlaps a network the node is already on.
    #[error(
        "the container subnet {subnet} overlaps {address} on interface {link:?}; give the cluster \
         another --cluster-cidr (nothing was set up)"
    )]
    SubnetClash {
        subnet: Subnet,
        address: String,
        link: String,
    },

    /// An iptables command failed (or could not run).
    #[error("iptables {args} failed: {reason}")]
    Iptables { args: String, reason: String },

    /// A published port is taken on this node.
    #[error("host port {port}/{protocol} is already {by}")]
    PortTaken {
        port: u16,
        protocol: &'static str,
        by: String,
    },

    /// A published port the plugin cannot program.
    #[error("invalid port mapping: {0}")]
    InvalidPort(String),

    /// `check` found the container's network different from what `add` made.
    #[error("container {id}'s network has drifted: {drift}")]
    Drift { id: String, drift: Drift },
}

impl Error {
    /// Wrap an rtnetlink error with a description of what was being done.
    pub(crate) fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
        let what = what.into();
        move |source| Error::Netlink { what, source }
    }

    /// Wrap a `bpf(2)` error with a description of what was being done.
    pub(crate) fn bpf(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Bpf { what, source }
    }

    /// Wrap an I/O error on a path.
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}
