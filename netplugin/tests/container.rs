//! Container add/del/check inside test namespaces: a "node" namespace holds the bridge, each
//! "container" namespace gets eth0.

mod common;

use std::path::Path;

use common::{TestNs, TestResult, subnet, thread_count};
use tug_netplugin::netns::block_in_netns;
use tug_netplugin::{
    ContainerNet, DriftItem, Error, Ipam, Mode, NodeConfig, add, check, del, host_veth_name,
    setup_node,
};

const SUBNET: &str = "10.88.3.0/24";

/// A node namespace with its bridge set up, and the IPAM state dir.
struct Node {
    ns: TestNs,
    state: tempfile::TempDir,
}

impl Node {
    fn new() -> TestResult<Node> {
        let ns = TestNs::new("node")?;
        let cfg = NodeConfig {
            bridge: "tug0".into(),
            subnet: subnet(SUBNET)?,
            uplink: None,
            mode: Mode::HostGw,
            big_tcp: false,
        };
        block_in_netns(&ns.path(), || setup_node(&cfg))?;
        Ok(Node {
            ns,
            state: tempfile::tempdir()?,
        })
    }

    fn net(&self, id: &str, netns: &Path) -> TestResult<ContainerNet> {
        Ok(ContainerNet {
            id: id.into(),
            netns_path: netns.to_path_buf(),
            bridge: "tug0".into(),
            subnet: subnet(SUBNET)?,
            state_dir: self.state.path().to_path_buf(),
            gso_ipv4_max_size: None,
        })
    }

    fn ipam(&self) -> TestResult<Ipam> {
        Ok(Ipam::open(self.state.path(), subnet(SUBNET)?)?)
    }

    /// The tug host veths on the node.
    fn host_veths(&self) -> TestResult<Vec<String>> {
        let links = self.ns.ip(&["-o", "link", "show"])?;
        Ok(links
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or_default().to_string())
            .filter(|n| n.starts_with("tv"))
            .collect())
    }
}

#[test]
fn add_gives_eth0_an_address_and_both_sides_ping() -> TestResult {
    let node = Node::new()?;
    let ctr = TestNs::new("ctr")?;
    let net = node.net("web-1", &ctr.path())?;
    let att = block_in_netns(&node.ns.path(), || add(&net))?;

    assert_eq!(att.address.to_string(), "10.88.3.2");
    assert_eq!(att.gateway.to_string(), "10.88.3.1");
    assert_eq!(att.host_veth, host_veth_name("web-1"));
    let eth0 = ctr.ip(&["-4", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(eth0.contains("inet 10.88.3.2/24"), "{eth0}");
    let link = ctr.ip(&["link", "show", "eth0"])?;
    assert!(link.contains(&att.mac), "{link} lacks {}", att.mac);
    // The MAC follows from the address (0a:58 and its four bytes).
    assert_eq!(att.mac, "0a:58:0a:58:03:02");
    assert!(ctr.ip(&["link", "show", "lo"])?.contains("UP"));
    let routes = ctr.ip(&["-4", "route", "show"])?;
    assert!(
        routes.contains("default via 10.88.3.1 dev eth0"),
        "{routes}"
    );
    let host = node.ns.ip(&["link", "show", &att.host_veth])?;
    assert!(host.contains("master tug0"), "{host}");

    assert!(node.ns.pings(att.address)?, "node -> container");
    assert!(ctr.pings(att.gateway)?, "container -> node");
    block_in_netns(&node.ns.path(), || check(&net))?;
    Ok(())
}

#[test]
fn two_containers_on_one_node_reach_each_other() -> TestResult {
    let node = Node::new()?;
    let (c1, c2) = (TestNs::new("c1")?, TestNs::new("c2")?);
    let (n1, n2) = (node.net("a", &c1.path())?, node.net("b", &c2.path())?);
    let a1 = block_in_netns(&node.ns.path(), || add(&n1))?;
    let a2 = block_in_netns(&node.ns.path(), || add(&n2))?;
    assert_ne!(a1.address, a2.address);
    assert!(c1.pings(a2.address)?, "c1 -> c2");
    assert!(c2.pings(a1.address)?, "c2 -> c1");
    Ok(())
}

#[test]
fn del_removes_everything_and_is_idempotent() -> TestResult {
    let node = Node::new()?;
    let ctr = TestNs::new("ctr")?;
    let net = node.net("web-1", &ctr.path())?;
    block_in_netns(&node.ns.path(), || add(&net))?;
    block_in_netns(&node.ns.path(), || del(&net))?;

    assert!(node.host_veths()?.is_empty());
    let links = ctr.ip(&["-o", "link", "show"])?;
    assert!(!links.contains("eth0"), "{links}");
    assert!(!ctr.ip(&["-4", "addr", "show"])?.contains("10.88.3."));
    assert!(ctr.ip(&["-4", "route", "show"])?.trim().is_empty());
    assert!(node.ipam()?.allocations()?.is_empty());

    block_in_netns(&node.ns.path(), || del(&net))?;
    Ok(())
}

#[test]
fn del_works_after_the_namespace_is_gone() -> TestResult {
    let node = Node::new()?;
    let ctr = TestNs::new("ctr")?;
    let net = node.net("gone", &ctr.path())?;
    block_in_netns(&node.ns.path(), || add(&net))?;
    drop(ctr);
    block_in_netns(&node.ns.path(), || del(&net))?;
    assert!(node.host_veths()?.is_empty());
    assert!(node.ipam()?.allocations()?.is_empty());
    Ok(())
}

#[test]
fn add_again_keeps_the_address() -> TestResult {
    let node = Node::new()?;
    let ctr = TestNs::new("ctr")?;
    let net = node.net("again", &ctr.path())?;
    let first = block_in_netns(&node.ns.path(), || add(&net))?;
    let second = block_in_netns(&node.ns.path(), || add(&net))?;
    assert_eq!(first.address, second.address);
    assert_eq!(node.host_veths()?, vec![first.host_veth.clone()]);
    block_in_netns(&node.ns.path(), || check(&net))?;
    assert!(node.ns.pings(second.address)?);
    Ok(())
}

#[test]
fn failed_add_leaves_nothing_behind() -> TestResult {
    let node = Node::new()?;
    let ctr = TestNs::new("ctr")?;
    // an eth0 that is not ours already sits in the container namespace
    ctr.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "x0"])?;
    let net = node.net("clash", &ctr.path())?;
    let err = block_in_netns(&node.ns.path(), || add(&net)).err();
    assert!(matches!(err, Some(Error::Eth0Exists { .. })), "{err:?}");
    assert!(node.host_veths()?.is_empty());
    assert!(node.ipam()?.allocations()?.is_empty());

    let missing = node.net("nowhere", Path::new("/run/netns/tnp-does-not-exist"))?;
    let err = block_in_netns(&node.ns.path(), || add(&missing)).err();
    let text = err.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(text.contains("tnp-does-not-exist"), "{text}");
    assert!(node.host_veths()?.is_empty());
    assert!(node.ipam()?.allocations()?.is_empty());
    Ok(())
}

