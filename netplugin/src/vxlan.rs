//! vxlan mode: one VXLAN device per node; per peer a route to its subnet via the peer's VTEP
//! address (the peer subnet's network address, held on the peer's VXLAN device), a permanent
//! neighbour entry mapping that address to the peer's VTEP MAC, and an FDB entry sending that MAC
//! to the peer node's address. No multicast and no learning: everything is programmed from the
//! node list.
//!
//! The VTEP MAC is derived from the node's subnet ([`vtep_mac`]), which the controller already
//! hands out uniquely, so peers need nothing beyond `(subnet, node address)`: the same input as
//! host-gw.
//!
//! An existing device with the configured name is reused (its MAC, MTU, address and state
//! corrected); a different VNI or port on it is not detected: remove the device to change those.

use std::net::{IpAddr, Ipv4Addr};

use nix::errno::Errno;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::{LinkUnspec, LinkVxlan};

use crate::error::{Error, Result};
use crate::netlink::{Netlink, is_errno};
use crate::routes::{HostGwConfig, PeerRoute, RouteSync, reconcile, validate};
use crate::subnet::Subnet;

/// The default VXLAN device name.
pub const DEFAULT_DEVICE: &str = "tug.vxlan";
/// The IANA VXLAN port.
pub const DEFAULT_PORT: u16 = 4789;
/// tug's VXLAN network identifier.
pub const DEFAULT_VNI: u32 = 4242;

/// What the VXLAN device needs.
#[derive(Debug, Clone)]
pub struct VxlanConfig {
    /// The device name (at most 15 bytes).
    pub device: String,
    /// The VXLAN network identifier, the same on every node.
    pub vni: u32,
    /// The UDP port, the same on every node.
    pub port: u16,
    /// This node's address: the outer source of encapsulated packets.
    pub local: Ipv4Addr,
    /// The interface encapsulated packets leave by, if it should be pinned.
    pub uplink: Option<String>,
    /// The device MTU: the bridge's (the uplink's less [`crate::node::VXLAN_OVERHEAD`]).
    pub mtu: u32,
    /// The cluster CIDR and this node's subnet.
    pub subnets: HostGwConfig,
}

/// The VTEP MAC of the node owning `subnet`: locally administered, unicast (`0a:58`), then the
/// subnet's network address.
pub fn vtep_mac(subnet: Subnet) -> [u8; 6] {
    let [a, b, c, d] = subnet.network().octets();
    [0x0a, 0x58, a, b, c, d]
}

/// Create or correct this node's VXLAN device, in the calling thread's network namespace.
#[tracing::instrument(skip_all, fields(device = %cfg.device))]
pub async fn setup_vxlan(cfg: &VxlanConfig) -> Result<u32> {
    let nl = Netlink::open()?;
    let mac = vtep_mac(cfg.subnets.own_subnet);
    let link = match nl.link_by_name(&cfg.device).await? {
        Some(link) if link.kind == Some(InfoKind::Vxlan) => link,
        Some(link) => {
            return Err(Error::NotAVxlan {
                name: cfg.device.clone(),
                kind: format!("{:?}", link.kind).to_lowercase(),
            });
        }
        None => {
            let mut builder = LinkVxlan::new(&cfg.device, cfg.vni)
                .port(cfg.port)
                .local(cfg.local)
                .learning(false);
            if let Some(uplink) = &cfg.uplink {
                let up = nl
                    .require_link(uplink, " (it was given as the uplink interface)")
                    .await?;
                builder = builder.dev(up.index);
            }
            nl.handle
                .link()
                .add(builder.build())
                .execute()
                .await
                .map_err(Error::netlink(format!(
                    "create VXLAN device {:?}",
                    cfg.device
                )))?;
            tracing::info!(vni = cfg.vni, "VXLAN device created");
            nl.require_link(&cfg.device, " (it vanished right after it was created)")
                .await?
        }
    };
    if link.mac.as_deref() != Some(&mac[..]) || link.mtu != Some(cfg.mtu) || !link.up {
        nl.handle
            .link()
            .set(
                LinkUnspec::new_with_index(link.index)
                    .address(mac.to_vec())
                    .mtu(cfg.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "set the MAC, MTU and state of VXLAN device {:?}",
                cfg.device
            )))?;
    }
    let want = (cfg.subnets.own_subnet.network(), 32);
    let have = nl.ipv4_addresses(link.index, &cfg.device).await?;
    for (addr, prefix) in have.iter().copied().filter(|a| *a != want) {
        nl.del_ipv4_address(link.index, addr, prefix, &cfg.device)
            .await?;
    }
    if !have.contains(&want) {
        nl.handle
            .address()
            .add(link.index, want.0.into(), want.1)
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "add address {}/32 to VXLAN device {:?}",
                want.0, cfg.device
            )))?;
    }
    Ok(link.index)
}

