//! The eBPF fast path between two "nodes" (see `common::cluster`), in both cross-host modes:
//! containers still reach each other (ICMP and a TCP transfer, checked end to end), the
//! programs' counters show the packets took the fast path both ways (and the normal path out
//! of a container whose veth has no program), TTLs are decremented as by a router, a
//! published port reached from inside the cluster still answers through conntrack, and loading
//! again (an agent restart) replaces the programs instead of stacking them. In vxlan mode the
//! programs encapsulate and decapsulate themselves, interoperate with a node whose VXLAN device
//! does it, and leave a peer they do not know to the device.

mod common;

use common::cluster::{CLUSTER, Node, peer_each_other, two_nodes};
use common::http::{Httpd, fetch, transfer};
use common::{TestNs, TestResult, subnet};
use tug_netplugin::Mode;
use tug_netplugin::fastpath::{self, FROM_CONTAINERS, FastPath, FastPathConfig, TO_CONTAINERS};
use tug_netplugin::netns::block_in_netns;

#[test]
fn host_gw_traffic_between_containers_takes_the_fast_path() -> TestResult {
    carries_traffic(Mode::HostGw)
}

#[test]
fn vxlan_traffic_between_containers_takes_the_fast_path() -> TestResult {
    carries_traffic(Mode::Vxlan)
}

fn carries_traffic(mode: Mode) -> TestResult {
    let (a, b) = peered(mode)?;
    let (fast_a, fast_b) = (a.fast_path()?, b.fast_path()?);
    let (addr_a, addr_b) = (a.container_address()?, b.container_address()?);

    let out = five_pings(&a, addr_b)?;
    // Two routers on the way (node a, node b), each taking one off the container's 64.
    // Every reply, not just one that took the stack.
    assert_eq!(out.matches("ttl=62").count(), 5, "{out}");
    assert!(out.contains("5 packets received"), "{out}");
    let (sa, sb) = (fast_a.stats()?, fast_b.stats()?);
    // The first request may go through the stack while node a resolves node b's address.
    assert!(sa.to_nodes >= 4, "node a sent {sa:?}");
    assert!(sb.to_containers >= 4, "node b delivered {sb:?}");
    assert!(sb.to_nodes >= 4, "node b sent {sb:?}");
    assert!(sa.to_containers >= 4, "node a delivered {sa:?}");

    if mode == Mode::Vxlan {
        // Both ways in VXLAN the programs made and took apart themselves.
        assert!(sa.encapsulated >= 4, "node a sent {sa:?}");
        assert!(sb.decapsulated >= 4, "node b delivered {sb:?}");
        assert!(sb.encapsulated >= 4, "node b sent {sb:?}");
        assert!(sa.decapsulated >= 4, "node a delivered {sa:?}");
    }

    // TCP with segmentation offloads: 8 MiB fetched over HTTP arrive intact.
    let dir = tempfile::tempdir()?;
    let _server = Httpd::start(&b, dir.path())?;
    let before = (fast_a.stats()?, fast_b.stats()?);
    let devices = match mode {
        Mode::Vxlan => (device_packets(&a)?, device_packets(&b)?),
        Mode::HostGw => ((0, 0), (0, 0)),
    };
    transfer(&a, addr_b, dir.path())?;
    let after = (fast_a.stats()?, fast_b.stats()?);
    assert!(after.0.to_containers > before.0.to_containers, "{after:?}");
    assert!(after.0.to_nodes > before.0.to_nodes, "{after:?}");
    if mode == Mode::Vxlan {
        assert!(after.0.encapsulated > before.0.encapsulated, "{after:?}");
        assert!(after.0.decapsulated > before.0.decapsulated, "{after:?}");
        assert!(after.1.encapsulated > before.1.encapsulated, "{after:?}");
        assert!(after.1.decapsulated > before.1.decapsulated, "{after:?}");
        // Not through the VXLAN devices (a neighbour being resolved again may send one).
        let sent = (
            device_packets(&a)?.0 - devices.0.0,
            device_packets(&b)?.0 - devices.1.0,
        );
        assert!(
            sent.0 <= 2 && sent.1 <= 2,
            "the VXLAN devices sent {sent:?}"
        );
    }

    // Node b's own address is outside the cluster CIDR: that traffic keeps the normal path
    // (and its masquerade), and still works.
    assert!(a.ctr.pings(b.address)?, "container a -> node b");
    assert!(b.ctr.pings(addr_a)?, "container b -> container a");
    Ok(())
}

