//! Container networking end to end, on the test bed (every host a network namespace; nothing
//! touches the machine's own interfaces, routes or iptables), once per cross-host mode:
//!
//! - each node gets its own subnet from the controller; each replica an address in it;
//! - a busybox `httpd` replica on host A is fetched with `wget` from a container on host B by
//!   address and by service name (three spellings), and pinged;
//! - its hostPort answers from another host's root namespace at A's address, from A itself, and
//!   from the replica itself (hairpin);
//! - egress to a host outside the cluster CIDR arrives from A's node address (masquerade);
//! - an agent restart keeps every container's address (and the container answers, through the
//!   restarted agent's fast path);
//! - a node removed from the cluster (`tug delete node`) has its routes (host-gw) or FDB entries
//!   (vxlan) removed on the others;
//! - deleting the service leaves no veth, DNAT rule or address behind;
//! - with `--big-tcp on`, uplinks and containers' veths take 192 KiB packets.

use std::error::Error;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tug_e2e::TestImages;
use tug_e2e::cluster::{AGENTS, Cluster, DESIRED_RUNNING, RUNNING};
use tug_netplugin::big_tcp::{BIG_TCP_SIZE, ipv4_gso_limit, kernel_has_ipv4_gso_limit};
use tug_netplugin::netns::block_in_netns;

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

const TUG: &str = env!("CARGO_BIN_EXE_tug");
const WAIT: Duration = Duration::from_secs(60);
const HOST_PORT: u16 = 18080;

fn wait(what: &str, check: impl FnMut() -> TestResult<bool>) -> TestResult {
    tug_e2e::cluster::wait_for(what, WAIT, check)
}

#[test]
fn host_gw_containers_reach_each_other_across_hosts() -> TestResult {
    run("host-gw", false)
}

#[test]
fn vxlan_containers_reach_each_other_across_hosts() -> TestResult {
    run("vxlan", false)
}

/// The same with Debian's standard CNI plugins (bridge + host-local) attaching the containers.
#[test]
fn cni_plugins_attach_containers_instead_of_the_built_in_setup() -> TestResult {
    run("host-gw", true)
}

/// bridge + host-local on the node's bridge and subnet; host-local keeps its leases in each
/// agent's own directory.
const CNI_CONF: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "tug-cni",
  "plugins": [{
    "type": "bridge", "bridge": "tug0", "isGateway": true, "ipMasq": false,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "$TUG_NODE_SUBNET"}]],
             "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$TUG_NETWORK_DIR/host-local"}
  }]
}"#;

#[test]
fn an_agent_restarted_with_the_fast_path_off_takes_its_programs_off() -> TestResult {
    restarted_with_the_fast_path_off("host-gw")
}

/// The same in vxlan mode, where a program also sits on the uplink to decapsulate.
#[test]
fn a_vxlan_agent_restarted_with_the_fast_path_off_takes_its_programs_off() -> TestResult {
    restarted_with_the_fast_path_off("vxlan")
}

fn restarted_with_the_fast_path_off(mode: &str) -> TestResult {
    let images = TestImages::get()?;
    let mut bed = Cluster::start_with(Path::new(TUG), "2s", &["--network-mode", mode])?;
    let result = fast_path_off(&mut bed, images, mode);
    if result.is_err() {
        bed.dump_logs();
    }
    let _ = bed.ok(&["delete", "service", "web"]);
    result
}

/// The tc filters of tug on node `node`'s interfaces, as `(interface, program)`.
fn tug_filters(bed: &Cluster, node: usize) -> TestResult<Vec<(String, String)>> {
    let host = bed.agent_host(node);
    let links = host.run(&["ip", "-o", "link", "show"])?;
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else {
            continue;
        };
        let out = host.run(&["tc", "filter", "show", "dev", name, "ingress"])?;
        for program in ["tug_from_ctr", "tug_to_ctr", "tug_vxlan_in"] {
            if String::from_utf8_lossy(&out.stdout).contains(program) {
                found.push((name.to_string(), program.to_string()));
            }
        }
    }
    Ok(found)
}

