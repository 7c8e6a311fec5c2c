//! The eBPF fast path between two "nodes" (see `common::cluster`), in both cross-host modes:
//! containers still reach each other (ICMP and a TCP transfer, checked end to end), the
//! programs' counters show the packets took the fast path both ways (from the container's veth,
//! and from the bridge before the veth is hooked), TTLs are decremented as by a router, and
//! loading again (an agent restart) replaces the programs instead of stacking them.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::TestResult;
use common::cluster::{Node, two_nodes};
use tug_netplugin::Mode;
use tug_netplugin::fastpath::{self, FROM_CONTAINERS, TO_CONTAINERS};
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
    let (a, b) = two_nodes(mode)?;
    a.sync(&[(b.subnet, b.address)])?;
    b.sync(&[(a.subnet, a.address)])?;
    let (fast_a, fast_b) = (a.fast_path()?, b.fast_path()?);
    let (addr_a, addr_b) = (a.container_address()?, b.container_address()?);

    let out = a.ctr.exec(&[
        "busybox",
        "ping",
        "-c",
        "5",
        "-i",
        "0.2",
        "-W",
        "2",
        &addr_b.to_string(),
    ])?;
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

    // TCP with segmentation offloads: 8 MiB fetched over HTTP arrive intact.
    let dir = tempfile::tempdir()?;
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("blob"), &data)?;
    let _server = Httpd::start(&b, dir.path())?;
    let before = fast_a.stats()?;
    let url = format!("http://{addr_b}:8080/blob");
    let mut fetched = None;
    for _ in 0..50 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                a.ctr.name(),
                "busybox",
                "wget",
                "-q",
                "-O",
                "-",
            ])
            .arg(&url)
            .output()?;
        if out.status.success() {
            fetched = Some(out.stdout);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let fetched = fetched.ok_or("the HTTP server in container b never answered")?;
    assert!(
        fetched == data,
        "{} bytes fetched, not the same 8 MiB",
        fetched.len()
    );
    let after = fast_a.stats()?;
    assert!(after.to_containers > before.to_containers, "{after:?}");
    assert!(after.to_nodes > before.to_nodes, "{after:?}");

    // Node b's own address is outside the cluster CIDR: that traffic keeps the normal path
    // (and its masquerade), and still works.
    assert!(a.ctr.pings(b.address)?, "container a -> node b");
    assert!(b.ctr.pings(addr_a)?, "container b -> container a");
    Ok(())
}

#[test]
fn the_bridge_program_serves_a_container_whose_veth_is_not_hooked_yet() -> TestResult {
    let (a, b) = two_nodes(Mode::HostGw)?;
    a.sync(&[(b.subnet, b.address)])?;
    b.sync(&[(a.subnet, a.address)])?;
    let fast_a = a.fast_path_hooking(false)?;
    let _fast_b = b.fast_path()?;
    let veth = a.host_veth()?;
    let on_veth = block_in_netns(&a.ns.path(), || async move { fastpath::programs_on(&veth) })?;
    assert!(on_veth.is_empty(), "{on_veth:?}");
    let out = a.ctr.exec(&[
        "busybox",
        "ping",
        "-c",
        "5",
        "-i",
        "0.2",
        "-W",
        "2",
        &b.container_address()?.to_string(),
    ])?;
    assert!(out.contains("5 packets received"), "{out}");
    // Every reply, not just one that took the stack.
    assert_eq!(out.matches("ttl=62").count(), 5, "{out}");
    let stats = fast_a.stats()?;
    assert!(stats.to_nodes >= 4, "{stats:?}");
    Ok(())
}

#[test]
fn setting_up_again_replaces_the_programs_and_forgets_removed_containers() -> TestResult {
    let (a, b) = two_nodes(Mode::HostGw)?;
    a.sync(&[(b.subnet, b.address)])?;
    b.sync(&[(a.subnet, a.address)])?;
    let first = a.fast_path()?;
    let _fast_b = b.fast_path()?;
    let (veth, addr_a) = (a.host_veth()?, a.container_address()?);
    let again = a.fast_path()?;
    drop(first);
    let on = |interface: &str| -> TestResult<Vec<String>> {
        let interface = interface.to_string();
        Ok(block_in_netns(&a.ns.path(), || async move {
            fastpath::programs_on(&interface)
        })?)
    };
    assert_eq!(on("wire")?, vec![TO_CONTAINERS.to_string()]);
    assert_eq!(on("tug0")?, vec![FROM_CONTAINERS.to_string()]);
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

    let removed = block_in_netns(&a.ns.path(), || async { fastpath::remove_from("wire") })?;
    assert_eq!(removed, 1);
    assert!(on("wire")?.is_empty());
    Ok(())
}

#[test]
fn an_address_outside_the_node_subnet_is_refused() -> TestResult {
    let (a, _b) = two_nodes(Mode::HostGw)?;
    let fast = a.fast_path()?;
    let veth = a.host_veth()?;
    let err = block_in_netns(&a.ns.path(), || async move {
        fast.attach(&veth, "10.88.2.9".parse().expect("valid"))
    })
    .expect_err("10.88.2.9 is node b's");
    assert!(
        err.to_string()
            .contains("outside the node subnet 10.88.1.0/24"),
        "{err}"
    );
    Ok(())
}

/// busybox httpd in a node's container, stopped (by PID) on drop.
struct Httpd(Child);

impl Httpd {
    fn start(node: &Node, dir: &Path) -> TestResult<Httpd> {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                node.ctr.name(),
                "busybox",
                "httpd",
                "-f",
                "-p",
                "8080",
                "-h",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Httpd(child))
    }
}

impl Drop for Httpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
