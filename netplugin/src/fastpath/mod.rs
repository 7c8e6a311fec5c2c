//! The eBPF fast path between containers on different nodes (tc `bpf` filters, Linux 5.11+:
//! earlier kernels charge BPF maps to a small locked-memory limit and lack nothing else).
//!
//! Without it, a packet from a container to one on another node crosses the host veth's
//! backlog queue, the bridge, netfilter and IP forwarding on the way out, and IP forwarding,
//! netfilter, the bridge and the container veth's backlog again on the way in. With it (see
//! [`programs`] for exactly which packets qualify), the sending node's program on the
//! container's host veth hands the packet straight to the uplink or VXLAN device through the
//! neighbour table, and the receiving node's program on that device puts it straight into the
//! destination container's namespace. Traffic to or from outside the cluster, and anything the
//! programs are unsure about, still takes the normal path, so masquerade, published ports and
//! ICMP errors are unchanged. What the programs cannot skip is the sending container's veth:
//! a packet reaches the program on the host end after the veth has passed it through the
//! CPU's backlog queue, as every veth does (a netkit device, Linux 6.7+, runs its program in
//! the container's own transmit instead). That pass, for the data on the sending node and
//! for the acknowledgements on the receiving one, is most of what the fast path costs over
//! host to host: about 7% of the throughput of hosts without netfilter under BBR on the test
//! bed, as much as connection tracking costs a host's own traffic (`bench-network`).
//!
//! In vxlan mode with a known uplink ([`TunnelConfig`]) the programs also carry VXLAN
//! themselves: the sending program encapsulates for peers recorded with [`FastPath::set_peers`]
//! and sends the packet out of the uplink, and a third program there ([`FROM_VXLAN`])
//! decapsulates what arrives from a recorded peer node for a local container. Their packets are
//! the VXLAN device's, which stays for everything else (peers not recorded, VXLAN from other
//! sources, which meets the node's netfilter rules there, packets with a congestion mark on the
//! outer header, nodes without the fast path). The outer header is not ECN-capable, and the
//! source port comes from the flow hash in 49152-65535 (RFC 7348), where the device uses the
//! local port range. Where the kernel refuses a step (an older kernel without
//! `BPF_F_ADJ_ROOM_ENCAP_L2_ETH`), the packet goes through the device instead. A decapsulated
//! GSO packet keeps the UDP-tunnel bit of its GSO type (only bpf-next's
//! `BPF_F_ADJ_ROOM_DECAP_L4_UDP` clears it): harmless for delivery to the container's own
//! sockets, which is all the program does with it, and a container that forwards such packets
//! on (onto a smaller MTU, too) passes them intact (tested).
//!
//! [`FastPath::setup`] loads the programs and attaches the receiving ones; [`FastPath::attach`]
//! puts the sending one on a container's host veth and records the container's address in the
//! route map; [`FastPath::detach`] forgets the address (the veth's filter goes with the veth).
//! Programs are attached as tc filters ([`tc`]) at tug's own priority, which a new agent's
//! programs replace in place.
//!
//! The sending program sits on the veth, not on the bridge: with `br_netfilter` loaded, a
//! packet reaching the bridge device has been through the IPv4 PREROUTING hooks already, and
//! the answer of a published port reached from inside the cluster would arrive there with its
//! destination translated back but its source not yet: redirected then, it would skip the
//! reverse DNAT. On the veth every packet is as the container sent it.

// The programs compare addresses as their wire bytes loaded little-endian (`programs::wire`).
#[cfg(target_endian = "big")]
compile_error!("tug's eBPF fast path is written for little-endian machines");

mod asm;
mod bpf;
mod programs;
mod tc;

use std::ffi::CStr;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::{Error, Result};
use crate::netlink::Netlink;
use crate::subnet::Subnet;

