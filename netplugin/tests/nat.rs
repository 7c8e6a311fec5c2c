//! Masquerade and published ports, as iptables rules inside a test namespace (the iptables
//! command is started from a thread inside it, so it only ever sees that namespace's tables).
//! Forwarding through the rules is shown end to end by `cli/tests/network.rs`.

mod common;

use std::net::{Ipv4Addr, TcpListener};

use common::{TestNs, TestResult, subnet};
use tug_netplugin::Error;
use tug_netplugin::nat::{self, PortMapping, Protocol};
use tug_netplugin::netns::block_in_netns;

fn tcp(host_port: u16, container_port: u16) -> PortMapping {
    PortMapping {
        host_port,
        container_port,
        protocol: Protocol::Tcp,
    }
}

fn rules(ns: &TestNs) -> TestResult<String> {
    Ok(format!(
        "{}{}",
        ns.exec(&["iptables", "-w", "-t", "nat", "-S"])?,
        ns.exec(&["iptables", "-w", "-t", "filter", "-S"])?
    ))
}

/// Runs `f` on a thread inside `ns`.
fn inside<T: Send>(
    ns: &TestNs,
    f: impl FnOnce() -> tug_netplugin::Result<T> + Send,
) -> TestResult<T> {
    Ok(block_in_netns(&ns.path(), || async { f() })?)
}

#[test]
fn masquerade_is_set_up_once_and_follows_the_subnet() -> TestResult {
    let ns = TestNs::new("nat")?;
    let cidr = subnet("10.88.0.0/16")?;
    inside(&ns, || {
        nat::setup_nat(subnet("10.88.3.0/24").map_err(|_| bad())?, cidr)
    })?;
    inside(&ns, || {
        nat::setup_nat(subnet("10.88.3.0/24").map_err(|_| bad())?, cidr)
    })?;
    let text = rules(&ns)?;
    // Traffic leaving the cluster, and published ports reached from inside it.
    assert_eq!(text.matches("-j MASQUERADE").count(), 2, "{text}");
    assert!(
        text.contains(
            "-A TUG-POSTROUTING -s 10.88.0.0/16 -d 10.88.3.0/24 -m conntrack --ctstate DNAT"
        ),
        "{text}"
    );
    assert_eq!(
        text.matches("-A POSTROUTING -j TUG-POSTROUTING").count(),
        1,
        "{text}"
    );
    assert_eq!(text.matches("-j TUG-HOSTPORTS").count(), 2, "{text}");
    assert!(
        text.contains("-A TUG-POSTROUTING -s 10.88.3.0/24 ! -d 10.88.0.0/16"),
        "{text}"
    );

    // A new subnet replaces the rule.
    inside(&ns, || {
        nat::setup_nat(subnet("10.88.4.0/24").map_err(|_| bad())?, cidr)
    })?;
    let text = rules(&ns)?;
    assert_eq!(text.matches("-j MASQUERADE").count(), 2, "{text}");
    assert!(text.contains("-s 10.88.4.0/24"), "{text}");
    assert!(text.contains("-d 10.88.4.0/24"), "{text}");
    assert!(!text.contains("10.88.3.0/24"), "{text}");

    inside(&ns, nat::teardown_nat)?;
    let text = rules(&ns)?;
    assert!(!text.contains("TUG-"), "{text}");
    Ok(())
}

fn bad() -> Error {
    Error::InvalidPort("test subnet".into())
}