fn fast_path_off(bed: &mut Cluster, images: &TestImages, mode: &str) -> TestResult {
    wait_ready(bed)?;
    let web = apply_web(bed, images)?;
    let (a, b) = (&web[0], &web[1]);
    let body = fetch(bed, b, &a.address.to_string())?;
    assert_eq!(body.trim(), format!("web-{}", a.id));
    assert_fast_path(bed, b.node, a.node, mode, false)?;
    let on = tug_filters(bed, a.node)?;
    assert!(on.iter().any(|(_, p)| p == "tug_to_ctr"), "{on:?}");
    if mode == "vxlan" {
        assert!(
            on.iter()
                .any(|(i, p)| !i.starts_with("tv") && i != "tug.vxlan" && p == "tug_vxlan_in"),
            "{on:?}"
        );
    }
    assert!(
        on.iter()
            .any(|(i, p)| i.starts_with("tv") && p == "tug_from_ctr"),
        "{on:?}"
    );

    // Restarted with --fast-path off: its programs come off the uplink and off the veth of the
    // container that kept running, and traffic takes the normal path.
    if let Some(mut agent) = bed.agents[a.node].take() {
        agent.stop(Duration::from_secs(10))?;
    }
    bed.agents[a.node] = Some(bed.spawn_agent_with(a.node, &["--fast-path", "off"])?);
    wait("the restarted agent without a fast path", || {
        Ok(
            fast_path_packets(bed, a.node, "to_nodes").is_ok_and(|n| n.is_none())
                && replicas(bed)?.iter().any(|r| r.id == a.id),
        )
    })?;
    let left = tug_filters(bed, a.node)?;
    assert!(left.is_empty(), "{left:?}");
    let body = fetch(bed, b, &a.address.to_string())?;
    assert_eq!(body.trim(), format!("web-{}", a.id));
    Ok(())
}

fn run(mode: &str, cni: bool) -> TestResult {
    let images = TestImages::get()?;
    let conf = tempfile::tempdir()?;
    std::fs::write(conf.path().join("10-tug.conflist"), CNI_CONF)?;
    let conf_dir = conf.path().to_string_lossy().into_owned();
    let mut args = vec!["--network-mode", mode];
    if cni {
        args.extend(["--cni-conf-dir", &conf_dir]);
    }
    // Heartbeats every 2 s (down after 6 s): the agent restart below must come back before its
    // node is marked down, also on a loaded CI machine running three clusters at once.
    let mut bed = Cluster::start_with(Path::new(TUG), "2s", &args)?;
    let result = scenario(&mut bed, images, mode, cni);
    if result.is_err() {
        bed.dump_logs();
    }
    // The containers go before the hosts do.
    let _ = bed.ok(&["delete", "service", "web"]);
    result
}

/// `tug agent --big-tcp on`: every node's uplink and every container's host veth take
/// 192 KiB IPv4 packets (veths' drivers allow it), and containers still reach each other.
#[test]
fn agents_with_big_tcp_raise_uplinks_and_container_veths() -> TestResult {
    let probe = tug_e2e::Netns::create("bigtcp-probe")?;
    if block_in_netns(&probe.path(), || ipv4_gso_limit("lo"))?.is_none() {
        // Only a kernel without IPv4 BIG TCP lets this pass without running.
        if kernel_has_ipv4_gso_limit() != Some(false) {
            return Err("no IPv4 GSO limit read on a kernel release that has one".into());
        }
        eprintln!("this kernel has no IPv4 BIG TCP (before Linux 6.3): nothing to test");
        return Ok(());
    }
    let images = TestImages::get()?;
    let args = ["--network-mode", "host-gw", "--big-tcp", "on"];
    let bed = Cluster::start_with(Path::new(TUG), "2s", &args)?;
    let result = big_tcp(&bed, images);
    if result.is_err() {
        bed.dump_logs();
    }
    let _ = bed.ok(&["delete", "service", "web"]);
    result
}

