//! Egress masquerade and published ports (hostPort), as iptables rules in tug's own chains.
//!
//! Why iptables rules and not a userspace proxy: the kernel forwards published traffic at wire
//! speed with no copy through a process, the container sees the client's real source address,
//! and UDP works the same as TCP; it is what the CNI `portmap` plugin and kube-proxy do. The
//! `iptables` command is used (not raw netfilter messages): on Debian 12 it is the nft backend,
//! elsewhere the legacy one, and both take the same rules.
//!
//! Chains (all created here, jumped to once from the built-in chains):
//! - `nat TUG-POSTROUTING` (from POSTROUTING): masquerade traffic from the node subnet to
//!   anywhere outside the cluster CIDR, so it leaves with the node's address, and published-port
//!   traffic from inside the cluster, so its answers pass the node's conntrack again.
//! - `nat TUG-HOSTPORTS` (from PREROUTING and OUTPUT, for local destination addresses): one DNAT
//!   rule per published port, commented `tug:<container id>` so it is found again by id.
//! - `filter TUG-FORWARD` (from FORWARD): accept traffic from the cluster CIDR, and to it only
//!   what answers it or what a published port sent there, so a host firewall's DROP policy does
//!   not cut containers off and does not open their unpublished ports either.
//!
//! Every function works in the network namespace of the calling thread (the iptables command is
//! a child process, which starts in its parent thread's namespace), and a process-wide lock keeps
//! two changes from interleaving.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::process::Command;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::subnet::Subnet;

pub const POSTROUTING_CHAIN: &str = "TUG-POSTROUTING";
pub const HOSTPORTS_CHAIN: &str = "TUG-HOSTPORTS";
pub const FORWARD_CHAIN: &str = "TUG-FORWARD";

static LOCK: Mutex<()> = Mutex::new(());

const LOCAL_HOSTPORTS: &[&str] = &[
    "-m",
    "addrtype",
    "--dst-type",
    "LOCAL",
    "-j",
    HOSTPORTS_CHAIN,
];

/// The jumps from the built-in chains into tug's: (table, chain, rule).
const JUMPS: [(&str, &str, &[&str]); 4] = [
    ("nat", "POSTROUTING", &["-j", POSTROUTING_CHAIN]),
    ("nat", "PREROUTING", LOCAL_HOSTPORTS),
    ("nat", "OUTPUT", LOCAL_HOSTPORTS),
    ("filter", "FORWARD", &["-j", FORWARD_CHAIN]),
];

/// A port published on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// "tcp" or "udp", any case; empty means tcp.
    pub fn parse(text: &str) -> Result<Protocol> {
        match text.to_ascii_lowercase().as_str() {
            "" | "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(Error::InvalidPort(format!(
                "protocol {other:?} is not tcp or udp"
            ))),
        }
    }
}

/// Create tug's chains and jumps and make the masquerade rule exactly the one for `subnet`
/// leaving `cluster_cidr`. Idempotent; run at every agent start.
pub fn setup_nat(subnet: Subnet, cluster_cidr: Subnet) -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    ensure_chain("nat", POSTROUTING_CHAIN)?;
    ensure_chain("nat", HOSTPORTS_CHAIN)?;
    ensure_chain("filter", FORWARD_CHAIN)?;
    for (table, chain, rule) in JUMPS {
        ensure_rule(table, chain, rule)?;
    }

    // The masquerade chain holds exactly this node's rule: flushed and written again, so a
    // changed subnet leaves no stale rule.
    iptables(&["-t", "nat", "-F", POSTROUTING_CHAIN])?;
    let (src, cidr) = (subnet.to_string(), cluster_cidr.to_string());
    masquerade(
        &["-s", &src, "!", "-d", &cidr],
        "tug: masquerade traffic leaving the cluster",
    )?;
    // A published port reached by a client inside the cluster CIDR (at the bridge's address, or
    // at the VTEP's in vxlan mode): without this the answer would go straight back to the
    // client as cluster traffic, which the eBPF fast path carries past the reverse DNAT.
    // Masqueraded, the answer comes back to the node, where conntrack undoes both
    // translations. The same holds for a container reaching its own published port at the
    // node's address (hairpin; its bridge port sends the request back, see
    // `crate::container`). Clients outside the cluster keep their address.
    masquerade(
        &[
            "-s",
            &cidr,
            "-d",
            &src,
            "-m",
            "conntrack",
            "--ctstate",
            "DNAT",
        ],
        "tug: masquerade published ports reached from inside the cluster",
    )?;
    iptables(&["-t", "filter", "-F", FORWARD_CHAIN])?;
    // From containers anywhere; to containers only what answers them or what a published port
    // sent there (DNAT): a host that routes to the node does not reach unpublished ports.
    iptables(&[
        "-t",
        "filter",
        "-A",
        FORWARD_CHAIN,
        "-s",
        &cidr,
        "-j",
        "ACCEPT",
    ])?;
    iptables(&[
        "-t",
        "filter",
        "-A",
        FORWARD_CHAIN,
        "-d",
        &cidr,
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED,DNAT",
        "-j",
        "ACCEPT",
    ])?;
    tracing::debug!(%subnet, %cluster_cidr, "NAT rules set up");
    Ok(())
}