#[test]
fn vxlan_packets_of_the_programs_and_of_the_device_are_interchangeable() -> TestResult {
    // Node a's programs carry VXLAN; node b leaves it to its VXLAN device (a node without the
    // tunnel, or before it loads it). Each end takes the other's packets.
    let (a, b) = peered(Mode::Vxlan)?;
    let fast_a = a.fast_path()?;
    let fast_b = b.fast_path_with(false)?;
    let addr_b = b.container_address()?;
    let out = five_pings(&a, addr_b)?;
    assert_eq!(out.matches("ttl=62").count(), 5, "{out}");
    let (sa, sb) = (fast_a.stats()?, fast_b.stats()?);
    assert!(sa.encapsulated >= 4, "node a sent {sa:?}");
    assert!(sa.decapsulated >= 4, "node a delivered {sa:?}");
    assert_eq!((sb.encapsulated, sb.decapsulated), (0, 0), "node b {sb:?}");
    assert!(
        device_packets(&b)?.1 >= 4,
        "node b's VXLAN device received nothing"
    );
    // Segmentation offloads both ways through the device on node b.
    let dir = tempfile::tempdir()?;
    let _server = Httpd::start(&b, dir.path())?;
    transfer(&a, addr_b, dir.path())
}

#[test]
fn a_container_that_forwards_decapsulated_traffic_passes_it_on_intact() -> TestResult {
    // A container running containers of its own (Docker inside) forwards what the program put
    // into it. Decapsulated GSO packets keep their UDP-tunnel offload mark (see the module docs
    // of `fastpath`): forwarded onto a link with a smaller MTU, the stack must still measure
    // their segments right (and ask the sender for smaller ones), and the bytes arrive intact.
    let (a, b) = peered(Mode::Vxlan)?;
    let (_fast_a, fast_b) = (a.fast_path()?, b.fast_path()?);
    let inner = TestNs::new("inner")?;
    // The inner end's larger MTU makes the fetch's SYN ask for segments that do not fit
    // container b's end: the first ones take an ICMP "fragmentation needed" back to a.
    let mut pair: Vec<&str> = "link add fwd0 mtu 1280 type veth peer name fwd1 mtu 1450 netns"
        .split(' ')
        .collect();
    pair.push(inner.name());
    b.ctr.ip(&pair)?;
    b.ctr.ip(&["addr", "add", "10.99.0.1/24", "dev", "fwd0"])?;
    b.ctr.ip(&["link", "set", "fwd0", "up"])?;
    inner.ip(&["addr", "add", "10.99.0.2/24", "dev", "fwd1"])?;
    inner.ip(&["link", "set", "fwd1", "up"])?;
    inner.ip(&["link", "set", "lo", "up"])?;
    inner.ip(&["route", "add", "default", "via", "10.99.0.1"])?;
    b.ctr.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    let masquerade = "iptables -w -t nat -A POSTROUTING -s 10.99.0.0/24 -o eth0 -j MASQUERADE";
    b.ctr.exec(&masquerade.split(' ').collect::<Vec<_>>())?;
    // The inner namespace fetches 8 MiB from container a: the bulk arrives at node b in VXLAN,
    // is decapsulated into container b, and forwarded on.
    let dir = tempfile::tempdir()?;
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("blob"), &data)?;
    let _server = Httpd::start(&a, dir.path())?;
    let before = fast_b.stats()?;
    let url = format!("http://{}:8080/blob", a.container_address()?);
    let fetched = fetch(&inner, &url, 30)?.map_err(|e| format!("{url} from behind b: {e}"))?;
    assert!(
        fetched == data,
        "{} bytes fetched, not the same 8 MiB",
        fetched.len()
    );
    let after = fast_b.stats()?;
    assert!(
        after.decapsulated > before.decapsulated + 100,
        "{before:?} {after:?}"
    );
    // The stack did measure them against the smaller link and asked for smaller ones.
    let asked = snmp(&b.ctr, "Icmp", "OutDestUnreachs")?;
    assert!(asked >= 1, "container b sent no ICMP fragmentation needed");
    Ok(())
}

