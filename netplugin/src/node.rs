//! Node setup: the bridge every container's veth hangs off, its gateway address, its MAC (fixed,
//! derived from the gateway address like a container's), its MTU and IP forwarding. Run at every agent start; it converges instead of failing on what is already
//! there.
//!
//! A bridge that holds other IPv4 addresses than the node subnet's gateway is *corrected*: the
//! stray addresses are removed and the right one added. The subnet comes from the controller,
//! which is the authority (a node that re-registers and gets another subnet must converge without
//! an operator), and the bridge name is tug's own. A link with the bridge's name that is not a
//! bridge is an error, since it belongs to someone else.

use std::path::Path;

use rtnetlink::LinkBridge;
use rtnetlink::packet_route::link::InfoKind;

use crate::big_tcp;
use crate::container::container_mac;
use crate::error::{Error, Result};
use crate::netlink::{Netlink, format_mac};
use crate::subnet::Subnet;

/// The default bridge name.
pub const DEFAULT_BRIDGE: &str = "tug0";
/// MTU used when no uplink is named.
pub const DEFAULT_MTU: u32 = 1500;
/// VXLAN's encapsulation overhead over IPv4 (outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// How packets reach other nodes; decides the MTU containers get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Plain routes via the peer node's address: no overhead.
    #[default]
    HostGw,
    /// Encapsulated in VXLAN: the uplink MTU less [`VXLAN_OVERHEAD`].
    Vxlan,
}

/// What node setup needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The bridge's name (at most 15 bytes), normally [`DEFAULT_BRIDGE`].
    pub bridge: String,
    /// The node's subnet: the bridge gets its first address.
    pub subnet: Subnet,
    /// The interface towards the other nodes; its MTU sets the bridge's. `None`: 1500.
    pub uplink: Option<String>,
    /// The cross-host mode.
    pub mode: Mode,
    /// Raise the uplink's IPv4 GSO/GRO limit for BIG TCP (see [`crate::big_tcp`]).
    pub big_tcp: bool,
}

/// What node setup found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSetup {
    /// The bridge's interface index.
    pub bridge_index: u32,
    /// The MTU the bridge (and every container veth) uses.
    pub mtu: u32,
    /// The IPv4 GSO/GRO limit container veths get ([`crate::ContainerNet::gso_ipv4_max_size`]);
    /// `None`: the kernel's default, 64 KiB.
    pub gso_ipv4_max_size: Option<u32>,
    /// Whether anything had to be changed (false on a node that was already set up).
    pub changed: bool,
}

/// Create or correct the bridge and turn on forwarding, in the calling thread's network
/// namespace. Idempotent.
#[tracing::instrument(skip_all, fields(bridge = %cfg.bridge, subnet = %cfg.subnet))]
pub async fn setup_node(cfg: &NodeConfig) -> Result<NodeSetup> {
    let nl = Netlink::open()?;
    check_clash(&nl, cfg).await?;
    let mtu = node_mtu(&nl, cfg).await?;
    let mac = container_mac(cfg.subnet.gateway());
    let mut changed = false;

    let bridge = match nl.link_by_name(&cfg.bridge).await? {
        Some(link) => link,
        None => {
            nl.handle
                .link()
                .add(
                    LinkBridge::new(&cfg.bridge)
                        .mtu(mtu)
                        .address(mac.to_vec())
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(Error::netlink(format!("create bridge {:?}", cfg.bridge)))?;
            changed = true;
            tracing::info!(mtu, "bridge created");
            nl.require_link(&cfg.bridge, " (it vanished right after it was created)")
                .await?
        }
    };
    match &bridge.kind {
        Some(InfoKind::Bridge) => {}
        other => {
            return Err(Error::NotABridge {
                name: cfg.bridge.clone(),
                kind: other.as_ref().map_or_else(
                    || "plain device".to_string(),
                    |k| format!("{k:?}").to_lowercase(),
                ),
            });
        }
    }

    if bridge.mtu != Some(mtu) {
        nl.handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(bridge.index)
                    .mtu(mtu)
                    .build(),
            )
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "set the MTU of bridge {:?} to {mtu}",
                cfg.bridge
            )))?;
        tracing::info!(from = ?bridge.mtu, to = mtu, "bridge MTU corrected");
        changed = true;
    }

    if bridge.mac.as_deref() != Some(&mac[..]) {
        // Set explicitly, a bridge keeps its MAC; otherwise it takes the lowest of its ports'
        // and changes as containers come and go, leaving containers' neighbour caches stale.
        nl.handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(bridge.index)
                    .address(mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "set the MAC of bridge {:?} to {}",
                cfg.bridge,
                format_mac(&mac)
            )))?;
        tracing::info!(mac = %format_mac(&mac), "bridge MAC set");
        changed = true;
    }

    changed |= converge_address(&nl, cfg, bridge.index).await?;

    if !bridge.up {
        nl.set_up(bridge.index, &cfg.bridge).await?;
        changed = true;
    }

    let (gso_ipv4_max_size, gso_changed) = big_tcp::converge(&nl, cfg, &bridge).await?;
    changed |= gso_changed;

    changed |= enable_forwarding(Path::new(IP_FORWARD))?;

    Ok(NodeSetup {
        bridge_index: bridge.index,
        mtu,
        gso_ipv4_max_size,
        changed,
    })
}

