//! Container networking against the host network and the CNI reference plugins, on the test bed
//! (two hosts: network namespaces on one bridge; nothing touches this machine's interfaces).
//!
//! 1. Data path: `iperf3` TCP throughput and `ping` round trips container-to-container across
//!    the two hosts, with tug's built-in plugin in host-gw and in vxlan mode, each with the eBPF
//!    fast path (the agent's default) and without it (`--fast-path off`), against the same
//!    measured host-to-host in the same run (ratio). Targets: host-gw >= 95%, vxlan >= 85%.
//!    Each node is set up as the agent sets it up (bridge, routes or VXLAN, and its masquerade
//!    rules). The baseline is host to host between two hosts set up that way (their own traffic
//!    then passes connection tracking too, as on a real node); bare hosts are shown alongside,
//!    and hosts with tug's NAT rules and nothing else of tug (`nat`), which show what
//!    connection tracking alone costs a host's own traffic. With `--no-nat` the tug nodes are
//!    set up without their NAT rules, so that the container path's own cost shows apart from
//!    connection tracking's (the eBPF fast path skips the nodes' netfilter either way).
//!    The seven paths are measured in rounds that alternate them (throughput on this
//!    VM moves by 10-20% from one minute to the next); the medians are compared, and each
//!    fast path's verdict is printed from its paired ratio, with that ratio's 95% confidence
//!    interval over the rounds (see [`verdict`]). Each iperf3 run lasts 10 s by default
//!    (iperf3's own default), so that TCP's start (slow start, the first window growth) is a
//!    small part of it: with runs of 3 s and cubic, vxlan's rounds spread over 71-108% of
//!    their baselines (median 84%), with 10 s over 84-111% (median 97%). With two or more
//!    CPUs, iperf3's client and server are pinned to different ones (`-A 0,1`). Also
//!    printed: the CPU time of the whole machine per GB moved, steadier than the throughput.
//! 2. Control path: the time to set up and tear down one container's network (veth, address,
//!    routes, and its fast-path program and route entry) with the built-in plugin against
//!    Debian's CNI `bridge` + `host-local` plugins invoked the standard way (exec, env, config on
//!    stdin) on the same kind of namespaces.
//!
//! Run: `e2e/bench.sh network [SECONDS] [CYCLES] [ROUNDS] [PATHS]` (default 10 s per iperf3
//! run, 100 cycles, 9 rounds, every path: about 14 minutes in all; PATHS is a comma-separated
//! subset of nat, host-gw, host-gw-stack, vxlan, vxlan-stack, measured with the two
//! host-to-host baselines, bare hosts and tug nodes). With `--big-tcp` anywhere among the
//! arguments, every host is tuned for IPv4 BIG TCP: the test bed's wire takes 192 KiB packets
//! (as a NIC that segments them does), the `eth0` of hosts without tug (bare, nat) is raised
//! by hand as an operator would, and tug nodes are set up with `NodeConfig::big_tcp` (`tug
//! agent --big-tcp on`). Containers in vxlan mode keep 64 KiB packets (see
//! `tug_netplugin::big_tcp`). `--length BYTES` sets iperf3's write size (`-l`; its default is
//! 128 KiB). `--congestion ALGO` sets the sender's TCP congestion control (`iperf3 -C`, for
//! every path alike); without it, the machine's default (printed). `--no-nat`: see above.
//!
//! Each fast path gets two verdicts: against the tug-node baseline and against bare hosts.
//! The sender's congestion control moves both. On the test bed a round trip takes
//! microseconds. BBR (the default of some kernels, this project's test machine's among
//! them) sizes its window and pacing from such round trips and from a bandwidth filter that
//! spans a few of them; the sender's CPU then idles part of the time, and every path runs at
//! about the same rate. With cubic (Debian's default) the sender's CPU is the limit. Both
//! hosts share one machine's CPUs, so a path whose work lands on the receiver's CPU can
//! outrun host to host here: with cubic, the normal path's ACKs are forwarded (netfilter,
//! connection tracking) on the CPU of the reading server. On real hosts each machine does
//! its own work. Figures for both are in the README (session 22). Under BBR each extra pass
//! on the path shows: hosts with tug's NAT rules (`nat`, connection tracking) run at about
//! 93-95% of bare hosts, and both fast paths at about 92-93% whether the nodes have NAT
//! rules or not (`--no-nat`), while tug nodes without NAT rules match bare hosts; the
//! container veth's pass (see `tug_netplugin::fastpath`) costs about what connection
//! tracking does (README, session 24).
//!
//! Also printed per path: the sender's average packet (`KB/pkt`). Over a veth, TCP's packets
//! end where the application's writes end: a veth hands a packet on before the send returns,
//! so a write's last, partly filled packet is never still queued when the next write comes
//! to fill it up. iperf3's 128 KiB writes over a 1,448-byte MSS leave as two 65,160-byte
//! packets and one of 752 bytes. With BIG TCP a write fits in one packet, but with Nagle's
//! algorithm on (iperf3's default) TCP sends its whole segments first and the 752 bytes
//! after them, on their own (with `TCP_NODELAY`, one 131,072-byte packet). So iperf3 sends
//! half as many packets again as full ones would carry, or twice as many with BIG TCP, and
//! every hop's per-packet cost, the container path's extra veth pass among them, is paid for
//! each.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tug_e2e::bench::{median_interval, median_of, paired_ratios};
use tug_e2e::{Host, Netns, TestNet};
use tug_netplugin::big_tcp::{BIG_TCP_SIZE, set_ipv4_gso_gro_limit};
use tug_netplugin::cni::CniNetwork;
use tug_netplugin::fastpath::{FastPath, FastPathConfig, TunnelConfig};
use tug_netplugin::nat;
use tug_netplugin::netns::block_in_netns;
use tug_netplugin::{
    ContainerNet, HostGwConfig, Mode, NodeConfig, Subnet, VxlanConfig, add, del, setup_node,
    setup_vxlan, sync_peer_routes, sync_vxlan_peers,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const CLUSTER: &str = "10.88.0.0/16";
const CNI_BIN: &str = "/usr/lib/cni";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-network: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut big_tcp = false;
    let mut node_nat = true;
    let mut length: Option<u32> = None;
    let mut congestion: Option<String> = None;
    let mut positional = Vec::new();
    let mut all_args = std::env::args().skip(1);
    while let Some(arg) = all_args.next() {
        match arg.as_str() {
            "--big-tcp" => big_tcp = true,
            "--no-nat" => node_nat = false,
            "--length" => {
                let value = all_args.next().ok_or("--length needs a size in bytes")?;
                let bytes: u32 = value
                    .parse()
                    .map_err(|e| format!("--length {value:?}: {e}"))?;
                if bytes == 0 {
                    return Err("--length must be at least 1 byte".into());
                }
                length = Some(bytes);
            }
            "--congestion" => {
                let value = all_args.next().ok_or(
                    "--congestion needs an algorithm (see tcp_available_congestion_control)",
                )?;
                congestion = Some(available_congestion(&value)?);
            }
            _ => positional.push(arg),
        }
    }
    let mut args = positional.into_iter();
    let seconds: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let cycles: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(100);
    let rounds: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(9)
        .max(1);
    for tool in ["iperf3", "busybox"] {
        tug_e2e::exec::require(tool)?;
    }
    let traffic = Traffic {
        seconds,
        big_tcp,
        node_nat,
        length,
        congestion,
    };
    println!(
        "tug network benchmark: 2 test-bed hosts, iperf3 {seconds} s per run ({}, TCP \
         congestion control {}), {rounds} rounds, {cycles} setup cycles{}{}",
        length.map_or_else(
            || "its default 128 KiB writes".to_string(),
            |b| format!("{b}-byte writes")
        ),
        match &traffic.congestion {
            Some(algo) => format!("{algo} (--congestion)"),
            None => format!("{} (the machine's default)", default_congestion()?),
        },
        if big_tcp {
            ", every host tuned for IPv4 BIG TCP"
        } else {
            ""
        },
        if node_nat {
            ""
        } else {
            ", tug nodes without their NAT rules (--no-nat)"
        }
    );
    let all = [
        Route::Bare,
        Route::Nodes,
        Route::Nat,
        Route::Containers(Mode::HostGw, Datapath::Fast),
        Route::Containers(Mode::HostGw, Datapath::Stack),
        Route::Containers(Mode::Vxlan, Datapath::Fast),
        Route::Containers(Mode::Vxlan, Datapath::Stack),
    ];
    // An optional fourth argument picks paths by name (for profiling one of them); the
    // baseline is always measured, since every ratio is against it.
    let paths: Vec<Route> = match args.next() {
        None => all.to_vec(),
        Some(names) => {
            let mut picked = vec![Route::Bare, Route::Nodes];
            for name in names.split(',') {
                let route = all.iter().find(|r| r.name() == name).ok_or_else(|| {
                    format!("unknown path {name:?} (one of {})", path_names(&all))
                })?;
                if !picked.contains(route) {
                    picked.push(*route);
                }
            }
            picked
        }
    };
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); paths.len()];
    for round in 1..=rounds {
        for (path, samples) in paths.iter().zip(samples.iter_mut()) {
            samples.push(data_path(*path, &traffic)?);
        }
        print_round(round, &paths, &samples);
    }
    println!();
    println!(
        "{:<36} {:>7} {:>13} {:>7} {:>7} {:>7} {:>7} {:>6} {:>8} {:>6}",
        "path (median of rounds)",
        "Gbit/s",
        "range",
        "vs bare",
        "vs node",
        "paired",
        "rtt ms",
        "ratio",
        "CPU s/GB",
        "KB/pkt"
    );
    let medians: Vec<Sample> = samples.iter().map(|s| Sample::median(s)).collect();
    let (Some(&bare), Some(&nodes)) = (medians.first(), medians.get(1)) else {
        return Err("no baseline measured".into());
    };
    let bare_runs: &[Sample] = samples.first().map_or(&[], Vec::as_slice);
    let node_runs: &[Sample] = samples.get(1).map_or(&[], Vec::as_slice);
    let mut verdicts = Vec::new();
    for ((path, runs), m) in paths.iter().zip(&samples).zip(&medians) {
        let paired = Paired::of(runs, node_runs);
        verdicts.extend(verdict(*path, Baseline::Nodes, &paired));
        verdicts.extend(verdict(*path, Baseline::Bare, &Paired::of(runs, bare_runs)));
        let label = match path {
            Route::Bare => "host to host, bare hosts",
            Route::Nodes => "host to host, tug nodes (baseline)",
            Route::Nat => "host to host, tug's NAT rules only",
            Route::Containers(Mode::HostGw, Datapath::Fast) => "container to container, host-gw",
            Route::Containers(Mode::HostGw, Datapath::Stack) => "  same, fast path off",
            Route::Containers(Mode::Vxlan, Datapath::Fast) => "container to container, vxlan",
            Route::Containers(Mode::Vxlan, Datapath::Stack) => "  same, fast path off",
        };
        let lo = runs.iter().map(|s| s.gbits).fold(f64::INFINITY, f64::min);
        let hi = runs.iter().map(|s| s.gbits).fold(0.0, f64::max);
        println!(
            "{label:<36} {:>7.2} {:>13} {:>6.1}% {:>6.1}% {:>6.1}% {:>7.3} {:>5.2}x {:>8.3} {:>6.1}",
            m.gbits,
            format!("{lo:.2}-{hi:.2}"),
            100.0 * m.gbits / bare.gbits,
            100.0 * m.gbits / nodes.gbits,
            100.0 * paired.median,
            m.rtt_ms,
            m.rtt_ms / nodes.rtt_ms,
            m.cpu_s_per_gb,
            m.packet_kb,
        );
    }
    println!(
        "targets: host-gw >= 95% and vxlan >= 85% of host-to-host throughput (\"vs node\": \
         the hosts set up as tug nodes{}; \"vs bare\": hosts without tug; \"paired\": the \
         median of each round's ratio to that round's tug-node baseline, which the machine's \
         drift between rounds moves less; each verdict is given against both baselines, with \
         the 95% confidence interval of that median from its rounds)",
        if traffic.node_nat {
            ", whose own traffic then passes the same connection tracking"
        } else {
            ", here without their NAT rules, so without connection tracking"
        }
    );
    for line in verdicts {
        println!("{line}");
    }
    println!();
    control_path(cycles)?;
    Ok(())
}

