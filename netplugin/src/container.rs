//! Per-container networking with CNI semantics: `add` wires a container's network namespace to
//! the node bridge, `del` removes all of it, `check` reports drift.
//!
//! `add` makes the veth pair with a single netlink request: the host end is created on the bridge,
//! up, with the bridge's MTU, and the peer is created directly inside the container's namespace
//! (named by an open fd of the namespace file) as `eth0`. That is the same end state as creating
//! the pair on the host and moving the peer, but needs no temporary name that could clash on the
//! host and cannot leave a half-moved peer behind. Address, loopback and default route are then
//! set from a helper thread inside the namespace (see [`crate::netns`]).
//!
//! The host end's name is derived from the container id (`tv` + 13 hex digits of its SHA-256), so
//! `del` and `check` find it from the id alone, even after an agent restart.

use std::fmt;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use nix::errno::Errno;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{LinkBridgePort, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use sha2::{Digest, Sha256};

use crate::big_tcp::{self, LEGACY_SIZE};
use crate::error::{Error, Result};
use crate::ipam::{Ipam, validate_id};
use crate::netlink::{Link, Netlink, format_mac, is_errno, with_ipv4_gso_gro_limit};
use crate::netns::{in_netns, open_netns};
use crate::node::DEFAULT_MTU;
use crate::subnet::Subnet;

/// The interface name inside the container.
pub const CONTAINER_IFNAME: &str = "eth0";
/// Prefix of every host-side veth this plugin makes.
pub const HOST_VETH_PREFIX: &str = "tv";

/// One container's network request: the same value is passed to `add`, `del` and `check`, as a
/// CNI runtime passes the same configuration to each command.
#[derive(Debug, Clone)]
pub struct ContainerNet {
    /// The container's id: keys its address and names its host veth.
    pub id: String,
    /// The container's network namespace file (`/proc/PID/ns/net` or a bind mount of it).
    pub netns_path: PathBuf,
    /// The node bridge (see [`crate::node::NodeConfig::bridge`]).
    pub bridge: String,
    /// The node subnet addresses come from.
    pub subnet: Subnet,
    /// Where IPAM keeps its state (in the agent's data dir).
    pub state_dir: PathBuf,
    /// The IPv4 GSO/GRO limit of both veth ends, from [`crate::NodeSetup::gso_ipv4_max_size`];
    /// `None`: the kernel's default, 64 KiB (see [`crate::big_tcp`]).
    pub gso_ipv4_max_size: Option<u32>,
}

/// What `add` gave the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The container's address on `eth0`.
    pub address: Ipv4Addr,
    /// Its prefix length (the node subnet's).
    pub prefix: u8,
    /// The default gateway: the bridge's address.
    pub gateway: Ipv4Addr,
    /// `eth0`'s hardware address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The host end's interface name.
    pub host_veth: String,
}

/// The MAC address `eth0` gets: `0a:58` (locally administered, unicast) and the container's
/// address, as CNI's bridge plugin and Kubernetes do. The same address always gets the same MAC,
/// so a neighbour cache never holds a dead container's MAC for a new one's address, and the
/// fast path (see [`crate::fastpath`]) can address a container knowing only its IP address.
pub fn container_mac(address: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = address.octets();
    [0x0a, 0x58, a, b, c, d]
}

/// The host-side veth name for a container id: `tv` + 13 hex digits (15 bytes, the kernel's
/// limit), stable across restarts.
pub fn host_veth_name(id: &str) -> String {
    let digest = hex::encode(Sha256::digest(id.as_bytes()));
    format!("{HOST_VETH_PREFIX}{}", &digest[..13])
}

/// Wire the container into the node bridge. Run in the node's network namespace, after node
/// setup. Calling it again for the same id rebuilds the veth and keeps the address. On failure
/// everything this call made is removed again.
#[tracing::instrument(skip_all, fields(container.id = %net.id, netns = %net.netns_path.display()))]
pub async fn add(net: &ContainerNet) -> Result<Attachment> {
    validate_id(&net.id)?;
    let nl = Netlink::open()?;
    let bridge = nl
        .require_link(
            &net.bridge,
            " (node setup must run before containers are added)",
        )
        .await?;
    let ipam = Ipam::open(&net.state_dir, net.subnet)?;
    let address = ipam.allocate(&net.id)?;
    let host_veth = host_veth_name(&net.id);
    match wire(
        &nl,
        net,
        bridge.index,
        bridge.mtu.unwrap_or(DEFAULT_MTU),
        address,
        &host_veth,
    )
    .await
    {
        Ok(mac) => {
            tracing::info!(%address, %host_veth, "container network added");
            Ok(Attachment {
                address,
                prefix: net.subnet.prefix(),
                gateway: net.subnet.gateway(),
                mac,
                host_veth,
            })
        }
        Err(err) => {
            if let Err(cleanup) = nl.delete_link(&host_veth).await {
                tracing::warn!(%cleanup, "could not remove the veth of a failed add");
            }
            if let Err(cleanup) = ipam.release(&net.id) {
                tracing::warn!(%cleanup, "could not release the address of a failed add");
            }
            Err(err)
        }
    }
}

