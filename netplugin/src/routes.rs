//! host-gw: a route to every peer node's subnet via that node's address, for nodes that share an
//! L2 segment. Routes this plugin makes carry their own routing protocol number
//! ([`RTPROT_TUG`]), and only routes with that number inside the cluster CIDR are ever changed or
//! removed: routes of the operator, DHCP or another plugin are left alone, even when they point
//! into the cluster CIDR.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::RouteProtocol;

use crate::error::{Error, Result};
use crate::netlink::{Netlink, Route};
use crate::subnet::Subnet;

/// The routing protocol number (`proto 167` in `ip route`) that marks tug's routes. Unassigned
/// in iproute2's `rt_protos` list.
pub const RTPROT_TUG: u8 = 0xa7;

/// The subnets host-gw routing works within.
#[derive(Debug, Clone, Copy)]
pub struct HostGwConfig {
    /// Every node subnet lies inside it; tug's routes outside it are not its concern.
    pub cluster_cidr: Subnet,
    /// This node's own subnet (on the bridge, never routed to a peer).
    pub own_subnet: Subnet,
}

/// What a sync changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSync {
    /// Peer subnets that got a route (new, or a new next hop).
    pub added: Vec<Subnet>,
    /// tug routes removed because their subnet is no longer a peer's.
    pub removed: Vec<Subnet>,
    /// Peer subnets left without a tug route because a route not made by tug already covers
    /// exactly that subnet.
    pub foreign: Vec<Subnet>,
}

/// Make this node's tug routes exactly one per peer `(subnet, node address)`, in the calling
/// thread's network namespace. Input is checked in full before anything changes.
#[tracing::instrument(skip_all, fields(own = %cfg.own_subnet, peers = peers.len()))]
pub async fn sync_peer_routes(
    cfg: &HostGwConfig,
    peers: &[(Subnet, Ipv4Addr)],
) -> Result<RouteSync> {
    let wanted = validate(cfg, peers)?;
    let nl = Netlink::open()?;
    let routes = wanted
        .into_iter()
        .map(|(subnet, via)| PeerRoute {
            subnet,
            gateway: via,
            device: None,
        })
        .collect();
    reconcile(&nl, cfg.cluster_cidr, routes).await
}

/// A route tug wants to a peer subnet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerRoute {
    pub(crate) subnet: Subnet,
    pub(crate) gateway: Ipv4Addr,
    /// the device the gateway is on-link through (vxlan); `None`: the kernel finds it (host-gw)
    pub(crate) device: Option<u32>,
}

/// Make tug's routes into the cluster CIDR exactly `wanted`: add or replace what differs, remove
/// tug routes to other subnets, leave every route that is not tug's alone.
pub(crate) async fn reconcile(
    nl: &Netlink,
    cluster_cidr: Subnet,
    wanted: Vec<PeerRoute>,
) -> Result<RouteSync> {
    let (ours, foreign) = classify(nl.main_ipv4_routes().await?, cluster_cidr);
    let mut sync = RouteSync::default();

    for want in &wanted {
        let PeerRoute {
            subnet,
            gateway,
            device,
        } = *want;
        if ours
            .get(&subnet)
            .is_some_and(|r| r.gateway == Some(gateway) && (device.is_none() || r.oif == device))
        {
            continue;
        }
        if foreign.contains_key(&subnet) && !ours.contains_key(&subnet) {
            tracing::warn!(%subnet, "a route not made by tug covers this peer subnet; leaving it");
            sync.foreign.push(subnet);
            continue;
        }
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(subnet.network(), subnet.prefix())
            .gateway(gateway)
            .protocol(RouteProtocol::from(RTPROT_TUG));
        if let Some(index) = device {
            msg = msg.output_interface(index).onlink();
        }
        let hint = if device.is_none() {
            " (is it on a directly connected network?)"
        } else {
            ""
        };
        nl.handle
            .route()
            .add(msg.build())
            .replace()
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "add the route to peer subnet {subnet} via {gateway}{hint}"
            )))?;
        tracing::info!(%subnet, %gateway, "peer route set");
        sync.added.push(subnet);
    }

    for (subnet, route) in ours {
        if wanted.iter().any(|w| w.subnet == subnet) {
            continue;
        }
        nl.handle
            .route()
            .del(route.message)
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "remove the route to former peer subnet {subnet}"
            )))?;
        tracing::info!(%subnet, "peer route removed");
        sync.removed.push(subnet);
    }
    Ok(sync)
}

/// Routes into the cluster CIDR, split into tug's (by protocol number) and everyone else's.
fn classify(
    routes: Vec<Route>,
    cluster_cidr: Subnet,
) -> (BTreeMap<Subnet, Route>, BTreeMap<Subnet, Route>) {
    let mut ours = BTreeMap::new();
    let mut foreign = BTreeMap::new();
    for route in routes {
        let Ok(dst) = Subnet::new(route.destination, route.prefix) else {
            continue;
        };
        if !cluster_cidr.contains_subnet(&dst) {
            continue;
        }
        if route.protocol == RTPROT_TUG {
            ours.insert(dst, route);
        } else {
            foreign.insert(dst, route);
        }
    }
    (ours, foreign)
}

/// Every peer subnet inside the cluster CIDR, apart from ours and from each other.
pub(crate) fn validate(
    cfg: &HostGwConfig,
    peers: &[(Subnet, Ipv4Addr)],
) -> Result<BTreeMap<Subnet, Ipv4Addr>> {
    let mut wanted: BTreeMap<Subnet, Ipv4Addr> = BTreeMap::new();
    for &(peer, via) in peers {
        let invalid = |reason: String| Error::InvalidPeer { peer, via, reason };
        if !cfg.cluster_cidr.contains_subnet(&peer) {
            return Err(invalid(format!(
                "it is outside the cluster CIDR {}",
                cfg.cluster_cidr
            )));
        }
        if peer.overlaps(&cfg.own_subnet) {
            return Err(invalid(format!(
                "it overlaps this node's own subnet {}",
                cfg.own_subnet
            )));
        }
        if cfg.cluster_cidr.contains(via) {
            return Err(invalid(format!(
                "the node address lies inside the cluster CIDR {}",
                cfg.cluster_cidr
            )));
        }
        if let Some((other, _)) = wanted.iter().find(|(s, _)| s.overlaps(&peer)) {
            return Err(invalid(format!("it overlaps peer subnet {other}")));
        }
        wanted.insert(peer, via);
    }
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::subnet::test_subnet as s;

    #[test]
    fn validation_rejects_clashes() {
        let cfg = HostGwConfig {
            cluster_cidr: s("10.88.0.0/16"),
            own_subnet: s("10.88.1.0/24"),
        };
        let via = Ipv4Addr::new(192, 168, 1, 2);
        assert!(validate(&cfg, &[(s("10.88.2.0/24"), via), (s("10.88.3.0/24"), via)]).is_ok());
        for bad in [
            vec![(s("10.89.2.0/24"), via)],
            vec![(s("10.88.1.0/24"), via)],
            vec![(s("10.88.0.0/20"), via)],
            vec![(s("10.88.2.0/24"), via), (s("10.88.2.0/25"), via)],
            vec![(s("10.88.2.0/24"), Ipv4Addr::new(10, 88, 9, 1))],
        ] {
            let err = validate(&cfg, &bad).err();
            assert!(
                matches!(err, Some(Error::InvalidPeer { .. })),
                "{bad:?}: {err:?}"
            );
        }
    }
}