/// One line per path after round `round`: its throughput and its ratio to this round's
/// tug-node baseline (the second path), so an outlying round shows as one.
fn print_round(round: usize, paths: &[Route], samples: &[Vec<Sample>]) {
    let baseline = samples.get(1).and_then(|s| s.last()).map(|s| s.gbits);
    let line: Vec<String> = paths
        .iter()
        .zip(samples)
        .filter_map(|(path, s)| {
            let gbits = s.last()?.gbits;
            Some(match baseline {
                Some(b) if b > 0.0 => {
                    format!("{} {gbits:.2} ({:.1}%)", path.name(), 100.0 * gbits / b)
                }
                _ => format!("{} {gbits:.2}", path.name()),
            })
        })
        .collect();
    println!(
        "round {round} (Gbit/s, % of this round's nodes): {}",
        line.join(", ")
    );
}

/// Which host-to-host run a verdict compares with.
#[derive(Debug, Clone, Copy)]
enum Baseline {
    /// Hosts set up as tug nodes (the benchmark's baseline).
    Nodes,
    /// Hosts without tug (stricter: their own traffic skips connection tracking).
    Bare,
}

/// Whether a fast path meets its throughput target, judged by its paired ratio (the median
/// of its rounds' ratios to their own baseline): the machine's throughput moves from one run
/// to the next by more than the margins, so a verdict needs many rounds (the default is 9)
/// and the ratio least moved by drift between them. The verdict follows the median; the
/// median's 95% confidence interval says whether the rounds leave it in doubt (an interval
/// that reaches across the target).
fn verdict(path: Route, baseline: Baseline, paired: &Paired) -> Option<String> {
    let (name, target) = match path {
        Route::Containers(Mode::HostGw, Datapath::Fast) => ("host-gw", 0.95),
        Route::Containers(Mode::Vxlan, Datapath::Fast) => ("vxlan", 0.85),
        _ => return None,
    };
    let rounds = paired.rounds;
    if rounds == 0 {
        return Some(format!("{name}: no round with a baseline, no verdict"));
    }
    let against = match baseline {
        Baseline::Nodes => "the tug-node baseline",
        Baseline::Bare => "bare hosts",
    };
    // The interval holds the median, so it is in doubt when it reaches across the target.
    let (interval, in_doubt) = match paired.interval {
        None => ("too few for an interval".to_string(), false),
        Some((lo, hi)) => (
            format!("95% interval {:.1}-{:.1}%", 100.0 * lo, 100.0 * hi),
            lo < target && target <= hi,
        ),
    };
    let met = match (paired.median >= target, in_doubt) {
        (true, false) => "met",
        (true, true) => "met, though the interval reaches below it",
        (false, true) => "NOT met, though the interval reaches it",
        (false, false) => "NOT met",
    };
    Some(format!(
        "{name}: {:.1}% of {against} (paired, {rounds} rounds; {interval}), target {:.0}%: {met}",
        100.0 * paired.median,
        100.0 * target
    ))
}