#[test]
fn check_reports_drift() -> TestResult {
    let node = Node::new()?;
    let ctr = TestNs::new("ctr")?;
    let net = node.net("drift", &ctr.path())?;
    let att = block_in_netns(&node.ns.path(), || add(&net))?;

    ctr.ip(&["route", "del", "default"])?;
    match block_in_netns(&node.ns.path(), || check(&net)) {
        Err(Error::Drift { drift, .. }) => {
            assert_eq!(drift.0, vec![DriftItem::DefaultRouteMissing(att.gateway)]);
        }
        other => panic!("expected drift, got {other:?}"),
    }

    let veth = att.host_veth.as_str();
    node.ns.ip(&[
        "link",
        "set",
        "dev",
        veth,
        "type",
        "bridge_slave",
        "hairpin",
        "off",
    ])?;
    match block_in_netns(&node.ns.path(), || check(&net)) {
        Err(Error::Drift { drift, .. }) => {
            assert!(
                drift.0.contains(&DriftItem::HairpinOff(veth.to_string())),
                "{drift:?}"
            );
        }
        other => panic!("expected drift, got {other:?}"),
    }

    node.ns.ip(&["link", "del", &att.host_veth])?;
    match block_in_netns(&node.ns.path(), || check(&net)) {
        Err(err @ Error::Drift { .. }) => {
            let Error::Drift { drift, .. } = &err else {
                unreachable!()
            };
            assert!(
                drift
                    .0
                    .contains(&DriftItem::HostVethMissing(att.host_veth.clone()))
            );
            assert!(drift.0.contains(&DriftItem::Eth0Missing));
            let text = err.to_string();
            assert!(
                text.contains(&att.host_veth) && text.contains("eth0 is missing"),
                "{text}"
            );
        }
        other => panic!("expected drift, got {other:?}"),
    }

    block_in_netns(&node.ns.path(), || del(&net))?;
    match block_in_netns(&node.ns.path(), || check(&net)) {
        Err(Error::Drift { drift, .. }) => assert!(drift.0.contains(&DriftItem::NoAddress)),
        other => panic!("expected drift, got {other:?}"),
    }
    Ok(())
}

#[test]
fn addresses_survive_an_ipam_reload() -> TestResult {
    let node = Node::new()?;
    let (c1, c2) = (TestNs::new("c1")?, TestNs::new("c2")?);
    let n1 = node.net("keep", &c1.path())?;
    let first = block_in_netns(&node.ns.path(), || add(&n1))?;
    // a "restarted agent": a new Ipam over the same dir, then an add of another container
    let reloaded = node.ipam()?;
    assert_eq!(reloaded.get("keep")?, Some(first.address));
    let n2 = node.net("other", &c2.path())?;
    let second = block_in_netns(&node.ns.path(), || add(&n2))?;
    assert_ne!(second.address, first.address);
    Ok(())
}

#[test]
fn two_hundred_add_del_cycles_leave_nothing_behind() -> TestResult {
    let node = Node::new()?;
    let ctr = TestNs::new("ctr")?;
    let threads_before = thread_count()?;
    let nets: Vec<ContainerNet> = (0..200)
        .map(|i| node.net(&format!("cycle-{i}"), &ctr.path()))
        .collect::<TestResult<_>>()?;
    let inner_threads = block_in_netns(&node.ns.path(), || async {
        let start = thread_count().unwrap_or_default();
        for net in &nets {
            add(net).await?;
            del(net).await?;
        }
        let end = thread_count().unwrap_or_default();
        Ok((start, end))
    })?;
    assert_eq!(inner_threads.0, inner_threads.1, "helper threads leaked");
    assert_eq!(thread_count()?, threads_before, "threads leaked");
    assert!(node.host_veths()?.is_empty());
    assert!(!ctr.ip(&["-o", "link", "show"])?.contains("eth0"));
    assert!(ctr.ip(&["-4", "route", "show"])?.trim().is_empty());
    assert!(node.ipam()?.allocations()?.is_empty());
    // nothing on the node but the bridge's own address and its subnet route
    let addrs = node.ns.ip(&["-4", "-o", "addr", "show"])?;
    assert_eq!(
        addrs.lines().filter(|l| l.contains("10.88.")).count(),
        1,
        "{addrs}"
    );
    Ok(())
}
