//! Node setup inside test namespaces: creation, idempotence, correction, MTU, wrong device kind.

mod common;

use common::{TestNs, TestResult, subnet};
use tug_netplugin::netns::block_in_netns;
use tug_netplugin::{Error, Mode, NodeConfig, setup_node};

fn config(bridge: &str, text: &str) -> TestResult<NodeConfig> {
    Ok(NodeConfig {
        bridge: bridge.into(),
        subnet: subnet(text)?,
        uplink: None,
        mode: Mode::HostGw,
        big_tcp: false,
    })
}

#[test]
fn node_setup_creates_bridge_and_is_idempotent() -> TestResult {
    let host_forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?;
    let node = TestNs::new("node")?;
    let cfg = config("tug0", "10.88.3.0/24")?;

    let first = block_in_netns(&node.path(), || setup_node(&cfg))?;
    assert!(first.changed);
    assert_eq!(first.mtu, 1500);
    let addrs = node.ip(&["-4", "-o", "addr", "show", "dev", "tug0"])?;
    assert!(addrs.contains("inet 10.88.3.1/24"), "{addrs}");
    let link = node.ip(&["-d", "link", "show", "tug0"])?;
    assert!(link.contains("state UP") || link.contains(",UP"), "{link}");
    assert!(link.contains("bridge"), "{link}");
    // A fixed MAC, from the gateway address, that ports joining and leaving do not change.
    assert!(link.contains("link/ether 0a:58:0a:58:03:01"), "{link}");
    assert_eq!(
        node.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"])?.trim(),
        "1"
    );

    let again = block_in_netns(&node.path(), || setup_node(&cfg))?;
    assert_eq!(
        again,
        tug_netplugin::NodeSetup {
            changed: false,
            ..first
        }
    );
    assert_eq!(
        node.ip(&["-4", "-o", "addr", "show", "dev", "tug0"])?,
        addrs
    );

    // the machine's own forwarding setting is untouched
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?,
        host_forwarding
    );
    Ok(())
}

#[test]
fn node_setup_corrects_a_stray_bridge_address() -> TestResult {
    let node = TestNs::new("node")?;
    let cfg = config("tug0", "10.88.3.0/24")?;
    block_in_netns(&node.path(), || setup_node(&cfg))?;
    node.ip(&["addr", "add", "10.99.0.1/24", "dev", "tug0"])?;

    let fixed = block_in_netns(&node.path(), || setup_node(&cfg))?;
    assert!(fixed.changed);
    let addrs = node.ip(&["-4", "-o", "addr", "show", "dev", "tug0"])?;
    assert!(addrs.contains("10.88.3.1/24"), "{addrs}");
    assert!(!addrs.contains("10.99.0.1"), "{addrs}");
    Ok(())
}

#[test]
fn node_setup_takes_uplink_mtu_less_vxlan_overhead() -> TestResult {
    let node = TestNs::new("node")?;
    // no dummy driver on the test machines: a veth serves as the uplink
    node.ip(&[
        "link", "add", "up0", "mtu", "9000", "type", "veth", "peer", "name", "up1",
    ])?;
    let mut cfg = config("tug0", "10.88.3.0/24")?;
    cfg.uplink = Some("up0".into());
    cfg.mode = Mode::Vxlan;
    let setup = block_in_netns(&node.path(), || setup_node(&cfg))?;
    assert_eq!(setup.mtu, 8950);
    assert!(node.ip(&["link", "show", "tug0"])?.contains("mtu 8950"));

    cfg.mode = Mode::HostGw;
    let setup = block_in_netns(&node.path(), || setup_node(&cfg))?;
    assert_eq!(setup.mtu, 9000);
    assert!(setup.changed);
    assert!(node.ip(&["link", "show", "tug0"])?.contains("mtu 9000"));

    cfg.uplink = Some("nope0".into());
    let err = block_in_netns(&node.path(), || setup_node(&cfg)).err();
    assert!(matches!(err, Some(Error::LinkNotFound { .. })), "{err:?}");
    Ok(())
}

#[test]
fn node_setup_refuses_a_device_that_is_not_a_bridge() -> TestResult {
    let node = TestNs::new("node")?;
    node.ip(&[
        "link", "add", "tug0", "type", "veth", "peer", "name", "other0",
    ])?;
    let cfg = config("tug0", "10.88.3.0/24")?;
    let err = block_in_netns(&node.path(), || setup_node(&cfg)).err();
    let text = err.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(matches!(err, Some(Error::NotABridge { .. })), "{err:?}");
    assert!(
        text.contains("\"tug0\"") && text.contains("not a bridge"),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_subnet_that_overlaps_the_nodes_own_network_is_refused_and_nothing_is_made() -> TestResult {
    let node = TestNs::new("clash")?;
    node.ip(&["link", "add", "lan0", "type", "bridge"])?;
    node.ip(&["addr", "add", "10.88.0.5/16", "dev", "lan0"])?;
    let cfg = config("tug0", "10.88.3.0/24")?;
    let err = block_in_netns(&node.path(), || setup_node(&cfg)).err();
    assert_eq!(
        err.map(|e| e.to_string()).as_deref(),
        Some(
            "the container subnet 10.88.3.0/24 overlaps 10.88.0.5/16 on interface \"lan0\"; give \
             the cluster another --cluster-cidr (nothing was set up)"
        )
    );
    let links = node.ip(&["-o", "link", "show"])?;
    assert!(!links.contains("tug0"), "{links}");
    Ok(())
}