/// Create the veth pair and configure `eth0`; returns `eth0`'s MAC.
async fn wire(
    nl: &Netlink,
    net: &ContainerNet,
    bridge_index: u32,
    mtu: u32,
    address: Ipv4Addr,
    host_veth: &str,
) -> Result<String> {
    if nl.delete_link(host_veth).await? {
        tracing::info!(%host_veth, "replaced the veth of an earlier add");
    }
    let netns = open_netns(&net.netns_path)?;
    let peer = LinkUnspec::new_with_name(CONTAINER_IFNAME)
        .mtu(mtu)
        .address(container_mac(address).to_vec())
        .setns_by_fd(netns.as_raw_fd());
    // Both ends take the limit in the request that creates the pair, at no extra cost.
    let peer = with_ipv4_gso_gro_limit(peer, net.gso_ipv4_max_size).build();
    let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(host_veth)
        .mtu(mtu)
        .controller(bridge_index)
        .up();
    let veth = with_ipv4_gso_gro_limit(veth, net.gso_ipv4_max_size)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    match nl.handle.link().add(veth).execute().await {
        Ok(()) => {}
        Err(err) if is_errno(&err, Errno::EEXIST) => {
            return Err(Error::Eth0Exists {
                id: net.id.clone(),
                netns: net.netns_path.clone(),
            });
        }
        Err(err) => {
            return Err(Error::netlink(format!(
                "create veth {host_veth:?} for container {} on bridge {:?}",
                net.id, net.bridge
            ))(err));
        }
    }
    drop(netns);
    set_hairpin(nl, host_veth).await?;
    if let Some(size) = net.gso_ipv4_max_size {
        big_tcp::raise_bridge(nl, &net.bridge, size).await;
    }

    let prefix = net.subnet.prefix();
    let gateway = net.subnet.gateway();
    in_netns(&net.netns_path, move || {
        configure_inside(address, prefix, gateway)
    })
    .await
}

/// Put a container's host veth into hairpin mode: a container reaching its own published port
/// at the node's address gets the translated request back out of the port it came in on (the
/// bridge, `br_netfilter` translating there, would drop it); `crate::nat` masquerades it so the
/// answer returns through conntrack. The kernel takes port settings only on an existing port.
async fn set_hairpin(nl: &Netlink, host_veth: &str) -> Result<()> {
    nl.handle
        .link()
        .set_port(LinkBridgePort::new(0).name(host_veth).hairpin(true).build())
        .execute()
        .await
        .map_err(Error::netlink(format!(
            "set hairpin mode on bridge port {host_veth:?}"
        )))
}

/// Bring the host veths of running containers `ids` to what [`add`] gives them now, for
/// containers wired by an earlier agent: hairpin mode (an earlier version did without it) and
/// the IPv4 GSO/GRO limit node setup chose (`size`; `None`: 64 KiB), so that packets forwarded
/// to them are not segmented at their veth. Their `eth0` keeps its limit (the size of the
/// packets they send) until they restart: said in a warning. One lookup per container, and
/// only what differs is changed. Containers without a veth are skipped, a failure is logged and
/// skipped. Run in the node's network namespace.
pub async fn ensure_running<'a>(ids: impl IntoIterator<Item = &'a String>, size: Option<u32>) {
    let want = size.unwrap_or(LEGACY_SIZE);
    let nl = match Netlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            tracing::warn!(cause = %e, "running containers' veths left as they are");
            return;
        }
    };
    let mut limits_changed = 0;
    for id in ids {
        let veth = host_veth_name(id);
        let Ok(Some(link)) = nl.link_by_name(&veth).await else {
            continue;
        };
        if link.hairpin != Some(true)
            && let Err(e) = set_hairpin(&nl, &veth).await
        {
            tracing::warn!(container = %id, cause = %e, "no hairpin mode: the container cannot reach its own published port at the node's address");
        }
        let Some(have) = link.gso_ipv4_max_size.filter(|have| *have != want) else {
            continue;
        };
        match nl.set_ipv4_gso_gro_limit(link.index, &veth, want).await {
            Ok(()) => limits_changed += 1,
            Err(e) => {
                tracing::warn!(container = %id, have, want, cause = %e, "could not set the IPv4 GSO/GRO limit of a running container's veth")
            }
        }
    }
    if limits_changed > 0 {
        tracing::warn!(
            containers = limits_changed,
            limit = want,
            "running containers' host veths took the node's new IPv4 GSO/GRO limit; their eth0 keeps the old one until they restart"
        );
    }
}

