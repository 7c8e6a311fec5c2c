//! host-gw across two "nodes": namespaces joined by a veth pair (their shared L2), each with its
//! own bridge and a container namespace. Containers reach each other only through the peer routes
//! the plugin programs.

mod common;

use std::net::Ipv4Addr;

use common::cluster::{assert_containers_reach_each_other, two_nodes};
use common::{TestResult, subnet};
use tug_netplugin::Mode;
use tug_netplugin::routes::RTPROT_TUG;

#[test]
fn containers_on_two_nodes_ping_through_peer_routes() -> TestResult {
    let (a, b) = two_nodes(Mode::HostGw)?;
    // no routes yet: the other node's containers are unreachable
    assert!(!a.ctr.pings(b.container_address()?)?);

    let synced = a.sync(&[(b.subnet, b.address)])?;
    assert_eq!(synced.added, vec![b.subnet]);
    b.sync(&[(a.subnet, a.address)])?;
    let routes = a.routes()?;
    assert!(
        routes.contains(&format!(
            "10.88.2.0/24 via 192.168.250.2 dev wire proto {RTPROT_TUG}"
        )),
        "{routes}"
    );

    assert_containers_reach_each_other(&a, &b)?;

    // a second sync with the same peers changes nothing
    let again = a.sync(&[(b.subnet, b.address)])?;
    assert_eq!(again, tug_netplugin::RouteSync::default());
    Ok(())
}

#[test]
fn removing_a_peer_removes_only_its_route() -> TestResult {
    let (a, b) = two_nodes(Mode::HostGw)?;
    let c_subnet = subnet("10.88.3.0/24")?;
    let c_address = Ipv4Addr::new(192, 168, 250, 3);
    a.sync(&[(b.subnet, b.address), (c_subnet, c_address)])?;
    b.sync(&[(a.subnet, a.address)])?;
    // routes that are not tug's, one inside the cluster CIDR and one outside
    a.ns.ip(&["route", "add", "10.88.9.0/24", "via", "192.168.250.2"])?;
    a.ns.ip(&["route", "add", "172.31.0.0/16", "via", "192.168.250.2"])?;
    assert!(a.routes()?.contains("10.88.3.0/24 via 192.168.250.3"));

    let synced = a.sync(&[(b.subnet, b.address)])?;
    assert_eq!(synced.removed, vec![c_subnet]);
    assert!(synced.added.is_empty());
    let routes = a.routes()?;
    assert!(!routes.contains("10.88.3.0/24"), "{routes}");
    assert!(
        routes.contains("10.88.2.0/24 via 192.168.250.2"),
        "{routes}"
    );
    assert!(
        routes.contains("10.88.9.0/24 via 192.168.250.2"),
        "{routes}"
    );
    assert!(
        routes.contains("172.31.0.0/16 via 192.168.250.2"),
        "{routes}"
    );
    assert!(a.ctr.pings(b.container_address()?)?);

    // a peer whose node moved gets its route replaced
    let moved = a.sync(&[(b.subnet, Ipv4Addr::new(192, 168, 250, 22))])?;
    assert_eq!(moved.added, vec![b.subnet]);
    assert!(a.routes()?.contains("10.88.2.0/24 via 192.168.250.22"));

    // every peer gone: only tug's routes go
    a.sync(&[])?;
    let routes = a.routes()?;
    assert!(!routes.contains("10.88.2.0/24"), "{routes}");
    assert!(routes.contains("10.88.9.0/24"), "{routes}");

    // bad input changes nothing
    a.sync(&[(b.subnet, b.address)])?;
    let before = a.routes()?;
    assert!(a.sync(&[(a.subnet, b.address)]).is_err());
    assert!(a.sync(&[(subnet("10.99.0.0/24")?, b.address)]).is_err());
    assert_eq!(a.routes()?, before);
    Ok(())
}

#[test]
fn a_foreign_route_to_a_peer_subnet_is_left_alone() -> TestResult {
    let (a, b) = two_nodes(Mode::HostGw)?;
    a.ns.ip(&["route", "add", "10.88.2.0/24", "via", "192.168.250.2"])?;
    let synced = a.sync(&[(b.subnet, b.address)])?;
    assert_eq!(synced.foreign, vec![b.subnet]);
    assert!(synced.added.is_empty());
    let routes = a.routes()?;
    assert!(!routes.contains(&format!("proto {RTPROT_TUG}")), "{routes}");
    a.sync(&[])?;
    assert!(a.routes()?.contains("10.88.2.0/24 via 192.168.250.2"));
    Ok(())
}
