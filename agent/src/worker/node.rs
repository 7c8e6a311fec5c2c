//! What the agent says about its machine when it registers: name, agent API address, labels,
//! capacity (given, or this machine's CPUs and memory), runtime, kernel, os and arch.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;

use tug_api::v1::{NodeDescription, Resources};

use crate::image::Platform;

/// `nproc × 1000` millicores.
pub(crate) fn machine_cpu_millis() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1)
        * 1000
}

/// MemTotal from /proc/meminfo, in bytes (0 if unreadable).
pub(crate) fn machine_memory_bytes() -> u64 {
    parse_mem_total(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
}

fn parse_mem_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// "tug <version>", or the first line of `<oci runtime> --version` (e.g. "crun version 1.8").
pub(crate) fn runtime_version(oci_runtime: Option<&Path>) -> String {
    let own = format!("tug {}", env!("CARGO_PKG_VERSION"));
    let Some(path) = oci_runtime else {
        return own;
    };
    match std::process::Command::new(path).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .unwrap_or(own),
        _ => format!("{} (--version failed)", path.display()),
    }
}

pub(crate) fn kernel_version() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The address to advertise for the agent API: `advertise` if given; the listener's address
/// if it names one; else this machine's address on the route to the first controller (a UDP
/// socket's local address after connect: no packet is sent) with the listener's port.
pub(crate) fn advertise_address(
    advertise: Option<&str>,
    listening: SocketAddr,
    controller: Option<&str>,
) -> String {
    if let Some(a) = advertise {
        return a.to_string();
    }
    if !listening.ip().is_unspecified() {
        return listening.to_string();
    }
    let routed = controller.and_then(|c| {
        let socket = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
        socket.connect(c).ok()?;
        socket.local_addr().ok().map(|a| a.ip())
    });
    let ip = routed.unwrap_or(IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, listening.port()).to_string()
}

/// The registration's description (blocking: it may run the OCI runtime and resolve names).
pub(crate) fn describe(
    name: &str,
    address: String,
    labels: &BTreeMap<String, String>,
    (capacity_cpu_millis, capacity_memory_bytes): (Option<u64>, Option<u64>),
    oci_runtime: Option<&Path>,
    metrics_address: Option<String>,
    (node_ip, container_network): (Option<std::net::Ipv4Addr>, bool),
) -> NodeDescription {
    let platform = Platform::host();
    NodeDescription {
        name: name.to_string(),
        address,
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        capacity: Some(Resources {
            cpu_millis: capacity_cpu_millis.unwrap_or_else(machine_cpu_millis),
            memory_bytes: capacity_memory_bytes.unwrap_or_else(machine_memory_bytes),
        }),
        runtime_version: runtime_version(oci_runtime),
        kernel_version: kernel_version(),
        os: platform.os,
        arch: platform.architecture,
        metrics_address: metrics_address.unwrap_or_default(),
        node_ip: node_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        container_network,
    }
}

/// The IPv4 host of a `host:port` address, if it is one (and not 0.0.0.0).
pub(crate) fn host_ipv4(address: &str) -> Option<std::net::Ipv4Addr> {
    let addr: std::net::SocketAddrV4 = address.parse().ok()?;
    (!addr.ip().is_unspecified()).then(|| *addr.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_is_described() {
        assert_eq!(
            parse_mem_total("MemTotal:       16318480 kB\nMemFree: 1 kB\n"),
            16318480 * 1024
        );
        assert_eq!(parse_mem_total("nonsense"), 0);
        let d = describe(
            "n1",
            "10.0.0.1:7441".into(),
            &BTreeMap::from([("zone".into(), "a".into())]),
            (None, Some(1 << 30)),
            None,
            Some("10.0.0.1:7443".into()),
            (Some(std::net::Ipv4Addr::new(10, 0, 0, 1)), true),
        );
        assert_eq!(d.name, "n1");
        let cap = d.capacity.unwrap_or_default();
        assert!(cap.cpu_millis >= 1000);
        assert_eq!(cap.memory_bytes, 1 << 30);
        assert!(d.runtime_version.starts_with("tug "));
        assert!(!d.kernel_version.is_empty());
        assert_eq!(d.os, "linux");
        assert_eq!(d.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(d.metrics_address, "10.0.0.1:7443");
    }

    #[test]
    fn the_advertised_address_is_a_reachable_one() {
        let any: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7441));
        assert_eq!(advertise_address(Some("h:1"), any, None), "h:1");
        let lo: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7441));
        assert_eq!(advertise_address(None, lo, None), "127.0.0.1:7441");
        assert_eq!(
            advertise_address(None, any, Some("127.0.0.1:7440")),
            "127.0.0.1:7441"
        );
    }
}