/// Counter `field` of protocol `proto` in `ns`'s `/proc/net/snmp`.
fn snmp(ns: &TestNs, proto: &str, field: &str) -> TestResult<u64> {
    let text = ns.exec(&["cat", "/proc/net/snmp"])?;
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Err(format!("no {proto} counters in /proc/net/snmp").into());
    };
    let at = names
        .split_whitespace()
        .position(|n| n == field)
        .ok_or_else(|| format!("no {proto} counter {field}"))?;
    Ok(values
        .split_whitespace()
        .nth(at)
        .ok_or("short counter line")?
        .parse()?)
}

#[test]
fn a_peer_missing_from_the_peer_map_is_reached_through_the_vxlan_device() -> TestResult {
    let (a, b) = peered(Mode::Vxlan)?;
    let (fast_a, fast_b) = (a.fast_path()?, b.fast_path()?);
    let vtep_b = (b.subnet.network(), b.address);
    assert_eq!(fast_a.peers()?, vec![vtep_b]);
    fast_a.set_peers(&[])?;
    assert!(fast_a.peers()?.is_empty());
    let devices = device_packets(&a)?;
    let out = five_pings(&a, b.container_address()?)?;
    assert_eq!(out.matches("ttl=62").count(), 5, "{out}");
    // Out of node a through its device; still taken apart by node b's program.
    let (sa, sb) = (fast_a.stats()?, fast_b.stats()?);
    assert_eq!(sa.encapsulated, 0, "{sa:?}");
    assert!(sa.to_nodes >= 4, "{sa:?}");
    assert!(
        device_packets(&a)?.0 >= devices.0 + 4,
        "node a's device sent nothing"
    );
    assert!(sb.decapsulated >= 4, "{sb:?}");
    // VXLAN from a node that is not a recorded peer is left to the device (and to the node's
    // netfilter rules).
    fast_b.set_peers(&[])?;
    let (before, devices) = (fast_b.stats()?, device_packets(&b)?);
    let out = five_pings(&a, b.container_address()?)?;
    assert_eq!(out.matches("ttl=62").count(), 5, "{out}");
    assert_eq!(fast_b.stats()?.decapsulated, before.decapsulated);
    assert!(
        device_packets(&b)?.1 >= devices.1 + 4,
        "node b's device received nothing"
    );
    // Recorded again, the peer is encapsulated for by the program.
    fast_a.set_peers(&[(b.subnet, b.address)])?;
    let out = five_pings(&a, b.container_address()?)?;
    assert_eq!(out.matches("ttl=62").count(), 5, "{out}");
    assert!(fast_a.stats()?.encapsulated >= 4);
    Ok(())
}