/// The name of the program on container veths.
pub const FROM_CONTAINERS: &str = "tug_from_ctr";
/// The name of the program on the uplink or VXLAN device.
pub const TO_CONTAINERS: &str = "tug_to_ctr";
/// The name of the program on the uplink in vxlan mode, which decapsulates.
pub const FROM_VXLAN: &str = "tug_vxlan_in";
/// The license the programs declare to the kernel (some helpers are GPL-only). The programs
/// are tug's own, generated in [`programs`]; tug itself is Apache-2.0, and "Dual MIT/GPL" is a
/// license string the kernel accepts as GPL-compatible for code that is offered under both.
const LICENSE: &CStr = c"Dual MIT/GPL";
/// At most this many containers per node in the route map.
const MAX_CONTAINERS: u32 = 65536;
/// At most this many VXLAN peers in the peer map.
const MAX_PEERS: u32 = 65536;

/// What the fast path needs of the node.
#[derive(Debug, Clone)]
pub struct FastPathConfig {
    /// The whole cluster's CIDR: only traffic inside it is fast-pathed.
    pub cluster_cidr: Subnet,
    /// This node's container subnet.
    pub subnet: Subnet,
    /// Where traffic from other nodes' containers arrives: the uplink in host-gw mode, the VXLAN
    /// device in vxlan mode; `None` for a node without one (nothing arrives from other nodes).
    pub ingress: Option<String>,
    /// In vxlan mode with a known uplink: the programs encapsulate and decapsulate VXLAN
    /// themselves (see [`programs`]); without it the VXLAN device does.
    pub tunnel: Option<TunnelConfig>,
}

/// The VXLAN settings the programs need: those of the node's VXLAN device
/// ([`crate::VxlanConfig`]).
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// The interface VXLAN packets arrive on and leave by.
    pub uplink: String,
    /// This node's address: the outer source, and where peers send.
    pub local: Ipv4Addr,
    /// The UDP port, the same on every node.
    pub port: u16,
    /// The VXLAN network identifier, the same on every node.
    pub vni: u32,
}

impl TunnelConfig {
    /// The programs' settings for the node's VXLAN device `vx`: its port, VNI and local
    /// address; `None` without a pinned uplink (the device then carries VXLAN alone).
    pub fn of(vx: &crate::VxlanConfig) -> Option<TunnelConfig> {
        Some(TunnelConfig {
            uplink: vx.uplink.clone()?,
            local: vx.local,
            port: vx.port,
            vni: vx.vni,
        })
    }
}

/// Packet counts of the fast path since its programs were loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastPathStats {
    /// Packets from local containers sent straight to another node.
    pub to_nodes: u64,
    /// Packets from other nodes put straight into a local container.
    pub to_containers: u64,
    /// Of `to_nodes`, those encapsulated in VXLAN by the program (vxlan mode).
    pub encapsulated: u64,
    /// Of `to_containers`, those taken out of VXLAN by the program (vxlan mode).
    pub decapsulated: u64,
}

/// The loaded programs and maps of one node (one network namespace).
#[derive(Debug)]
pub struct FastPath {
    from_containers: OwnedFd,
    routes: bpf::Map,
    stats: bpf::Map,
    /// VTEP address -> node address of the VXLAN peers, and the set of their node addresses
    /// (the only outer sources decapsulated), with a tunnel.
    peers: Option<(bpf::Map, bpf::Map)>,
    subnet: Subnet,
}