/// Refuses a subnet that overlaps an address of another interface of the node (its LAN, a VPN):
/// containers would shadow or be shadowed by it. Nothing is created then.
async fn check_clash(nl: &Netlink, cfg: &NodeConfig) -> Result<()> {
    let bridge = nl.link_by_name(&cfg.bridge).await?.map(|l| l.index);
    for (index, addr, prefix) in nl.all_ipv4_addresses().await? {
        // The bridge is ours, and so is the subnet's network address as a /32: the VXLAN
        // device's (see `vxlan::setup_vxlan`).
        let vtep = addr == cfg.subnet.network() && prefix == 32;
        if Some(index) == bridge || addr.is_loopback() || vtep {
            continue;
        }
        let theirs = Subnet::new(addr, prefix)?;
        if theirs.overlaps(&cfg.subnet) {
            let link = nl
                .link_name(index)
                .await?
                .unwrap_or_else(|| format!("#{index}"));
            return Err(Error::SubnetClash {
                subnet: cfg.subnet,
                address: format!("{addr}/{prefix}"),
                link,
            });
        }
    }
    Ok(())
}

/// The uplink's MTU (less the overlay overhead in vxlan mode), or the default.
async fn node_mtu(nl: &Netlink, cfg: &NodeConfig) -> Result<u32> {
    let base = match &cfg.uplink {
        None => DEFAULT_MTU,
        Some(name) => {
            let link = nl
                .require_link(name, " (it was given as the uplink interface)")
                .await?;
            link.mtu.unwrap_or(DEFAULT_MTU)
        }
    };
    Ok(match cfg.mode {
        Mode::HostGw => base,
        Mode::Vxlan => base.saturating_sub(VXLAN_OVERHEAD),
    })
}

/// The name of the interface holding `addr` (the node's uplink, whose MTU the bridge takes), in
/// the calling thread's network namespace.
pub async fn interface_with_address(addr: std::net::Ipv4Addr) -> Result<Option<String>> {
    let nl = Netlink::open()?;
    match nl.link_index_with_address(addr).await? {
        Some(index) => nl.link_name(index).await,
        None => Ok(None),
    }
}

/// Make the gateway address the bridge's only IPv4 address. Returns whether it changed anything.
async fn converge_address(nl: &Netlink, cfg: &NodeConfig, index: u32) -> Result<bool> {
    let want = (cfg.subnet.gateway(), cfg.subnet.prefix());
    let have = nl.ipv4_addresses(index, &cfg.bridge).await?;
    let mut changed = false;
    for (addr, prefix) in have.iter().copied().filter(|a| *a != want) {
        tracing::warn!(%addr, prefix, want = %format!("{}/{}", want.0, want.1), "removing a stray address from the bridge");
        nl.del_ipv4_address(index, addr, prefix, &cfg.bridge)
            .await?;
        changed = true;
    }
    if !have.contains(&want) {
        nl.handle
            .address()
            .add(index, want.0.into(), want.1)
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "add address {}/{} to bridge {:?}",
                want.0, want.1, cfg.bridge
            )))?;
        changed = true;
    }
    Ok(changed)
}

/// Write `1` to the forwarding sysctl unless it is already on. The file under `/proc/sys/net`
/// is the current thread's network namespace's, so this affects the namespace being set up.
fn enable_forwarding(path: &Path) -> Result<bool> {
    let now = std::fs::read_to_string(path).map_err(Error::io("read", path))?;
    if now.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(path, b"1\n").map_err(Error::io("turn on IP forwarding through", path))?;
    tracing::info!("IP forwarding turned on");
    Ok(true)
}