#[test]
fn a_congestion_mark_on_the_outer_header_reaches_the_inner_one() -> TestResult {
    // Node a's VXLAN device encapsulates (copying the inner ECN field out, as Linux does) and a
    // rule there marks every outer header "congestion experienced", as a router could. Node b's
    // program leaves such packets to its device, which carries the mark to the inner header.
    let (a, b) = peered(Mode::Vxlan)?;
    let _fast_a = a.fast_path_with(false)?;
    let fast_b = b.fast_path()?;
    let tos = |ns: &TestNs, chain: &str, what: &[&str], value: &str| -> TestResult {
        let mut args = vec!["iptables", "-w", "-t", "mangle", "-A", chain];
        args.extend_from_slice(what);
        args.extend(["-j", "TOS", "--set-tos", value]);
        ns.exec(&args)?;
        Ok(())
    };
    // ECN-capable pings from container a (busybox ping cannot ask for it).
    tos(&a.ctr, "OUTPUT", &["-p", "icmp"], "0x02/0x03")?;
    tos(
        &a.ns,
        "POSTROUTING",
        &["-p", "udp", "--dport", "4789"],
        "0x03/0x03",
    )?;
    b.ctr.exec(&[
        "iptables",
        "-w",
        "-A",
        "INPUT",
        "-p",
        "icmp",
        "-m",
        "ecn",
        "--ecn-ip-ect",
        "3",
    ])?;
    let out = five_pings(&a, b.container_address()?)?;
    assert_eq!(out.matches("ttl=62").count(), 5, "{out}");
    let marked = b
        .ctr
        .exec(&["iptables", "-w", "-L", "INPUT", "-v", "-x", "-n"])?;
    let count: u64 = marked
        .lines()
        .find(|l| l.contains("ECN"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no ECN rule counter in {marked}"))?;
    assert!(count >= 5, "{count} marked requests arrived: {marked}");
    assert_eq!(fast_b.stats()?.decapsulated, 0);
    Ok(())
}

#[test]
fn a_container_without_the_program_on_its_veth_takes_the_normal_path() -> TestResult {
    let (a, b) = peered(Mode::HostGw)?;
    let fast_a = a.fast_path()?;
    let fast_b = b.fast_path()?;
    let veth = a.host_veth()?;
    let on_veth = block_in_netns(&a.ns.path(), || async move {
        assert!(fastpath::remove_from(&veth).await?);
        assert!(!fastpath::remove_from(&veth).await?);
        fastpath::programs_on(&veth).await
    })?;
    assert!(on_veth.is_empty(), "{on_veth:?}");
    let out = five_pings(&a, b.container_address()?)?;
    assert!(out.contains("5 packets received"), "{out}");
    assert_eq!(out.matches("ttl=62").count(), 5, "{out}");
    // Out through node a's stack; in on both nodes through the fast path (a's address is in
    // its route map).
    let (sa, sb) = (fast_a.stats()?, fast_b.stats()?);
    assert_eq!(sa.to_nodes, 0, "{sa:?}");
    assert!(sa.to_containers >= 4, "{sa:?}");
    assert!(sb.to_containers >= 4, "{sb:?}");
    Ok(())
}

#[test]
fn a_published_port_reached_at_the_bridge_address_from_another_node_answers() -> TestResult {
    // The answer goes to a container on another node, inside the cluster CIDR: it must still
    // pass node a's reverse DNAT instead of the fast path.
    let (a, b) = peered(Mode::HostGw)?;
    let (_fast_a, _fast_b) = (a.fast_path()?, b.fast_path()?);
    fetch_published(&a, &b.ctr, a.subnet.gateway())
}

#[test]
fn a_container_reaches_its_own_published_port_at_its_node_address() -> TestResult {
    // Hairpin: the translated request leaves the bridge by the port it came in on, masqueraded
    // so that the answer comes back through conntrack.
    let (a, b) = peered(Mode::HostGw)?;
    let (_fast_a, _fast_b) = (a.fast_path()?, b.fast_path()?);
    fetch_published(&a, &a.ctr, a.address)
}

/// Node `server`'s container serves a page on port 8080, published as 18080; `client` fetches
/// it at `host`.
fn fetch_published(server: &Node, client: &TestNs, host: std::net::Ipv4Addr) -> TestResult {
    server.publish(18080, 8080)?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("index.html"), "published\n")?;
    let _server = Httpd::start(server, dir.path())?;
    let url = format!("http://{host}:18080/index.html");
    let body =
        fetch(client, &url, 20)?.map_err(|e| format!("{url} from {}: {e}", client.name()))?;
    assert_eq!(String::from_utf8_lossy(&body), "published\n");
    Ok(())
}

#[test]
fn setting_up_again_replaces_the_programs_and_forgets_removed_containers() -> TestResult {
    let (a, b) = peered(Mode::HostGw)?;
    let first = a.fast_path()?;
    let _fast_b = b.fast_path()?;
    let (veth, addr_a) = (a.host_veth()?, a.container_address()?);
    let again = a.fast_path()?;
    drop(first);
    let on = |interface: &str| -> TestResult<Vec<String>> {
        let interface = interface.to_string();
        Ok(block_in_netns(&a.ns.path(), || async move {
            fastpath::programs_on(&interface).await
        })?)
    };
    assert_eq!(on("wire")?, vec![TO_CONTAINERS.to_string()]);
    // Nothing on the bridge: there, br_netfilter may have translated a packet half-way.
    assert!(on("tug0")?.is_empty());
    assert_eq!(on(&veth)?, vec![FROM_CONTAINERS.to_string()]);
    let routes = again.routes()?;
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].0, addr_a);
    assert!(
        b.ctr.pings(addr_a)?,
        "container b -> container a after the reload"
    );
    assert!(again.stats()?.to_containers >= 1);

    assert!(again.detach(addr_a)?);
    assert!(!again.detach(addr_a)?);
    assert!(again.routes()?.is_empty());
    // Without its route the container is still reached, through the stack.
    assert!(
        b.ctr.pings(addr_a)?,
        "container b -> container a without a route entry"
    );

    let removed = block_in_netns(&a.ns.path(), || async {
        fastpath::remove_from("wire").await
    })?;
    assert!(removed);
    assert!(on("wire")?.is_empty());
    Ok(())
}