/// Inside the container's namespace: `lo` up, address on `eth0`, `eth0` up, default route.
async fn configure_inside(address: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Result<String> {
    let nl = Netlink::open()?;
    if let Some(lo) = nl.link_by_name("lo").await? {
        nl.set_up(lo.index, "lo").await?;
    }
    let eth0 = nl
        .require_link(
            CONTAINER_IFNAME,
            " in the container's namespace right after it was created there",
        )
        .await?;
    nl.handle
        .address()
        .add(eth0.index, address.into(), prefix)
        .replace()
        .execute()
        .await
        .map_err(Error::netlink(format!(
            "add address {address}/{prefix} to eth0"
        )))?;
    nl.set_up(eth0.index, CONTAINER_IFNAME).await?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(eth0.index)
        .build();
    nl.handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(Error::netlink(format!(
            "add the default route via {gateway} on eth0"
        )))?;
    Ok(eth0.mac.as_deref().map(format_mac).unwrap_or_default())
}

/// Remove what `add` made: the host veth (its peer `eth0` goes with it) and the address. Works
/// when the namespace is already gone (the kernel then removed the pair) and when called twice.
#[tracing::instrument(skip_all, fields(container.id = %net.id))]
pub async fn del(net: &ContainerNet) -> Result<()> {
    validate_id(&net.id)?;
    let nl = Netlink::open()?;
    let host_veth = host_veth_name(&net.id);
    let removed = nl.delete_link(&host_veth).await?;
    let ipam = Ipam::open(&net.state_dir, net.subnet)?;
    let released = ipam.release(&net.id)?;
    tracing::info!(veth_removed = removed, address = ?released, "container network deleted");
    Ok(())
}

/// Compare the container's network with what `add` makes; [`Error::Drift`] lists every
/// difference.
#[tracing::instrument(skip_all, fields(container.id = %net.id))]
pub async fn check(net: &ContainerNet) -> Result<()> {
    validate_id(&net.id)?;
    let mut drift = Vec::new();
    let ipam = Ipam::open(&net.state_dir, net.subnet)?;
    let address = ipam.get(&net.id)?;
    if address.is_none() {
        drift.push(DriftItem::NoAddress);
    }

    let nl = Netlink::open()?;
    let host_veth = host_veth_name(&net.id);
    let bridge = nl.link_by_name(&net.bridge).await?;
    match nl.link_by_name(&host_veth).await? {
        None => drift.push(DriftItem::HostVethMissing(host_veth.clone())),
        Some(link) => {
            if !link.up {
                drift.push(DriftItem::HostVethDown(host_veth.clone()));
            }
            if bridge.as_ref().map(|b| b.index) != link.controller.filter(|c| *c != 0) {
                drift.push(DriftItem::HostVethOffBridge {
                    veth: host_veth.clone(),
                    bridge: net.bridge.clone(),
                });
            } else if link.hairpin != Some(true) {
                drift.push(DriftItem::HairpinOff(host_veth.clone()));
            }
            let want = net.gso_ipv4_max_size.unwrap_or(LEGACY_SIZE);
            drift.extend(gso_drift(&link, &host_veth, want));
        }
    }

    match open_netns(&net.netns_path) {
        Err(_) => drift.push(DriftItem::NetnsGone(net.netns_path.clone())),
        Ok(_) => {
            let want = address.map(|a| (a, net.subnet.prefix()));
            let gateway = net.subnet.gateway();
            let limit = net.gso_ipv4_max_size.unwrap_or(LEGACY_SIZE);
            drift.extend(
                in_netns(&net.netns_path, move || check_inside(want, gateway, limit)).await?,
            );
        }
    }

    if drift.is_empty() {
        Ok(())
    } else {
        Err(Error::Drift {
            id: net.id.clone(),
            drift: Drift(drift),
        })
    }
}

async fn check_inside(
    want: Option<(Ipv4Addr, u8)>,
    gateway: Ipv4Addr,
    limit: u32,
) -> Result<Vec<DriftItem>> {
    let nl = Netlink::open()?;
    let mut drift = Vec::new();
    if !nl.link_by_name("lo").await?.is_some_and(|lo| lo.up) {
        drift.push(DriftItem::LoopbackDown);
    }
    let Some(eth0) = nl.link_by_name(CONTAINER_IFNAME).await? else {
        drift.push(DriftItem::Eth0Missing);
        return Ok(drift);
    };
    if !eth0.up {
        drift.push(DriftItem::Eth0Down);
    }
    drift.extend(gso_drift(&eth0, CONTAINER_IFNAME, limit));
    if let Some((addr, prefix)) = want {
        let have = nl.ipv4_addresses(eth0.index, CONTAINER_IFNAME).await?;
        if !have.contains(&(addr, prefix)) {
            drift.push(DriftItem::AddressMissing { addr, prefix });
        }
    }
    let routes = nl.main_ipv4_routes().await?;
    if !routes
        .iter()
        .any(|r| r.prefix == 0 && r.gateway == Some(gateway))
    {
        drift.push(DriftItem::DefaultRouteMissing(gateway));
    }
    Ok(drift)
}

/// A veth end `name` (`link`) whose IPv4 GSO limit is not `want`; nothing on a kernel without
/// the limit.
fn gso_drift(link: &Link, name: &str, want: u32) -> Option<DriftItem> {
    let have = link.gso_ipv4_max_size.filter(|have| *have != want)?;
    Some(DriftItem::GsoLimit {
        veth: name.to_string(),
        want,
        have,
    })
}

/// Every difference `check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift(pub Vec<DriftItem>);

/// One difference between a container's network and what `add` makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftItem {
    /// IPAM holds no address for the container.
    NoAddress,
    /// The host end of the veth pair is gone.
    HostVethMissing(String),
    /// The host end exists but is down.
    HostVethDown(String),
    /// The host end is not a port of the bridge.
    HostVethOffBridge { veth: String, bridge: String },
    /// The host end's bridge port is not in hairpin mode (the container cannot reach its own
    /// published port at the node's address).
    HairpinOff(String),
    /// A veth end's IPv4 GSO limit (the host end's, or `eth0`'s inside) is not the one asked
    /// for (see [`crate::big_tcp`]).
    GsoLimit { veth: String, want: u32, have: u32 },
    /// The container's namespace file no longer opens.
    NetnsGone(PathBuf),
    /// `lo` is down (or missing) inside.
    LoopbackDown,
    /// `eth0` is gone inside.
    Eth0Missing,
    /// `eth0` is down.
    Eth0Down,
    /// `eth0` lacks the allocated address.
    AddressMissing { addr: Ipv4Addr, prefix: u8 },
    /// No default route via the bridge.
    DefaultRouteMissing(Ipv4Addr),
}