/// Append a masquerade rule for `matches` to [`POSTROUTING_CHAIN`].
fn masquerade(matches: &[&str], comment: &str) -> Result<()> {
    let mut args = vec!["-t", "nat", "-A", POSTROUTING_CHAIN];
    args.extend_from_slice(matches);
    args.extend(["-m", "comment", "--comment", comment, "-j", "MASQUERADE"]);
    iptables(&args).map(drop)
}

/// Remove every rule and chain [`setup_nat`] and [`publish`] made.
pub fn teardown_nat() -> Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    for (table, chain, rule) in JUMPS {
        while rule_exists(table, chain, rule)? {
            let mut args = vec!["-t", table, "-D", chain];
            args.extend_from_slice(rule);
            iptables(&args)?;
        }
    }
    for (table, chain) in [
        ("nat", POSTROUTING_CHAIN),
        ("nat", HOSTPORTS_CHAIN),
        ("filter", FORWARD_CHAIN),
    ] {
        if chain_exists(table, chain)? {
            iptables(&["-t", table, "-F", chain])?;
            iptables(&["-t", table, "-X", chain])?;
        }
    }
    Ok(())
}

/// Publish `ports` of container `id` (at `address`) on every local address of the node. A port
/// another container publishes, or a program on the node listens on, is refused; on any error
/// nothing of this call stays. Publishing the same ports for the same id again changes nothing.
pub fn publish(id: &str, address: Ipv4Addr, ports: &[PortMapping]) -> Result<()> {
    if ports.is_empty() {
        return Ok(());
    }
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut existing = list_published()?;
    // Rules of this container for another address (it was attached again and got a new one)
    // go first.
    for old in existing
        .iter()
        .filter(|r| r.id == id && r.address != address)
    {
        delete_rule(&old.spec)?;
    }
    existing.retain(|r| r.id != id || r.address == address);
    let mut seen = Vec::new();
    for p in ports {
        if p.host_port == 0 || p.container_port == 0 {
            return Err(Error::InvalidPort(format!(
                "{}:{}/{}: ports are 1-65535",
                p.host_port,
                p.container_port,
                p.protocol.as_str()
            )));
        }
        if seen.contains(&(p.host_port, p.protocol)) {
            return Err(Error::InvalidPort(format!(
                "host port {}/{} is listed twice",
                p.host_port,
                p.protocol.as_str()
            )));
        }
        seen.push((p.host_port, p.protocol));
        let owner = existing
            .iter()
            .find(|r| r.mapping.host_port == p.host_port && r.mapping.protocol == p.protocol);
        match owner {
            Some(r) if r.id == id => continue,
            Some(r) => {
                return Err(Error::PortTaken {
                    port: p.host_port,
                    protocol: p.protocol.as_str(),
                    by: format!("published by container {}", r.id),
                });
            }
            None => check_port_free(p)?,
        }
    }
    let mut added: Vec<Vec<String>> = Vec::new();
    for p in ports {
        if existing.iter().any(|r| r.id == id && r.mapping == *p) {
            continue;
        }
        let rule = dnat_rule(id, address, p);
        let mut args = vec!["-t".to_string(), "nat".into(), "-A".into()];
        args.push(HOSTPORTS_CHAIN.into());
        args.extend(rule.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(e) = iptables(&refs) {
            for rule in &added {
                let _ = delete_rule(rule);
            }
            return Err(e);
        }
        added.push(rule);
    }
    tracing::info!(container = id, %address, ports = ports.len(), "ports published");
    Ok(())
}

/// Remove every port container `id` publishes. Nothing to do is fine.
pub fn unpublish(id: &str) -> Result<usize> {
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut removed = 0;
    for rule in list_published()?.into_iter().filter(|r| r.id == id) {
        delete_rule(&rule.spec)?;
        removed += 1;
    }
    Ok(removed)
}

/// One DNAT rule found in [`HOSTPORTS_CHAIN`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub mapping: PortMapping,
    pub address: Ipv4Addr,
    /// The rule's arguments after the chain name, as `-D` takes them.
    spec: Vec<String>,
}

/// Every published port on the node.
pub fn published() -> Result<Vec<Published>> {
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    list_published()
}