#[test]
fn a_new_ingress_device_takes_the_programs_off_the_old_one() -> TestResult {
    let (a, _b) = peered(Mode::HostGw)?;
    let first = a.fast_path()?;
    // The node's uplink changes (say, to a second NIC): here another veth pair in its namespace.
    a.ns.ip(&[
        "link", "add", "wire2", "type", "veth", "peer", "name", "wire2p",
    ])?;
    let cfg = FastPathConfig {
        cluster_cidr: subnet(CLUSTER)?,
        subnet: a.subnet,
        ingress: Some("wire2".into()),
        tunnel: None,
    };
    let (veth, address) = (a.host_veth()?, a.container_address()?);
    let on = |interface: &'static str| -> TestResult<Vec<String>> {
        Ok(block_in_netns(&a.ns.path(), || async move {
            fastpath::programs_on(interface).await
        })?)
    };
    let veth_programs = || -> TestResult<Vec<String>> {
        let veth = veth.clone();
        Ok(block_in_netns(&a.ns.path(), || async move {
            fastpath::programs_on(&veth).await
        })?)
    };
    let again = {
        let veth = veth.clone();
        block_in_netns(&a.ns.path(), || async move {
            let fast = FastPath::setup(&cfg).await?;
            fast.attach(&veth, address).await?;
            Ok(fast)
        })?
    };
    drop(first);
    // The old device's program would route by a map nothing updates any more.
    assert!(on("wire")?.is_empty(), "{:?}", on("wire")?);
    assert_eq!(on("wire2")?, vec![TO_CONTAINERS.to_string()]);
    assert_eq!(veth_programs()?, vec![FROM_CONTAINERS.to_string()]);

    // The fast path turned off: the node's programs go from every device; a container's
    // veth is the agent's to clear (it knows which are its containers').
    let removed = block_in_netns(&a.ns.path(), || async {
        fastpath::remove_node_programs_everywhere().await
    })?;
    assert_eq!(removed, vec!["wire2".to_string()]);
    assert!(on("wire2")?.is_empty());
    assert_eq!(veth_programs()?, vec![FROM_CONTAINERS.to_string()]);
    drop(again);
    Ok(())
}

#[test]
fn an_address_outside_the_node_subnet_is_refused() -> TestResult {
    let (a, _b) = two_nodes(Mode::HostGw)?;
    let fast = a.fast_path()?;
    let veth = a.host_veth()?;
    let foreign: std::net::Ipv4Addr = "10.88.2.9".parse()?;
    let Err(err) = block_in_netns(
        &a.ns.path(),
        || async move { fast.attach(&veth, foreign).await },
    ) else {
        return Err("10.88.2.9 is node b's, yet it was recorded".into());
    };
    assert!(
        err.to_string()
            .contains("outside the node subnet 10.88.1.0/24"),
        "{err}"
    );
    Ok(())
}

/// Two nodes (see `two_nodes`) with routes or VXLAN peers to each other.
fn peered(mode: Mode) -> TestResult<(Node, Node)> {
    let (a, b) = two_nodes(mode)?;
    peer_each_other(&a, &b)?;
    Ok((a, b))
}

/// Five pings from `from`'s container to `to`; busybox ping's output.
fn five_pings(from: &Node, to: impl std::fmt::Display) -> TestResult<String> {
    from.ctr.exec(&[
        "busybox",
        "ping",
        "-c",
        "5",
        "-i",
        "0.2",
        "-W",
        "2",
        &to.to_string(),
    ])
}

/// `(tx, rx)` packets of node `n`'s VXLAN device.
fn device_packets(n: &Node) -> TestResult<(u64, u64)> {
    let out = n.ns.ip(&[
        "-s",
        "-j",
        "link",
        "show",
        "dev",
        tug_netplugin::vxlan::DEFAULT_DEVICE,
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let stats = &v[0]["stats64"];
    let get = |dir: &str| stats[dir]["packets"].as_u64().ok_or("no packet count");
    Ok((get("tx")?, get("rx")?))
}