impl fmt::Display for DriftItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriftItem::NoAddress => write!(f, "IPAM holds no address for it"),
            DriftItem::HostVethMissing(v) => write!(f, "host veth {v} is missing"),
            DriftItem::HostVethDown(v) => write!(f, "host veth {v} is down"),
            DriftItem::HostVethOffBridge { veth, bridge } => {
                write!(f, "host veth {veth} is not attached to bridge {bridge}")
            }
            DriftItem::HairpinOff(v) => write!(f, "bridge port {v} is not in hairpin mode"),
            DriftItem::GsoLimit { veth, want, have } => {
                write!(f, "{veth} has an IPv4 GSO limit of {have}, not {want}")
            }
            DriftItem::NetnsGone(p) => write!(f, "network namespace {} is gone", p.display()),
            DriftItem::LoopbackDown => write!(f, "lo is down"),
            DriftItem::Eth0Missing => write!(f, "eth0 is missing"),
            DriftItem::Eth0Down => write!(f, "eth0 is down"),
            DriftItem::AddressMissing { addr, prefix } => {
                write!(f, "eth0 lacks address {addr}/{prefix}")
            }
            DriftItem::DefaultRouteMissing(gw) => write!(f, "there is no default route via {gw}"),
        }
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{item}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_stable_and_short() {
        let a = host_veth_name("4f1c-replica-1");
        assert_eq!(a, host_veth_name("4f1c-replica-1"));
        assert_ne!(a, host_veth_name("4f1c-replica-2"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with(HOST_VETH_PREFIX));
    }
}
