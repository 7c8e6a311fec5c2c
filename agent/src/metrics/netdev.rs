//! A container's network counters, from `/proc/<pid>/net/dev` of its init process (that file
//! shows the process' network namespace, so no `setns` is needed), loopback left out, as
//! cAdvisor reports them.

use std::path::Path;

/// One interface's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceStats {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// Parse the text of a `net/dev` file; loopback and malformed lines are skipped.
pub fn parse(text: &str) -> Vec<InterfaceStats> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let name = name.trim();
            if name == "lo" || name.is_empty() {
                return None;
            }
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            if f.len() < 16 {
                return None;
            }
            Some(InterfaceStats {
                name: name.to_string(),
                rx_bytes: f[0],
                rx_packets: f[1],
                rx_errors: f[2],
                rx_dropped: f[3],
                tx_bytes: f[8],
                tx_packets: f[9],
                tx_errors: f[10],
                tx_dropped: f[11],
            })
        })
        .collect()
}

/// The network namespace of a process, as its `ns/net` link reads (`net:[4026531992]`).
fn netns_of(proc_dir: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_link(proc_dir.join("ns/net")).ok()
}

/// The interfaces of `pid`'s network namespace; none when it shares `host_netns` (a container
/// on the host network: its counters are the machine's, not its own) or is gone.
pub fn read(pid: i32, host_netns: Option<&Path>) -> Vec<InterfaceStats> {
    if pid <= 0 {
        return Vec::new();
    }
    let dir = Path::new("/proc").join(pid.to_string());
    let ns = netns_of(&dir);
    if ns.is_none() || ns.as_deref() == host_netns {
        return Vec::new();
    }
    std::fs::read_to_string(dir.join("net/dev"))
        .map(|text| parse(&text))
        .unwrap_or_default()
}

/// This process' own network namespace (the host's, for an agent).
pub fn own_netns() -> Option<std::path::PathBuf> {
    netns_of(Path::new("/proc/self"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
  eth0: 5338914    3790    1    2    0     0          0         0   251320    2941    3    4    0     0       0          0
broken: 1 2 3
";

    #[test]
    fn interfaces_but_loopback_are_read() {
        let stats = parse(SAMPLE);
        assert_eq!(
            stats,
            [InterfaceStats {
                name: "eth0".into(),
                rx_bytes: 5338914,
                rx_packets: 3790,
                rx_errors: 1,
                rx_dropped: 2,
                tx_bytes: 251320,
                tx_packets: 2941,
                tx_errors: 3,
                tx_dropped: 4,
            }]
        );
        assert!(parse("").is_empty());
    }

    #[test]
    fn the_host_network_namespace_is_not_a_containers() {
        let own = own_netns();
        assert!(own.is_some());
        let me = std::process::id() as i32;
        assert!(
            read(me, own.as_deref()).is_empty(),
            "same namespace as the agent"
        );
        assert!(read(0, None).is_empty());
    }
}