/// A path's throughput against a baseline's, round by round.
struct Paired {
    /// The median over rounds of `runs[i] / baseline[i]`.
    median: f64,
    /// The median's 95% confidence interval, with enough rounds (6 or more).
    interval: Option<(f64, f64)>,
    /// How many rounds it is over (those with a baseline).
    rounds: usize,
}

impl Paired {
    fn of(runs: &[Sample], baseline: &[Sample]) -> Paired {
        let gbits = |s: &Sample| s.gbits;
        let ratios = paired_ratios(runs.iter().map(gbits), baseline.iter().map(gbits));
        Paired {
            rounds: ratios.len(),
            interval: median_interval(ratios.clone(), 0.95),
            median: median_of(ratios),
        }
    }
}

/// How iperf3 runs and the hosts are tuned, the same for every path.
struct Traffic {
    /// Seconds per iperf3 run.
    seconds: u32,
    /// Every host tuned for IPv4 BIG TCP.
    big_tcp: bool,
    /// Tug nodes get the agent's NAT rules (the default; `--no-nat` leaves them off, to tell
    /// connection tracking's cost from the container path's own).
    node_nat: bool,
    /// iperf3's write size (`-l`), or its default.
    length: Option<u32>,
    /// The sender's TCP congestion control (`iperf3 -C`), or the machine's default.
    congestion: Option<String>,
}

