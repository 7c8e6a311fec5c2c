//! vxlan mode across two "nodes" (see `common/cluster.rs`): containers reach each other through
//! the VXLAN device, and a removed peer loses its route, neighbour and FDB entries.

mod common;

use std::net::Ipv4Addr;

use common::TestResult;
use common::cluster::{assert_containers_reach_each_other, two_nodes};
use tug_netplugin::Mode;
use tug_netplugin::vxlan::DEFAULT_DEVICE;

#[test]
fn containers_on_two_nodes_ping_over_vxlan() -> TestResult {
    let (a, b) = two_nodes(Mode::Vxlan)?;
    let link = a.ns.ip(&["-d", "link", "show", DEFAULT_DEVICE])?;
    assert!(link.contains("vxlan id 4242"), "{link}");
    assert!(link.contains("mtu 1450"), "{link}");
    assert!(link.contains("0a:58:0a:58:01:00"), "{link}");
    assert!(!a.ctr.pings(b.container_address()?)?);

    assert_eq!(a.sync(&[(b.subnet, b.address)])?.added, vec![b.subnet]);
    b.sync(&[(a.subnet, a.address)])?;
    let routes = a.routes()?;
    assert!(
        routes.contains(&format!("10.88.2.0/24 via 10.88.2.0 dev {DEFAULT_DEVICE}")),
        "{routes}"
    );
    let fdb =
        a.ns.exec(&["bridge", "fdb", "show", "dev", DEFAULT_DEVICE])?;
    assert!(fdb.contains("0a:58:0a:58:02:00 dst 192.168.250.2"), "{fdb}");

    assert_containers_reach_each_other(&a, &b)?;

    // the same peers again: no route changes
    assert!(a.sync(&[(b.subnet, b.address)])?.added.is_empty());
    Ok(())
}

#[test]
fn removing_a_vxlan_peer_removes_its_entries() -> TestResult {
    let (a, b) = two_nodes(Mode::Vxlan)?;
    let c = (
        common::subnet("10.88.3.0/24")?,
        Ipv4Addr::new(192, 168, 250, 3),
    );
    a.sync(&[(b.subnet, b.address), c])?;
    b.sync(&[(a.subnet, a.address)])?;
    let neigh = a.ns.ip(&["neigh", "show", "dev", DEFAULT_DEVICE])?;
    assert!(
        neigh.contains("10.88.3.0 lladdr 0a:58:0a:58:03:00 PERMANENT"),
        "{neigh}"
    );

    let synced = a.sync(&[(b.subnet, b.address)])?;
    assert_eq!(synced.removed, vec![c.0]);
    assert!(!a.routes()?.contains("10.88.3.0/24"));
    assert!(
        !a.ns
            .ip(&["neigh", "show", "dev", DEFAULT_DEVICE])?
            .contains("10.88.3.0")
    );
    let fdb =
        a.ns.exec(&["bridge", "fdb", "show", "dev", DEFAULT_DEVICE])?;
    assert!(!fdb.contains("0a:58:0a:58:03:00"), "{fdb}");
    assert!(fdb.contains("0a:58:0a:58:02:00"), "{fdb}");
    assert!(a.ctr.pings(b.container_address()?)?);
    Ok(())
}

#[test]
fn node_setup_runs_again_over_its_own_vxlan_device() -> TestResult {
    // An agent restart sets the node up again while the VXLAN device holds the subnet's
    // network address: that is tug's own, not a clash.
    let (mut a, _b) = common::cluster::two_nodes(tug_netplugin::Mode::Vxlan)?;
    a.setup_again()?;
    Ok(())
}