/// Program route, neighbour and FDB entry for every peer `(subnet, node address)` and remove
/// those of subnets that are no longer peers (only tug's routes, as in host-gw).
#[tracing::instrument(skip_all, fields(device = %cfg.device, peers = peers.len()))]
pub async fn sync_vxlan_peers(
    cfg: &VxlanConfig,
    peers: &[(Subnet, Ipv4Addr)],
) -> Result<RouteSync> {
    let wanted = validate(&cfg.subnets, peers)?;
    let nl = Netlink::open()?;
    let dev = nl
        .require_link(&cfg.device, " (set up the VXLAN device first)")
        .await?;
    let mut routes = Vec::with_capacity(wanted.len());
    for (subnet, node) in wanted {
        let vtep = subnet.network();
        let mac = vtep_mac(subnet);
        // FDB and neighbour entries are replaced every time: cheap, and it repairs them
        nl.handle
            .neighbours()
            .add_bridge(dev.index, &mac)
            .destination(IpAddr::V4(node))
            .flags(NeighbourFlags::Own)
            .replace()
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "add the FDB entry for peer {subnet} (node {node}) on {:?}",
                cfg.device
            )))?;
        nl.handle
            .neighbours()
            .add(dev.index, IpAddr::V4(vtep))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "add the neighbour entry for peer {subnet}'s VTEP {vtep}"
            )))?;
        routes.push(PeerRoute {
            subnet,
            gateway: vtep,
            device: Some(dev.index),
        });
    }
    let sync = reconcile(&nl, cfg.subnets.cluster_cidr, routes).await?;
    for subnet in &sync.removed {
        delete_neighbour(&nl, dev.index, *subnet).await?;
    }
    Ok(sync)
}

/// Remove a former peer's neighbour and FDB entries; missing ones are fine.
async fn delete_neighbour(nl: &Netlink, index: u32, subnet: Subnet) -> Result<()> {
    let mac = vtep_mac(subnet);
    let mut neigh = NeighbourMessage::default();
    neigh.header.family = AddressFamily::Inet;
    neigh.header.ifindex = index;
    neigh
        .attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            subnet.network(),
        )));
    let mut fdb = NeighbourMessage::default();
    fdb.header.family = AddressFamily::Bridge;
    fdb.header.ifindex = index;
    fdb.header.flags = NeighbourFlags::Own;
    fdb.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    for (what, msg) in [("neighbour", neigh), ("FDB", fdb)] {
        match nl.handle.neighbours().del(msg).execute().await {
            Ok(()) => {}
            Err(err) if is_errno(&err, Errno::ENOENT) => {}
            Err(err) => {
                return Err(Error::netlink(format!(
                    "remove the {what} entry of former peer subnet {subnet}"
                ))(err));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::test_subnet;

    #[test]
    fn vtep_macs_are_unicast_local_and_distinct() {
        let a = vtep_mac(test_subnet("10.88.1.0/24"));
        let b = vtep_mac(test_subnet("10.88.2.0/24"));
        assert_eq!(a, [0x0a, 0x58, 10, 88, 1, 0]);
        assert_ne!(a, b);
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    }
}