impl FastPath {
    /// Load the programs and attach the receiving one to `cfg.ingress` (replacing tug's program
    /// there). Works in the calling thread's network namespace; needs a tokio runtime.
    pub async fn setup(cfg: &FastPathConfig) -> Result<FastPath> {
        let routes = bpf::map_create(bpf::MAP_HASH, 4, 4, MAX_CONTAINERS, "tug_routes")
            .map_err(Error::bpf("create the fast path's route map"))?;
        let stats = bpf::map_create(bpf::MAP_ARRAY, 4, 8, programs::STATS, "tug_stats")
            .map_err(Error::bpf("create the fast path's statistics map"))?;
        let peers = match &cfg.tunnel {
            Some(_) => Some((
                bpf::map_create(bpf::MAP_HASH, 4, 4, MAX_PEERS, "tug_peers")
                    .map_err(Error::bpf("create the fast path's VXLAN peer map"))?,
                bpf::map_create(bpf::MAP_HASH, 4, 4, MAX_PEERS, "tug_peer_nodes")
                    .map_err(Error::bpf("create the fast path's VXLAN peer node map"))?,
            )),
            None => None,
        };
        let tunnel = match (&cfg.tunnel, &peers) {
            (Some(t), Some((peers, nodes))) => Some(programs::Tunnel {
                peers: peers.fd(),
                nodes: nodes.fd(),
                local: t.local,
                uplink: if_index(&t.uplink)?,
                port: t.port,
                vni: t.vni,
            }),
            _ => None,
        };
        let from_containers = load(
            FROM_CONTAINERS,
            programs::from_containers(cfg.cluster_cidr, cfg.subnet, stats.fd(), tunnel.as_ref()),
        )?;
        let to_containers = load(
            TO_CONTAINERS,
            programs::to_containers(cfg.cluster_cidr, cfg.subnet, routes.fd(), stats.fd()),
        )?;
        let from_vxlan = match &tunnel {
            Some(t) => Some(load(
                FROM_VXLAN,
                programs::from_vxlan(cfg.cluster_cidr, cfg.subnet, t, routes.fd(), stats.fd()),
            )?),
            None => None,
        };
        let nl = Netlink::open()?;
        let mut hooks = Vec::new();
        if let Some(name) = &cfg.ingress {
            let index = if_index(name)?;
            tc::attach(&nl, index, name, fd_u32(&to_containers), TO_CONTAINERS).await?;
            hooks.push(index);
        }
        if let (Some(t), Some(tunnel), Some(prog)) = (&cfg.tunnel, &tunnel, &from_vxlan) {
            tc::attach(&nl, tunnel.uplink, &t.uplink, fd_u32(prog), FROM_VXLAN).await?;
            hooks.push(tunnel.uplink);
        }
        // An earlier setup's programs on other interfaces (the uplink changed, or the mode)
        // would route by maps nothing updates any more.
        match remove_node_programs(&nl, &hooks).await {
            Ok(removed) => {
                for interface in removed {
                    tracing::info!(%interface, "fast-path program of an earlier setup removed");
                }
            }
            Err(e) => tracing::warn!(cause = %e, "earlier fast-path programs not looked for"),
        }
        tracing::info!(ingress = ?cfg.ingress, tunnel = ?cfg.tunnel.as_ref().map(|t| &t.uplink), "eBPF fast path loaded");
        Ok(FastPath {
            from_containers,
            routes,
            stats,
            peers,
            subnet: cfg.subnet,
        })
    }

    /// Make the peer map hold exactly `peers` (`(subnet, node address)`, as given to
    /// [`crate::sync_vxlan_peers`]); packets to others go through the VXLAN device. Nothing to
    /// do without a tunnel.
    ///
    /// Former peers go first and every entry is tried, so a failure leaves the maps as close to
    /// `peers` as the kernel allowed; the first error is returned.
    pub fn set_peers(&self, peers: &[(Subnet, Ipv4Addr)]) -> Result<()> {
        let Some((vteps, nodes)) = &self.peers else {
            return Ok(());
        };
        let what = "update the fast path's VXLAN peer maps";
        let mut first = None;
        let mut note = |r: std::io::Result<()>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        for (map, wanted) in [
            (
                vteps,
                peers.iter().map(|(s, _)| s.network()).collect::<Vec<_>>(),
            ),
            (nodes, peers.iter().map(|(_, n)| *n).collect()),
        ] {
            match bpf::map_keys::<4>(map) {
                Ok(keys) => {
                    for key in keys {
                        if !wanted.contains(&Ipv4Addr::from(key)) {
                            note(bpf::map_delete(map, &key).map(drop));
                        }
                    }
                }
                Err(e) => note(Err(e)),
            }
        }
        for (subnet, node) in peers {
            note(bpf::map_update(
                vteps,
                &subnet.network().octets(),
                &node.octets(),
            ));
            note(bpf::map_update(nodes, &node.octets(), &1u32.to_ne_bytes()));
        }
        first.map_or(Ok(()), |e| Err(Error::bpf(what)(e)))
    }