#[test]
fn published_ports_conflict_clearly_and_leave_nothing_half_made() -> TestResult {
    let ns = TestNs::new("ports")?;
    let node_subnet = subnet("10.88.3.0/24")?;
    let cidr = subnet("10.88.0.0/16")?;
    inside(&ns, || nat::setup_nat(node_subnet, cidr))?;
    let c1 = Ipv4Addr::new(10, 88, 3, 2);
    let c2 = Ipv4Addr::new(10, 88, 3, 3);

    inside(&ns, || nat::publish("c1", c1, &[tcp(8080, 80)]))?;
    // The same again changes nothing.
    inside(&ns, || nat::publish("c1", c1, &[tcp(8080, 80)]))?;
    assert_eq!(rules(&ns)?.matches("--dport 8080").count(), 1);
    // Attached again with another address: the port follows it.
    let moved = Ipv4Addr::new(10, 88, 3, 9);
    inside(&ns, || nat::publish("c1", moved, &[tcp(8080, 80)]))?;
    inside(&ns, || nat::publish("c1", c1, &[tcp(8080, 80)]))?;
    let text = rules(&ns)?;
    assert_eq!(text.matches("--dport 8080").count(), 1, "{text}");
    assert!(text.contains("--to-destination 10.88.3.2:80"), "{text}");

    // Another container on the same port: refused, and its other port is not published either.
    let taken = inside(&ns, || {
        nat::publish("c2", c2, &[tcp(9090, 90), tcp(8080, 80)])
    });
    let message = taken.err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(
        message,
        "host port 8080/tcp is already published by container c1"
    );
    assert!(!rules(&ns)?.contains("--dport 9090"));

    // The same number over UDP is another port.
    let udp = PortMapping {
        protocol: Protocol::Udp,
        ..tcp(8080, 53)
    };
    inside(&ns, || nat::publish("c2", c2, &[udp]))?;

    // A program of the node listening on the port.
    let message = inside(&ns, || {
        let _listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7070))
            .map_err(|e| Error::InvalidPort(e.to_string()))?;
        Ok(nat::publish("c3", c2, &[tcp(7070, 70)])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default())
    })?;
    assert_eq!(
        message,
        "host port 7070/tcp is already in use by a program on this node"
    );
    // Twice in one request, and port 0.
    for ports in [vec![tcp(6060, 1), tcp(6060, 2)], vec![tcp(0, 1)]] {
        let err = inside(&ns, || nat::publish("c4", c2, &ports)).err();
        assert!(
            err.as_ref()
                .is_some_and(|e| e.to_string().starts_with("invalid port mapping")),
            "{err:?}"
        );
    }

    let published = inside(&ns, nat::published)?;
    let mut found: Vec<(String, u16)> = published
        .iter()
        .map(|p| (p.id.clone(), p.mapping.host_port))
        .collect();
    found.sort();
    assert_eq!(found, [("c1".to_string(), 8080), ("c2".to_string(), 8080)]);

    assert_eq!(inside(&ns, || nat::unpublish("c1"))?, 1);
    assert_eq!(inside(&ns, || nat::unpublish("c1"))?, 0);
    assert_eq!(inside(&ns, || nat::unpublish("c2"))?, 1);
    assert!(!rules(&ns)?.contains("-j DNAT"));
    inside(&ns, nat::teardown_nat)?;
    Ok(())
}

#[test]
fn two_hundred_publish_unpublish_cycles_leave_no_rule() -> TestResult {
    let ns = TestNs::new("cycles")?;
    let cidr = subnet("10.88.0.0/16")?;
    let node_subnet = subnet("10.88.3.0/24")?;
    inside(&ns, || nat::setup_nat(node_subnet, cidr))?;
    let before = rules(&ns)?;
    inside(&ns, || {
        for i in 0..200u16 {
            let id = format!("c{i}");
            let address = Ipv4Addr::new(10, 88, 3, 2 + (i % 250) as u8);
            nat::publish(
                &id,
                address,
                &[
                    tcp(20000 + i, 80),
                    PortMapping {
                        protocol: Protocol::Udp,
                        ..tcp(20000 + i, 53)
                    },
                ],
            )?;
            nat::unpublish(&id)?;
        }
        Ok(())
    })?;
    assert_eq!(rules(&ns)?, before);
    inside(&ns, nat::teardown_nat)?;
    Ok(())
}