/// `algo` if this kernel has it (as `tcp_available_congestion_control` lists), or one clear
/// error.
fn available_congestion(algo: &str) -> Result<String> {
    let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")?;
    if listed.split_whitespace().any(|a| a == algo) {
        Ok(algo.to_string())
    } else {
        Err(format!(
            "--congestion {algo:?}: not available in this kernel (available: {})",
            listed.trim()
        )
        .into())
    }
}

/// The congestion control new TCP sockets get: the initial namespace's default, which every
/// network namespace the bench creates starts with.
fn default_congestion() -> Result<String> {
    Ok(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")?
            .trim()
            .to_string(),
    )
}

/// One node of the bench: its host, subnet and (if any) container namespace and address.
struct Node<'a> {
    host: &'a Host,
    subnet: Subnet,
    container: Option<(Netns, Ipv4Addr)>,
    /// The node's fast path, when the run uses it.
    fast: Option<FastPath>,
}

/// What a data-path run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Between two hosts with nothing of tug on them.
    Bare,
    /// Between two hosts set up as tug nodes (host-gw): bridge, routes and the agent's
    /// masquerade rules, which make the hosts' netfilter track every connection of theirs too.
    Nodes,
    /// Between two hosts with tug's NAT rules (`tug_netplugin::nat`) and nothing else of
    /// tug (no bridge, routes or container): what connection tracking alone costs the
    /// hosts' own traffic, as on any host with a masquerade or stateful firewall rule.
    Nat,
    /// Between a container on each of two tug nodes; with the eBPF fast path (the agent's
    /// default) or through the stack only (`--fast-path off`).
    Containers(Mode, Datapath),
}