    /// Whether the programs carry VXLAN themselves.
    pub fn carries_vxlan(&self) -> bool {
        self.peers.is_some()
    }

    /// The recorded VXLAN peers, `(VTEP address, node address)`; empty without a tunnel.
    pub fn peers(&self) -> Result<Vec<(Ipv4Addr, Ipv4Addr)>> {
        let Some((map, _)) = &self.peers else {
            return Ok(Vec::new());
        };
        entries(map, "read the fast path's VXLAN peer map", Ipv4Addr::from)
    }

    /// Put the sending program on a container's host veth (replacing tug's program there) and
    /// record that `address` lives behind it.
    pub async fn attach(&self, host_veth: &str, address: Ipv4Addr) -> Result<()> {
        let nl = Netlink::open()?;
        self.attach_with(&nl, host_veth, address).await
    }

    async fn attach_with(&self, nl: &Netlink, host_veth: &str, address: Ipv4Addr) -> Result<()> {
        if !self.subnet.contains(address) {
            return Err(Error::FastPath {
                what: format!("route {address} to {host_veth:?}"),
                reason: format!("the address is outside the node subnet {}", self.subnet),
            });
        }
        let index = if_index(host_veth)?;
        tc::attach(
            nl,
            index,
            host_veth,
            fd_u32(&self.from_containers),
            FROM_CONTAINERS,
        )
        .await?;
        bpf::map_update(&self.routes, &address.octets(), &index.to_ne_bytes()).map_err(Error::bpf(
            format!("record {address} in the fast path's route map"),
        ))
    }

    /// Attach every container of `allocations` (IPAM's `id -> address`) whose host veth exists:
    /// after an agent restart, containers that kept running get the new programs and their
    /// routes. Returns how many; failures are logged and skipped (those containers keep the
    /// normal path).
    pub async fn adopt(&self, allocations: &std::collections::BTreeMap<String, Ipv4Addr>) -> usize {
        let nl = match Netlink::open() {
            Ok(nl) => nl,
            Err(e) => {
                tracing::warn!(cause = %e, "running containers left on the normal path");
                return 0;
            }
        };
        let mut adopted = 0;
        for (id, address) in allocations {
            let veth = crate::container::host_veth_name(id);
            if nix::net::if_::if_nametoindex(veth.as_str()).is_err() {
                continue;
            }
            match self.attach_with(&nl, &veth, *address).await {
                Ok(()) => adopted += 1,
                Err(e) => {
                    tracing::warn!(container = %id, cause = %e, "container left on the normal path")
                }
            }
        }
        adopted
    }

    /// Forget `address` (its veth, and the filter on it, go when the container's network is
    /// deleted). Whether it was recorded.
    pub fn detach(&self, address: Ipv4Addr) -> Result<bool> {
        bpf::map_delete(&self.routes, &address.octets()).map_err(Error::bpf(format!(
            "remove {address} from the fast path's route map"
        )))
    }

    /// The recorded `(address, host veth index)` pairs.
    pub fn routes(&self) -> Result<Vec<(Ipv4Addr, u32)>> {
        entries(
            &self.routes,
            "read the fast path's route map",
            u32::from_ne_bytes,
        )
    }

