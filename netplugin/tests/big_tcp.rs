//! IPv4 BIG TCP between two "nodes" (see `common::cluster`): node setup raises the uplink only
//! when asked, containers in host-gw mode follow the uplink's limit whoever raised it, vxlan
//! containers keep 64 KiB, `check` reports a veth whose limit differs, and TCP across nodes
//! arrives intact through the stack and through the fast path with the larger packets.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use common::cluster::{Node, peer_each_other, two_nodes, two_nodes_with};
use common::http::{Httpd, transfer};
use common::{TestNs, TestResult};
use tug_netplugin::big_tcp::{
    BIG_TCP_SIZE, LEGACY_SIZE, ipv4_gso_limit, kernel_has_ipv4_gso_limit,
};
use tug_netplugin::container::ensure_running;
use tug_netplugin::netns::block_in_netns;
use tug_netplugin::{DriftItem, Error, Mode, check, setup_node};

/// Whether this kernel has a separate IPv4 GSO limit (Linux 6.3+). Only a kernel release
/// before 6.3 lets the tests pass without running (there is nothing to raise); on a later
/// one, a limit that cannot be read is a failure.
fn supported() -> TestResult<bool> {
    let ns = TestNs::new("probe")?;
    let limit = block_in_netns(&ns.path(), || ipv4_gso_limit("lo"))?;
    match (limit, kernel_has_ipv4_gso_limit()) {
        (Some(_), _) => Ok(true),
        (None, Some(false)) => {
            eprintln!("this kernel has no IPv4 BIG TCP (before Linux 6.3): nothing to test");
            Ok(false)
        }
        (None, _) => Err("no IPv4 GSO limit read on a kernel release that has one".into()),
    }
}

fn limit(node: &Node, link: &str) -> TestResult<Option<u32>> {
    Ok(block_in_netns(&node.ns.path(), || ipv4_gso_limit(link))?)
}

/// The limit of `node`'s container's end of the veth pair.
fn eth0_limit(node: &Node) -> TestResult<Option<u32>> {
    Ok(block_in_netns(&node.ctr.path(), || ipv4_gso_limit("eth0"))?)
}

/// `(bytes, packets)` of `eth0`'s `dir` ("tx" or "rx") counters in `ns`.
fn eth0_counters(ns: &TestNs, dir: &str) -> TestResult<(f64, f64)> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", "eth0"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let c = &v[0]["stats64"][dir];
    let get = |k: &str| c[k].as_f64().ok_or("no packet counters");
    Ok((get("bytes")?, get("packets")?))
}

/// `node`'s uplink at `uplink`, and its container's veth ends at `containers` (what node setup
/// gave them, `None` below BIG TCP sizes).
fn assert_limits(node: &Node, uplink: u32, containers: u32) -> TestResult {
    assert_eq!(limit(node, "wire")?, Some(uplink));
    let expected = (containers > LEGACY_SIZE).then_some(containers);
    assert_eq!(node.container_gso, expected);
    assert_eq!(limit(node, &node.host_veth()?)?, Some(containers));
    assert_eq!(eth0_limit(node)?, Some(containers));
    Ok(())
}

/// Bytes per packet `from`'s container sent, and `to`'s container received, while 256 MiB
/// stream between them over TCP (written and read 1 MiB at a time). Above 64 KiB only with BIG
/// TCP; the received figure only if every device on the way passed the packets whole.
fn packet_sizes(from: &Node, to: &Node) -> TestResult<(f64, f64)> {
    let sent = || eth0_counters(&from.ctr, "tx");
    let received = || eth0_counters(&to.ctr, "rx");
    let listener = block_in_netns(&to.ctr.path(), || async {
        Ok(TcpListener::bind("0.0.0.0:9000"))
    })??;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match stream.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    });
    let before = (sent()?, received()?);
    let addr = SocketAddr::from((to.container_address()?, 9000));
    let mut stream = block_in_netns(
        &from.ctr.path(),
        || async move { Ok(TcpStream::connect(addr)) },
    )??;
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..256 {
        stream.write_all(&chunk)?;
    }
    drop(stream);
    let total = reader.join().map_err(|_| "the reader panicked")??;
    assert_eq!(total, 256 << 20);
    let after = (sent()?, received()?);
    let per_packet = |a: (f64, f64), b: (f64, f64)| (b.0 - a.0) / (b.1 - a.1).max(1.0);
    Ok((per_packet(before.0, after.0), per_packet(before.1, after.1)))
}

/// Which packets of a stream must be larger than 64 KiB.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Big {
    Both,
    Neither,
}

/// `(sent, received)` bytes a packet as `packet_sizes` gives them, against `want`.
fn assert_packets((sent, received): (f64, f64), want: Big) {
    let legacy = f64::from(LEGACY_SIZE);
    let big = (sent > legacy, received > legacy);
    let expected = match want {
        Big::Both => (true, true),
        Big::Neither => (false, false),
    };
    assert_eq!(
        big, expected,
        "{sent:.0} bytes a packet sent, {received:.0} received; {want:?} should be above 64 KiB"
    );
}