fn big_tcp(bed: &Cluster, images: &TestImages) -> TestResult {
    wait_ready(bed)?;
    let web = apply_web(bed, images)?;
    for replica in &web {
        let node = replica.node;
        let ns = bed.agent_host(node).netns().path();
        let limits = block_in_netns(&ns, || async {
            let mut found = vec![("eth0".to_string(), ipv4_gso_limit("eth0").await?)];
            let veth = tug_netplugin::host_veth_name(&replica.id);
            found.push((veth.clone(), ipv4_gso_limit(&veth).await?));
            Ok(found)
        })?;
        for (link, limit) in limits {
            assert_eq!(limit, Some(BIG_TCP_SIZE), "node {node}, {link}");
        }
    }
    let (a, b) = (&web[0], &web[1]);
    let body = fetch(bed, b, &a.address.to_string())?;
    assert_eq!(body.trim(), format!("web-{}", a.id));
    Ok(())
}

/// A running replica: task id, node index, address.
#[derive(Debug, Clone)]
struct Replica {
    id: String,
    node: usize,
    address: Ipv4Addr,
}

fn replicas(bed: &Cluster) -> TestResult<Vec<Replica>> {
    let mut out = Vec::new();
    for t in bed.tasks("web")? {
        if t["desired_state"] != DESIRED_RUNNING || t["status"]["state"] != RUNNING {
            continue;
        }
        let node = t["node"].as_str().unwrap_or_default();
        let Some(index) = node.strip_prefix('a').and_then(|i| i.parse().ok()) else {
            continue;
        };
        let Ok(address) = t["status"]["address"].as_str().unwrap_or_default().parse() else {
            continue;
        };
        out.push(Replica {
            id: t["id"].as_str().unwrap_or_default().to_string(),
            node: index,
            address,
        });
    }
    out.sort_by_key(|r| r.node);
    Ok(out)
}