    /// The packet counters.
    pub fn stats(&self) -> Result<FastPathStats> {
        let read = |slot: u32| -> Result<u64> {
            let mut value = [0u8; 8];
            bpf::map_lookup(&self.stats, &slot.to_ne_bytes(), &mut value)
                .map_err(Error::bpf("read the fast path's statistics"))?;
            Ok(u64::from_ne_bytes(value))
        };
        Ok(FastPathStats {
            to_nodes: read(programs::STAT_TO_NODES)?,
            to_containers: read(programs::STAT_TO_CONTAINERS)?,
            encapsulated: read(programs::STAT_ENCAPSULATED)?,
            decapsulated: read(programs::STAT_DECAPSULATED)?,
        })
    }
}

/// The names of tug's programs on `interface`'s ingress.
pub async fn programs_on(interface: &str) -> Result<Vec<String>> {
    let nl = Netlink::open()?;
    tc::names(&nl, if_index(interface)?, interface).await
}

/// Take tug's program off `interface`'s ingress; whether there was one.
pub async fn remove_from(interface: &str) -> Result<bool> {
    let nl = Netlink::open()?;
    tc::detach(&nl, if_index(interface)?, interface).await
}

/// Take tug's node programs ([`TO_CONTAINERS`], [`FROM_VXLAN`]) off every interface of this
/// namespace (the one a fast path is not loaded any more, or a node without one); the
/// interfaces they were on. Container veths, which carry [`FROM_CONTAINERS`] only, are not
/// looked at.
pub async fn remove_node_programs_everywhere() -> Result<Vec<String>> {
    let nl = Netlink::open()?;
    remove_node_programs(&nl, &[]).await
}

/// Take tug's node programs off every interface but those with an index in `keep`. An
/// interface that cannot be looked at or cleared (it may have gone meanwhile) is logged and
/// skipped; only failing to list the interfaces is an error.
async fn remove_node_programs(nl: &Netlink, keep: &[u32]) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for (index, name) in nl.links().await? {
        if keep.contains(&index) || name.starts_with(crate::container::HOST_VETH_PREFIX) {
            continue;
        }
        let ours = match tc::names(nl, index, &name).await {
            Ok(names) => names.iter().any(|n| n == TO_CONTAINERS || n == FROM_VXLAN),
            Err(e) => {
                tracing::debug!(interface = %name, cause = %e, "tc filters not listed");
                false
            }
        };
        if !ours {
            continue;
        }
        match tc::detach(nl, index, &name).await {
            Ok(true) => removed.push(name),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(interface = %name, cause = %e, "fast-path program not removed")
            }
        }
    }
    Ok(removed)
}

/// The entries of a map keyed by IPv4 address with 4-byte values (read by `value`), sorted.
fn entries<V: Ord>(
    map: &bpf::Map,
    what: &str,
    value: fn([u8; 4]) -> V,
) -> Result<Vec<(Ipv4Addr, V)>> {
    let mut out = Vec::new();
    for key in bpf::map_keys::<4>(map).map_err(Error::bpf(what))? {
        let mut bytes = [0u8; 4];
        if bpf::map_lookup(map, &key, &mut bytes).map_err(Error::bpf(what))? {
            out.push((Ipv4Addr::from(key), value(bytes)));
        }
    }
    out.sort();
    Ok(out)
}

fn load(name: &str, insns: std::result::Result<Vec<asm::Insn>, asm::AsmError>) -> Result<OwnedFd> {
    let insns = insns.map_err(|e| Error::FastPath {
        what: format!("assemble program {name}"),
        reason: e.to_string(),
    })?;
    bpf::prog_load(name, &insns, LICENSE).map_err(|e| Error::BpfLoad {
        program: name.to_string(),
        source: e.source,
        log: e.log,
    })
}

fn fd_u32(fd: &OwnedFd) -> u32 {
    // Descriptors are never negative.
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

fn if_index(interface: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(interface).map_err(|e| Error::Bpf {
        what: format!("find interface {interface:?} for the fast path"),
        source: e.into(),
    })
}