fn dnat_rule(id: &str, address: Ipv4Addr, p: &PortMapping) -> Vec<String> {
    let proto = p.protocol.as_str();
    [
        "-p",
        proto,
        "-m",
        proto,
        "--dport",
        &p.host_port.to_string(),
        "-m",
        "comment",
        "--comment",
        &format!("tug:{id}"),
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{address}:{}", p.container_port),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn delete_rule(spec: &[String]) -> Result<()> {
    let mut args = vec!["-t", "nat", "-D", HOSTPORTS_CHAIN];
    args.extend(spec.iter().map(String::as_str));
    iptables(&args).map(|_| ())
}

fn list_published() -> Result<Vec<Published>> {
    if !chain_exists("nat", HOSTPORTS_CHAIN)? {
        return Ok(Vec::new());
    }
    let out = iptables(&["-t", "nat", "-S", HOSTPORTS_CHAIN])?;
    Ok(out.lines().filter_map(parse_published).collect())
}

/// `-A TUG-HOSTPORTS -p tcp -m tcp --dport 8080 -m comment --comment "tug:web.1" -j DNAT
/// --to-destination 10.88.0.2:80`, as `iptables -S` prints it.
fn parse_published(line: &str) -> Option<Published> {
    let tokens = split_rule(line);
    let rest = match tokens.as_slice() {
        [a, chain, rest @ ..] if a == "-A" && chain == HOSTPORTS_CHAIN => rest,
        _ => return None,
    };
    let value = |flag: &str| {
        rest.iter()
            .position(|t| t == flag)
            .and_then(|i| rest.get(i + 1))
            .map(String::as_str)
    };
    let id = value("--comment")?.strip_prefix("tug:")?.to_string();
    let protocol = Protocol::parse(value("-p")?).ok()?;
    let host_port = value("--dport")?.parse().ok()?;
    let (addr, port) = value("--to-destination")?.split_once(':')?;
    Some(Published {
        id,
        mapping: PortMapping {
            host_port,
            container_port: port.parse().ok()?,
            protocol,
        },
        address: addr.parse().ok()?,
        spec: rest.to_vec(),
    })
}

/// Splits an `iptables -S` line into arguments, removing the double quotes around a comment.
fn split_rule(line: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut has_token = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                has_token = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if has_token {
                    tokens.push(std::mem::take(&mut current));
                    has_token = false;
                }
            }
            c => {
                current.push(c);
                has_token = true;
            }
        }
    }
    if has_token {
        tokens.push(current);
    }
    tokens
}

/// A program on the node listening on the port would be shadowed by the DNAT rule: refuse.
fn check_port_free(p: &PortMapping) -> Result<()> {
    let at = (Ipv4Addr::UNSPECIFIED, p.host_port);
    let taken = match p.protocol {
        Protocol::Tcp => TcpListener::bind(at).err(),
        Protocol::Udp => UdpSocket::bind(at).err(),
    };
    match taken {
        Some(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Error::PortTaken {
            port: p.host_port,
            protocol: p.protocol.as_str(),
            by: "in use by a program on this node".into(),
        }),
        _ => Ok(()),
    }
}

fn chain_exists(table: &str, chain: &str) -> Result<bool> {
    probe(&["-t", table, "-n", "-L", chain])
}

fn rule_exists(table: &str, chain: &str, rule: &[&str]) -> Result<bool> {
    let mut args = vec!["-t", table, "-C", chain];
    args.extend_from_slice(rule);
    probe(&args)
}

fn ensure_chain(table: &str, chain: &str) -> Result<()> {
    if !chain_exists(table, chain)? {
        iptables(&["-t", table, "-N", chain])?;
    }
    Ok(())
}

fn ensure_rule(table: &str, chain: &str, rule: &[&str]) -> Result<()> {
    if !rule_exists(table, chain, rule)? {
        let mut args = vec!["-t", table, "-A", chain];
        args.extend_from_slice(rule);
        iptables(&args)?;
    }
    Ok(())
}

/// Runs iptables; `Ok(false)` when it exits 1 (no such rule or chain).
fn probe(args: &[&str]) -> Result<bool> {
    let out = run(args)?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(failure(args, &out)),
    }
}

fn iptables(args: &[&str]) -> Result<String> {
    let out = run(args)?;
    if !out.status.success() {
        return Err(failure(args, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(args: &[&str]) -> Result<std::process::Output> {
    Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| Error::Iptables {
            args: args.join(" "),
            reason: format!("cannot run iptables ({e}); install the iptables package"),
        })
}

fn failure(args: &[&str], out: &std::process::Output) -> Error {
    Error::Iptables {
        args: args.join(" "),
        reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_rules_parse_back() {
        let line = "-A TUG-HOSTPORTS -p tcp -m tcp --dport 8080 -m comment --comment \"tug:web.1.ab\" -j DNAT --to-destination 10.88.0.2:80";
        let p = parse_published(line);
        assert_eq!(
            p.as_ref().map(|p| (p.id.as_str(), p.mapping, p.address)),
            Some((
                "web.1.ab",
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Tcp
                },
                Ipv4Addr::new(10, 88, 0, 2)
            ))
        );
        assert_eq!(
            p.map(|p| p.spec.get(9).cloned()),
            Some(Some("tug:web.1.ab".into()))
        );
        assert!(parse_published("-N TUG-HOSTPORTS").is_none());
        assert!(parse_published("-A OTHER -p tcp --dport 1 -j ACCEPT").is_none());
    }

    #[test]
    fn protocols() {
        assert_eq!(Protocol::parse("UDP").ok(), Some(Protocol::Udp));
        assert_eq!(Protocol::parse("").ok(), Some(Protocol::Tcp));
        assert!(Protocol::parse("sctp").is_err());
    }
}