impl Route {
    /// The name that picks this path on the command line.
    fn name(&self) -> &'static str {
        match self {
            Route::Bare => "bare",
            Route::Nodes => "nodes",
            Route::Nat => "nat",
            Route::Containers(Mode::HostGw, Datapath::Fast) => "host-gw",
            Route::Containers(Mode::HostGw, Datapath::Stack) => "host-gw-stack",
            Route::Containers(Mode::Vxlan, Datapath::Fast) => "vxlan",
            Route::Containers(Mode::Vxlan, Datapath::Stack) => "vxlan-stack",
        }
    }
}

fn path_names(routes: &[Route]) -> String {
    routes
        .iter()
        .map(Route::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// How container traffic crosses a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Datapath {
    /// Bridge, netfilter and IP forwarding.
    Stack,
    /// tug's eBPF programs (`tug_netplugin::fastpath`).
    Fast,
}

/// One measurement of a path.
#[derive(Debug, Clone, Copy)]
struct Sample {
    gbits: f64,
    rtt_ms: f64,
    /// CPU time of the whole machine (all CPUs, user + system + softirq) per GB received.
    cpu_s_per_gb: f64,
    /// The sender's average packet (its `eth0`'s transmitted bytes over packets while
    /// iperf3 ran), in KB: how much TCP put into each GSO packet, whose per-packet costs
    /// every hop pays once.
    packet_kb: f64,
}

impl Sample {
    /// The median of each figure on its own.
    fn median(samples: &[Sample]) -> Sample {
        let pick = |f: fn(&Sample) -> f64| median_of(samples.iter().map(f).collect());
        Sample {
            gbits: pick(|s| s.gbits),
            rtt_ms: pick(|s| s.rtt_ms),
            cpu_s_per_gb: pick(|s| s.cpu_s_per_gb),
            packet_kb: pick(|s| s.packet_kb),
        }
    }
}

/// Busy CPU time of the machine so far (all CPUs), in clock ticks (`/proc/stat`).
fn cpu_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().ok_or("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()?;
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok(v.iter().sum::<u64>().saturating_sub(idle))
}

fn subnets(own: Subnet) -> Result<HostGwConfig> {
    Ok(HostGwConfig {
        cluster_cidr: CLUSTER.parse()?,
        own_subnet: own,
    })
}

fn vxlan_cfg(node: &Node<'_>, mtu: u32) -> Result<VxlanConfig> {
    Ok(VxlanConfig {
        device: "tug.vxlan".into(),
        vni: 4242,
        port: 4789,
        local: node.host.addr(),
        uplink: Some("eth0".into()),
        mtu,
        subnets: subnets(node.subnet)?,
    })
}

/// The agent's NAT rules for a node with `subnet` on `host` (`tug_netplugin::nat`).
fn masquerade(host: &Host, subnet: Subnet) -> Result<()> {
    let cluster = CLUSTER.parse::<Subnet>()?;
    block_in_netns(&host.netns().path(), || async move {
        nat::setup_nat(subnet, cluster)
    })?;
    Ok(())
}

/// Set a node up in `mode` with one container (and its NAT rules when `nat`).
fn set_up(
    node: &mut Node<'_>,
    mode: Mode,
    datapath: Datapath,
    big_tcp: bool,
    nat: bool,
    role: &str,
    dir: &Path,
) -> Result<()> {
    let path = node.host.netns().path();
    let cfg = NodeConfig {
        bridge: "tug0".into(),
        subnet: node.subnet,
        uplink: Some("eth0".into()),
        mode,
        big_tcp,
    };
    let setup = block_in_netns(&path, || setup_node(&cfg))?;
    if mode == Mode::Vxlan {
        let vx = vxlan_cfg(node, setup.mtu)?;
        block_in_netns(&path, || setup_vxlan(&vx))?;
    }
    // Masquerade for traffic leaving the cluster, as the agent sets it up: the node's
    // netfilter then tracks connections, its own and the normal path's container traffic.
    if nat {
        masquerade(node.host, node.subnet)?;
    }
    let (subnet, cluster) = (node.subnet, CLUSTER.parse::<Subnet>()?);
    let ns = Netns::create(role)?;
    let net = ContainerNet {
        id: role.into(),
        netns_path: ns.path(),
        bridge: "tug0".into(),
        subnet: node.subnet,
        state_dir: dir.join(role),
        gso_ipv4_max_size: setup.gso_ipv4_max_size,
    };
    let attachment = block_in_netns(&path, || add(&net))?;
    if datapath == Datapath::Fast {
        let cfg = FastPathConfig {
            cluster_cidr: cluster,
            subnet,
            ingress: Some(match mode {
                Mode::HostGw => "eth0".into(),
                Mode::Vxlan => "tug.vxlan".into(),
            }),
            // As the agent does: in vxlan mode the programs carry VXLAN themselves.
            tunnel: match mode {
                Mode::Vxlan => TunnelConfig::of(&vxlan_cfg(node, 0)?),
                Mode::HostGw => None,
            },
        };
        let (veth, address) = (attachment.host_veth.clone(), attachment.address);
        node.fast = Some(block_in_netns(&path, || async move {
            let fast = FastPath::setup(&cfg).await?;
            fast.attach(&veth, address).await?;
            Ok(fast)
        })?);
    }
    node.container = Some((ns, attachment.address));
    Ok(())
}

fn peer(node: &mut Node<'_>, other: (Subnet, Ipv4Addr), mode: Mode) -> Result<()> {
    let path = node.host.netns().path();
    let peers = [other];
    match mode {
        Mode::HostGw => {
            let cfg = subnets(node.subnet)?;
            block_in_netns(&path, || sync_peer_routes(&cfg, &peers))?;
        }
        Mode::Vxlan => {
            let cfg = vxlan_cfg(node, 0)?;
            block_in_netns(&path, || sync_vxlan_peers(&cfg, &peers))?;
            if let Some(fast) = &node.fast {
                fast.set_peers(&peers)?;
            }
        }
    }
    Ok(())
}

/// Throughput, mean ping round trip, CPU per GB and the sender's packet size of `path` (host 0
/// to host 1, or a container on each), with iperf3 run and the hosts tuned as `traffic` says.
fn data_path(path: Route, traffic: &Traffic) -> Result<Sample> {
    let Traffic {
        seconds,
        big_tcp,
        node_nat,
        length,
        ref congestion,
    } = *traffic;
    let mut net = TestNet::new(0)?;
    net.add_host("a")?;
    net.add_host("b")?;
    if big_tcp {
        let bridge = net.bridge_netns().path();
        for host in net.hosts() {
            let port = net.port_of(host);
            block_in_netns(&bridge, || set_ipv4_gso_gro_limit(&port, BIG_TCP_SIZE))?;
            if matches!(path, Route::Bare | Route::Nat) {
                // What `tug agent --big-tcp on` does to a node's uplink, by hand.
                let ns = host.netns().path();
                block_in_netns(&ns, || set_ipv4_gso_gro_limit("eth0", BIG_TCP_SIZE))?;
            }
        }
    }
    let dir = tempfile::tempdir()?;
    let mut a = Node {
        host: net.host(0),
        subnet: "10.88.1.0/24".parse()?,
        container: None,
        fast: None,
    };
    let mut b = Node {
        host: net.host(1),
        subnet: "10.88.2.0/24".parse()?,
        container: None,
        fast: None,
    };
    match path {
        Route::Bare => {}
        Route::Nat => {
            masquerade(a.host, a.subnet)?;
            masquerade(b.host, b.subnet)?;
        }
        Route::Nodes | Route::Containers(..) => {
            let (mode, datapath) = match path {
                Route::Containers(mode, datapath) => (mode, datapath),
                _ => (Mode::HostGw, Datapath::Stack),
            };
            for (node, role) in [(&mut a, "bench-ca"), (&mut b, "bench-cb")] {
                set_up(node, mode, datapath, big_tcp, node_nat, role, dir.path())?;
            }
            peer(&mut a, (b.subnet, b.host.addr()), mode)?;
            peer(&mut b, (a.subnet, a.host.addr()), mode)?;
        }
    }
    let (client, server, target) = if let Route::Containers(..) = path {
        let (ca, _) = a.container.as_ref().ok_or("no container on a")?;
        let (cb, addr) = b.container.as_ref().ok_or("no container on b")?;
        (ca.command("iperf3"), cb.command("iperf3"), *addr)
    } else {
        (
            a.host.command("iperf3"),
            b.host.command("iperf3"),
            b.host.addr(),
        )
    };
    let mut server = server;
    let mut server = tug_e2e::spawn(
        server
            .args(["-s", "-1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let mut client = client;
    client.args(["-c", &target.to_string(), "-t", &seconds.to_string(), "-J"]);
    if let Some(bytes) = length {
        client.args(["-l", &bytes.to_string()]);
    }
    if let Some(algo) = congestion {
        client.args(["-C", algo]);
    }
    if std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2) {
        client.args(["-A", "0,1"]);
    }
    let sender = match (path, &a.container) {
        (Route::Containers(..), Some((ca, _))) => ca,
        _ => a.host.netns().as_ref(),
    };
    let sent_before = tx_counters(sender)?;
    let before = cpu_ticks()?;
    let out = client.output()?;
    let after = cpu_ticks()?;
    let sent = tx_counters(sender)?;
    let _ = server.stop(Duration::from_secs(2));
    if !out.status.success() {
        return Err(format!("iperf3 client: {}", String::from_utf8_lossy(&out.stdout)).into());
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let received = &report["end"]["sum_received"];
    let (Some(bits), Some(bytes)) = (
        received["bits_per_second"].as_f64(),
        received["bytes"].as_f64(),
    ) else {
        return Err("iperf3 report without end.sum_received".into());
    };
    // USER_HZ is 100 on Linux.
    let cpu_s = after.saturating_sub(before) as f64 / 100.0;
    let mut ping = match (path, &a.container) {
        (Route::Containers(..), Some((ca, _))) => ca.command("busybox"),
        _ => a.host.command("busybox"),
    };
    let out = ping
        .args(["ping", "-c", "50", "-i", "0.05", "-q", &target.to_string()])
        .output()?;
    let rtt = mean_rtt(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| format!("ping: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(fast) = &a.fast {
        // The figures are only the fast path's if it carried the traffic.
        let stats = fast.stats()?;
        if stats.to_nodes == 0 || stats.to_containers == 0 {
            return Err(format!("the fast path carried nothing: {stats:?}").into());
        }
    }
    Ok(Sample {
        gbits: bits / 1e9,
        rtt_ms: rtt,
        cpu_s_per_gb: cpu_s / (bytes / 1e9),
        packet_kb: (sent.0.saturating_sub(sent_before.0)) as f64
            / (sent.1.saturating_sub(sent_before.1)).max(1) as f64
            / 1e3,
    })
}

/// The transmitted (bytes, packets) of `eth0` in `netns`, read inside it (sysfs shows the
/// reader's namespace).
fn tx_counters(netns: &Netns) -> Result<(u64, u64)> {
    let out = netns
        .command("busybox")
        .args([
            "cat",
            "/sys/class/net/eth0/statistics/tx_bytes",
            "/sys/class/net/eth0/statistics/tx_packets",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut counts = text.split_whitespace().map(str::parse::<u64>);
    match (counts.next(), counts.next()) {
        (Some(Ok(bytes)), Some(Ok(packets))) if out.status.success() => Ok((bytes, packets)),
        _ => Err(format!(
            "cannot read eth0's counters: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        )
        .into()),
    }
}

/// "round-trip min/avg/max = 0.046/0.069/0.093 ms" -> 0.069.
fn mean_rtt(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains("min/avg/max"))?;
    let values = line.split('=').nth(1)?.trim();
    values.split('/').nth(1)?.trim().parse().ok()
}

/// Setup and teardown of one container's network, built-in against CNI bridge + host-local.
fn control_path(cycles: usize) -> Result<()> {
    let mut net = TestNet::new(0)?;
    net.add_host("ctl")?;
    let host = net.host(0);
    let path = host.netns().path();
    let dir = tempfile::tempdir()?;
    let subnet: Subnet = "10.88.1.0/24".parse()?;
    let cfg = NodeConfig {
        bridge: "tug0".into(),
        subnet,
        uplink: None,
        mode: Mode::HostGw,
        big_tcp: false,
    };
    block_in_netns(&path, || setup_node(&cfg))?;
    // As the agent does: each container also joins the fast path (program and route entry),
    // whose receiving program sits on the node's uplink.
    let fast_cfg = FastPathConfig {
        cluster_cidr: CLUSTER.parse()?,
        subnet,
        ingress: Some("eth0".into()),
        tunnel: None,
    };
    let fast = block_in_netns(&path, || FastPath::setup(&fast_cfg))?;
    let namespaces: Vec<Netns> = (0..cycles)
        .map(|i| Netns::create(&format!("c{i}")))
        .collect::<tug_e2e::Result<_>>()?;

    // Built-in: add then del, each on a fresh namespace.
    let mut builtin = (Vec::new(), Vec::new());
    for (i, ns) in namespaces.iter().enumerate() {
        let net = ContainerNet {
            id: format!("bench-{i}"),
            netns_path: ns.path(),
            bridge: "tug0".into(),
            subnet,
            state_dir: dir.path().join("ipam"),
            gso_ipv4_max_size: None,
        };
        let t = Instant::now();
        block_in_netns(&path, || async {
            let attachment = add(&net).await?;
            fast.attach(&attachment.host_veth, attachment.address).await
        })?;
        builtin.0.push(t.elapsed());
        let t = Instant::now();
        block_in_netns(&path, || async {
            let ipam = tug_netplugin::Ipam::open(&net.state_dir, subnet)?;
            if let Some(address) = ipam.get(&net.id)? {
                fast.detach(address)?;
            }
            del(&net).await
        })?;
        builtin.1.push(t.elapsed());
    }

    // CNI: the reference plugins on the same bridge and subnet, called from the host's namespace.
    let conf_dir = dir.path().join("cni-conf");
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::write(
        conf_dir.join("10-bench.conflist"),
        r#"{"cniVersion":"1.0.0","name":"bench","plugins":[{"type":"bridge","bridge":"tug0","isGateway":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"$TUG_NODE_SUBNET"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"$TUG_NETWORK_DIR/host-local"}}]}"#,
    )?;
    let cni = CniNetwork::load(
        &conf_dir,
        Path::new(CNI_BIN),
        &dir.path().join("cni"),
        subnet,
    )?;
    let mut reference = (Vec::new(), Vec::new());
    for (i, ns) in namespaces.iter().enumerate() {
        let id = format!("bench-cni-{i}");
        let t = Instant::now();
        block_in_netns(&path, || async { cni.add(&id, &ns.path(), "eth0") })?;
        reference.0.push(t.elapsed());
        let t = Instant::now();
        block_in_netns(&path, || async { cni.del(&id, &ns.path(), "eth0") })?;
        reference.1.push(t.elapsed());
    }
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "per container (median)", "tug ms", "CNI ms", "ratio"
    );
    for (what, ours, theirs) in [
        ("setup (add)", &mut builtin.0, &mut reference.0),
        ("teardown (del)", &mut builtin.1, &mut reference.1),
    ] {
        let (m0, m1) = (median(ours), median(theirs));
        println!("{what:<34} {m0:>12.2} {m1:>12.2} {:>7.1}x", m1 / m0);
    }
    println!("target: setup faster than the CNI bridge plugin (ratio > 1: tug is faster)");
    Ok(())
}

fn median(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples
        .get(samples.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paired(median: f64, interval: Option<(f64, f64)>, rounds: usize) -> Paired {
        Paired {
            median,
            interval,
            rounds,
        }
    }

    #[test]
    fn a_fast_path_is_judged_against_either_baseline() {
        let path = Route::Containers(Mode::HostGw, Datapath::Fast);
        let nodes = verdict(path, Baseline::Nodes, &paired(0.99, Some((0.97, 1.01)), 9));
        assert_eq!(
            nodes.as_deref(),
            Some(
                "host-gw: 99.0% of the tug-node baseline (paired, 9 rounds; 95% interval \
                 97.0-101.0%), target 95%: met"
            )
        );
        let bare = verdict(path, Baseline::Bare, &paired(0.918, Some((0.905, 0.93)), 9));
        assert_eq!(
            bare.as_deref(),
            Some(
                "host-gw: 91.8% of bare hosts (paired, 9 rounds; 95% interval 90.5-93.0%), \
                 target 95%: NOT met"
            )
        );
        let vxlan = Route::Containers(Mode::Vxlan, Datapath::Fast);
        let verdict_of = |p: Paired| verdict(vxlan, Baseline::Nodes, &p).unwrap_or_default();
        assert!(
            verdict_of(paired(0.85, None, 3))
                .ends_with("(paired, 3 rounds; too few for an interval), target 85%: met")
        );
        // Rounds that leave the verdict in doubt say so, either way.
        assert!(
            verdict_of(paired(0.88, Some((0.80, 0.95)), 9))
                .ends_with("target 85%: met, though the interval reaches below it")
        );
        assert!(
            verdict_of(paired(0.842, Some((0.72, 1.02)), 9))
                .ends_with("target 85%: NOT met, though the interval reaches it")
        );
        assert_eq!(
            verdict_of(paired(f64::NAN, None, 0)),
            "vxlan: no round with a baseline, no verdict"
        );
        assert!(verdict(Route::Bare, Baseline::Bare, &paired(1.0, None, 9)).is_none());
        let stack = Route::Containers(Mode::HostGw, Datapath::Stack);
        assert!(verdict(stack, Baseline::Nodes, &paired(1.0, None, 9)).is_none());
    }

    #[test]
    fn an_unknown_congestion_control_is_one_clear_error() {
        let err = available_congestion("no-such-algo")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("--congestion \"no-such-algo\": not available in this kernel"),
            "{err}"
        );
        // Reno is always built in.
        assert_eq!(available_congestion("reno").ok().as_deref(), Some("reno"));
    }
}