fn subnets(bed: &Cluster) -> TestResult<Vec<(String, String)>> {
    let out = bed.ok(&["get", "nodes", "-o", "json"])?;
    let nodes: Value = serde_json::from_str(&out)?;
    Ok(nodes
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["node"]["description"]["name"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                        n["node"]["subnet"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

fn exec(bed: &Cluster, task: &str, command: &[&str]) -> TestResult<String> {
    let mut args = vec!["exec", task, "--"];
    args.extend_from_slice(command);
    bed.ok(&args)
}

fn fetch(bed: &Cluster, from: &Replica, host: &str) -> TestResult<String> {
    let url = format!("http://{host}:8080/index.html");
    exec(bed, &from.id, &["wget", "-q", "-O", "-", &url])
}

/// An HTTP GET over a connection made in `host`'s network namespace.
fn http_get(host: &tug_e2e::net::Host, to: SocketAddr) -> TestResult<String> {
    let mut stream = host.connect(to, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

/// Replica `r` reaches its own published port at its node's address (hairpin).
fn assert_hairpin(bed: &Cluster, r: &Replica) -> TestResult {
    let node = bed.agent_host(r.node).addr();
    let url = format!("http://{node}:{HOST_PORT}/");
    let own = exec(bed, &r.id, &["wget", "-q", "-O", "-", &url])?;
    assert_eq!(
        own.trim(),
        format!("web-{}", r.id),
        "{url} from its own container"
    );
    Ok(())
}

/// `tug_agent_fast_path_packets_total` of node `node` in `direction`, from its agent's
/// `/metrics`; `None` when the agent has no fast path.
fn fast_path_packets(bed: &Cluster, node: usize, direction: &str) -> TestResult<Option<f64>> {
    agent_counter(
        bed,
        node,
        "tug_agent_fast_path_packets_total",
        &format!("direction=\"{direction}\""),
    )
}

/// The sample of counter `name` with `label` from node `node`'s agent's `/metrics`.
fn agent_counter(bed: &Cluster, node: usize, name: &str, label: &str) -> TestResult<Option<f64>> {
    let host = bed.agent_host(node);
    let mut stream = host.connect(
        SocketAddr::from((host.addr(), 7443)),
        Duration::from_secs(5),
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let prefix = format!("{name}{{");
    Ok(text
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok()))
}

/// With the built-in plugin, traffic from node `from`'s containers to node `to`'s took the
/// eBPF fast path on both ends (in vxlan mode encapsulated and decapsulated by its programs);
/// with CNI plugins there is none.
fn assert_fast_path(bed: &Cluster, from: usize, to: usize, mode: &str, cni: bool) -> TestResult {
    if mode == "vxlan" && !cni {
        let name = "tug_agent_fast_path_vxlan_packets_total";
        let sent = agent_counter(bed, from, name, "operation=\"encapsulated\"")?;
        let delivered = agent_counter(bed, to, name, "operation=\"decapsulated\"")?;
        assert!(
            sent.is_some_and(|n| n > 0.0),
            "a{from} encapsulated {sent:?}"
        );
        assert!(
            delivered.is_some_and(|n| n > 0.0),
            "a{to} decapsulated {delivered:?}"
        );
    }
    let sent = fast_path_packets(bed, from, "to_nodes")?;
    let delivered = fast_path_packets(bed, to, "to_containers")?;
    if cni {
        assert_eq!(
            (sent, delivered),
            (None, None),
            "a fast path with CNI plugins"
        );
    } else {
        assert!(sent.is_some_and(|n| n > 0.0), "a{from} sent {sent:?}");
        assert!(
            delivered.is_some_and(|n| n > 0.0),
            "a{to} delivered {delivered:?}"
        );
    }
    Ok(())
}

fn wait_ready(bed: &Cluster) -> TestResult {
    wait("three ready nodes", || {
        let out = bed.ok(&["get", "nodes", "-o", "json"])?;
        Ok(out.matches("\"state\": 1").count() == AGENTS)
    })
}

/// Service `web` (busybox httpd, hostPort) with one replica per node, once they run.
fn apply_web(bed: &Cluster, images: &TestImages) -> TestResult<Vec<Replica>> {
    let image = images.oci.reference(&bed.registry);
    let manifest = bed.base_dir().join("web.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: tug.dev/v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  image: {image}\n  replicas: {AGENTS}\n  command: [\"/bin/sh\", \"-c\"]\n  args: [\"echo web-$(hostname) > /tmp/index.html && exec httpd -f -p 8080 -h /tmp\"]\n  ports:\n    - containerPort: 8080\n      hostPort: {HOST_PORT}\n  resources:\n    cpu: 100m\n    memory: 32Mi\n  stopGracePeriod: 2s\n"
        ),
    )?;
    bed.apply(&manifest)?;
    wait("one replica per node, with addresses", || {
        let r = replicas(bed)?;
        Ok(r.len() == AGENTS && r.iter().map(|r| r.node).eq(0..AGENTS))
    })?;
    replicas(bed)
}

fn scenario(bed: &mut Cluster, images: &TestImages, mode: &str, cni: bool) -> TestResult {
    wait_ready(bed)?;
    // Three nodes, three different subnets of the cluster CIDR.
    let nets = subnets(bed)?;
    let mut distinct: Vec<&String> = nets.iter().map(|(_, s)| s).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), AGENTS, "{nets:?}");
    assert!(
        nets.iter()
            .all(|(_, s)| s.starts_with("10.88.") && s.ends_with("/24")),
        "{nets:?}"
    );

    let web = apply_web(bed, images)?;
    for r in &web {
        let (_, subnet) = &nets[r.node];
        let prefix = subnet.rsplit_once(".0/").map(|(p, _)| p).unwrap_or("");
        assert!(
            r.address.to_string().starts_with(&format!("{prefix}.")),
            "{r:?} is not in {subnet}"
        );
    }
    let (a, b) = (&web[0], &web[1]);

    // By address, across hosts.
    let body = fetch(bed, b, &a.address.to_string())?;
    assert_eq!(body.trim(), format!("web-{}", a.id));
    // Ping across hosts.
    exec(
        bed,
        &b.id,
        &["ping", "-c", "1", "-W", "3", &a.address.to_string()],
    )?;
    assert_fast_path(bed, b.node, a.node, mode, cni)?;
    // By service name: the agent's DNS answers with the running replicas.
    for name in ["web", "web.default", "web.default.svc.tug"] {
        let body = fetch(bed, b, name)?;
        assert!(body.starts_with("web-web."), "{name}: {body:?}");
    }
    let resolv = exec(bed, &b.id, &["cat", "/etc/resolv.conf"])?;
    assert!(
        resolv.contains("search default.svc.tug svc.tug"),
        "{resolv}"
    );
    let hosts = exec(bed, &b.id, &["cat", "/etc/hosts"])?;
    assert!(
        hosts.contains(&format!("{}\t{}", b.address, b.id)),
        "{hosts}"
    );

    // The hostPort, from another host's root namespace and from the node itself.
    let published = SocketAddr::from((bed.agent_host(a.node).addr(), HOST_PORT));
    let from_c = http_get(bed.agent_host(2), published)?;
    assert!(from_c.contains(&format!("web-{}", a.id)), "{from_c}");
    let from_self = http_get(bed.agent_host(a.node), published)?;
    assert!(from_self.contains(&format!("web-{}", a.id)), "{from_self}");
    // From a container on another node at A's bridge address (inside the cluster CIDR: the
    // answer must still pass A's reverse DNAT, not the fast path).
    let bridge_a = nets[a.node].1.replacen(".0/24", ".1", 1);
    let via_bridge = exec(
        bed,
        &b.id,
        &[
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{bridge_a}:{HOST_PORT}/"),
        ],
    )?;
    assert_eq!(via_bridge.trim(), format!("web-{}", a.id), "via {bridge_a}");
    // Hairpin: A's container reaches its own published port at its node's address (the
    // built-in plugin's bridge ports; CNI's bridge plugin leaves hairpin mode to its config).
    if !cni {
        assert_hairpin(bed, a)?;
    }
    // Egress: a host outside the cluster CIDR sees the node's address.
    let outside = bed.client_host();
    let listener = outside
        .netns()
        .run_in(|| TcpListener::bind((outside.addr(), 0)))??;
    let port = listener.local_addr()?.port();
    let target = format!("http://{}:{port}/", outside.addr());
    let accept = std::thread::spawn(move || -> Option<Ipv4Addr> {
        let (mut conn, peer) = listener.accept().ok()?;
        let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        match peer {
            SocketAddr::V4(v4) => Some(*v4.ip()),
            SocketAddr::V6(_) => None,
        }
    });
    let _ = exec(bed, &a.id, &["wget", "-q", "-O", "-", &target])?;
    let seen = accept.join().map_err(|_| "accept thread panicked")?;
    assert_eq!(seen, Some(bed.agent_host(a.node).addr()), "egress source");

    // An agent restart keeps every container's address. (The running container's bridge port
    // loses hairpin mode first, as one wired by an agent without it: the restarted agent puts it
    // back.)
    if !cni {
        let veth = tug_netplugin::container::host_veth_name(&a.id);
        let off = [
            "link",
            "set",
            "dev",
            &veth,
            "type",
            "bridge_slave",
            "hairpin",
            "off",
        ];
        let out = bed
            .agent_host(a.node)
            .run(&[&["ip"][..], &off[..]].concat())?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Some(mut agent) = bed.agents[a.node].take() {
        agent.stop(Duration::from_secs(10))?;
    }
    bed.agents[a.node] = Some(bed.spawn_agent(a.node)?);
    std::thread::sleep(Duration::from_secs(2));
    wait("the restarted agent's replica", || {
        Ok(replicas(bed)?.iter().any(|r| r.id == a.id))
    })?;
    let after: Vec<(String, Ipv4Addr)> = replicas(bed)?
        .into_iter()
        .map(|r| (r.id, r.address))
        .collect();
    let before: Vec<(String, Ipv4Addr)> = web.iter().map(|r| (r.id.clone(), r.address)).collect();
    assert_eq!(after, before, "addresses after an agent restart");
    let body = fetch(bed, b, &a.address.to_string())?;
    assert_eq!(body.trim(), format!("web-{}", a.id));
    // The restarted agent loaded the fast path anew (counters from 0) with the running
    // container in it, both ways.
    assert_fast_path(bed, b.node, a.node, mode, cni)?;
    assert_fast_path(bed, a.node, b.node, mode, cni)?;
    if !cni {
        assert_hairpin(bed, a)?;
    }

    // A node removed from the cluster: the others forget how to reach its subnet.
    let gone = 2;
    let gone_subnet = nets[gone].1.clone();
    let peer_entry = |bed: &Cluster| -> TestResult<bool> {
        let host = bed.agent_host(0);
        let text = if mode == "vxlan" {
            let out = host.run(&["bridge", "fdb", "show", "dev", "tug.vxlan"])?;
            let ip = bed.agent_host(gone).addr().to_string();
            return Ok(String::from_utf8_lossy(&out.stdout).contains(&ip));
        } else {
            host.run(&["ip", "route", "show", "proto", "167"])?
        };
        Ok(String::from_utf8_lossy(&text.stdout).contains(&gone_subnet))
    };
    assert!(peer_entry(bed)?, "a0 has a way to {gone_subnet}");
    if let Some(mut agent) = bed.agents[gone].take() {
        agent.kill()?;
    }
    wait("the node marked down", || {
        let out = bed.ok(&["get", "nodes", "-o", "json"])?;
        Ok(out.matches("\"state\": 2").count() == 1)
    })?;
    let refused = bed.tug(&["delete", "node", "a0"])?;
    if refused.status.success() {
        return Err(format!(
            "a ready node was removed:\n{}",
            bed.ok(&["nodes"]).unwrap_or_default()
        )
        .into());
    }
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("only a down node can be removed"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    bed.ok(&["delete", "node", &format!("a{gone}")])?;
    wait("the removed node's routes gone", || Ok(!peer_entry(bed)?))?;
    // Its containers still run (the agent was killed): stop them by hand at the end.
    let stale: Vec<String> = bed.containers(gone).into_keys().collect();
    for id in stale {
        let _ = std::process::Command::new(TUG)
            .arg("--data-dir")
            .arg(bed.agent_dir(gone))
            .args(["rm", "-f", &id])
            .output();
    }

    // Delete: nothing of the containers' networks is left on the nodes that run.
    bed.ok(&["delete", "service", "web"])?;
    wait("every replica gone", || {
        Ok((0..2).all(|i| bed.containers(i).is_empty()))
    })?;
    for i in 0..2 {
        let host = bed.agent_host(i);
        let links = host.run(&["ip", "-o", "link", "show"])?;
        let links = String::from_utf8_lossy(&links.stdout).into_owned();
        assert!(
            !links.contains(": tv"),
            "a{i} keeps a container veth:\n{links}"
        );
        let rules = host.run(&["iptables", "-w", "-t", "nat", "-S", "TUG-HOSTPORTS"])?;
        let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
        assert!(!rules.contains("DNAT"), "a{i} keeps a DNAT rule:\n{rules}");
        if cni {
            // host-local keeps one file per leased address (named by it).
            let leases = bed.agent_dir(i).join("network/host-local/tug-cni");
            let left: Vec<String> = std::fs::read_dir(&leases)?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("10.88."))
                .collect();
            assert!(left.is_empty(), "a{i} keeps host-local leases: {left:?}");
        } else {
            let ipam = std::fs::read_to_string(bed.agent_dir(i).join("network/ipam/ipam.json"))
                .unwrap_or_default();
            assert!(!ipam.contains("web."), "a{i} keeps an address:\n{ipam}");
        }
    }
    Ok(())
}