#[test]
fn host_gw_containers_take_the_uplink_limit_node_setup_raised() -> TestResult {
    if !supported()? {
        return Ok(());
    }
    let (a, b) = two_nodes_with(Mode::HostGw, true, None)?;
    for n in [&a, &b] {
        // A veth's driver takes up to 512 KiB, so the limit is tug's 192 KiB.
        assert_limits(n, BIG_TCP_SIZE, BIG_TCP_SIZE)?;
        assert_eq!(limit(n, "tug0")?, Some(BIG_TCP_SIZE));
        let net = n.container_net()?;
        block_in_netns(&n.ns.path(), || check(&net))?;
    }
    // Idempotent: a second setup (an agent restart) finds nothing to change.
    let cfg = a.node_config();
    let again = block_in_netns(&a.ns.path(), || setup_node(&cfg))?;
    assert!(!again.changed, "{again:?}");
    assert_eq!(again.gso_ipv4_max_size, Some(BIG_TCP_SIZE));

    // A veth made without the limit is drift.
    let mut net = a.container_net()?;
    net.gso_ipv4_max_size = None;
    let err = block_in_netns(&a.ns.path(), || check(&net)).err();
    let Some(Error::Drift { drift, .. }) = err else {
        panic!("check passed a veth with another limit: {err:?}");
    };
    let item = |veth: String| DriftItem::GsoLimit {
        veth,
        want: LEGACY_SIZE,
        have: BIG_TCP_SIZE,
    };
    assert_eq!(drift.0, vec![item(a.host_veth()?), item("eth0".into())]);

    peer_each_other(&a, &b)?;
    let dir = tempfile::tempdir()?;
    let _server = Httpd::start(&b, dir.path())?;
    let to = b.container_address()?;
    // Through the bridge and IP forwarding, then through the fast path.
    transfer(&a, to, dir.path())?;
    assert_packets(packet_sizes(&a, &b)?, Big::Both);
    let (_fa, _fb) = (a.fast_path()?, b.fast_path()?);
    transfer(&a, to, dir.path())?;
    assert_packets(packet_sizes(&a, &b)?, Big::Both);
    Ok(())
}

#[test]
fn containers_follow_an_uplink_the_operator_raised() -> TestResult {
    if !supported()? {
        return Ok(());
    }
    let (a, _b) = two_nodes_with(Mode::HostGw, false, Some(131_072))?;
    assert_limits(&a, 131_072, 131_072)?;
    Ok(())
}

#[test]
fn vxlan_containers_keep_64k_packets_under_a_raised_uplink() -> TestResult {
    if !supported()? {
        return Ok(());
    }
    let (a, b) = two_nodes_with(Mode::Vxlan, true, None)?;
    assert_limits(&a, BIG_TCP_SIZE, LEGACY_SIZE)?;
    assert_eq!(limit(&a, "tug0")?, Some(LEGACY_SIZE));
    let net = a.container_net()?;
    block_in_netns(&a.ns.path(), || check(&net))?;

    peer_each_other(&a, &b)?;
    let (_fa, _fb) = (a.fast_path()?, b.fast_path()?);
    let dir = tempfile::tempdir()?;
    let _server = Httpd::start(&b, dir.path())?;
    transfer(&a, b.container_address()?, dir.path())?;
    // 256 MiB in VXLAN, the programs encapsulating packets of at most 64 KiB.
    assert_packets(packet_sizes(&a, &b)?, Big::Neither);
    Ok(())
}

#[test]
fn without_big_tcp_nothing_is_raised() -> TestResult {
    if !supported()? {
        return Ok(());
    }
    let (a, b) = two_nodes(Mode::HostGw)?;
    assert_limits(&a, LEGACY_SIZE, LEGACY_SIZE)?;
    peer_each_other(&a, &b)?;
    assert_packets(packet_sizes(&a, &b)?, Big::Neither);
    Ok(())
}

#[test]
fn running_containers_host_veths_take_a_changed_limit() -> TestResult {
    if !supported()? {
        return Ok(());
    }
    // Wired with BIG TCP; then the node's limit goes back to 64 KiB (the operator lowered the
    // uplink) and the agent starts again.
    let (a, _b) = two_nodes_with(Mode::HostGw, true, None)?;
    let ids = [a.container_net()?.id];
    let ensure = |size| {
        block_in_netns(&a.ns.path(), || async {
            ensure_running(&ids, size).await;
            Ok(())
        })
    };
    ensure(None)?;
    assert_eq!(limit(&a, &a.host_veth()?)?, Some(LEGACY_SIZE));
    // The container's own end keeps its limit until it restarts (the agent warns).
    assert_eq!(eth0_limit(&a)?, Some(BIG_TCP_SIZE));
    ensure(Some(BIG_TCP_SIZE))?;
    assert_eq!(limit(&a, &a.host_veth()?)?, Some(BIG_TCP_SIZE));
    Ok(())
}
