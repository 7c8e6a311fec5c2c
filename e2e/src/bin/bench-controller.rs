//! Writes through a 3-replica tug controller cluster and through a 3-member etcd cluster, both
//! started here on loopback with fsync on (their defaults), in the same run: the same number of
//! concurrent writers (tokio tasks, each with its own gRPC connection to the leader) do
//! sequential small writes for a fixed time per concurrency level, in rounds that alternate the
//! two systems; print writes/s, p50/p99 latency and the replicas' CPU time per write side by side
//! with ratios, then how much each replica's resident memory grew per write over the whole run
//! (a tug write stores a service and, once the reconciler has run, its task). Each level ends
//! with a verdict on the target (1.5x etcd's writes/s and a lower p99) and each round's own
//! ratio. Rounds default to 4: from one run to the next the 1-client ratio moved between 1.49x
//! and 1.84x in session 17, mostly with etcd's own writes/s, which the machine moves by a
//! quarter from one minute to the next; more alternations weigh both systems alike.
//!
//! - tug: `Control.Apply` of one small `Service` per write (unique name, image busybox, 1
//!   replica) to the leader replica.
//! - etcd: `KV.Put` to the leader member, key = the same unique name, value = that `Service`
//!   encoded as protobuf (so both store about the same bytes).
//!
//! Run: `e2e/bench.sh controller [--duration SECS] [--warmup SECS] [--levels 1,16,256]
//! [--rounds N] [--dir DIR]` (builds release binaries, installs etcd). Data dirs go under DIR
//! (default: the system temp dir), which should be on the disk being measured, not tmpfs.

use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use tonic::transport::{Channel, Endpoint};
use tug_api::v1::control_client::ControlClient;
use tug_api::v1::{ApplyRequest, ClusterStatusRequest, ObjectMeta, Service, ServiceSpec};
use tug_e2e::bench::{median_of, paired_ratios, percentile_of_sorted, proc_status_kib};
use tug_e2e::etcdpb::kv_client::KvClient;
use tug_e2e::etcdpb::maintenance_client::MaintenanceClient;
use tug_e2e::etcdpb::{PutRequest, StatusRequest};
use tug_e2e::{ChildGuard, exec, spawn};

type Error = Box<dyn std::error::Error>;
type Result<T> = std::result::Result<T, Error>;

/// How long a cluster may take to elect a leader and accept a first write.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const REPLICAS: usize = 3;
/// The target: at least this many times etcd's writes/s at every level.
const TARGET_RATIO: f64 = 1.5;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-controller: {err}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug)]
struct Args {
    duration: Duration,
    warmup: Duration,
    levels: Vec<usize>,
    rounds: usize,
    dir: PathBuf,
}

const USAGE: &str = "usage: bench-controller [--duration SECS] [--warmup SECS] [--levels 1,16,256] \
                     [--rounds N] [--dir DIR]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        duration: Duration::from_secs(5),
        warmup: Duration::from_secs(1),
        levels: vec![1, 16, 256],
        rounds: 4,
        dir: std::env::temp_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--duration" | "--warmup" => {
                let secs: f64 = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| format!("{flag} {value:?}: not a number of seconds"))?;
                let d = Duration::from_secs_f64(secs);
                if flag == "--duration" {
                    if d.is_zero() {
                        return Err("--duration must be more than 0".into());
                    }
                    args.duration = d;
                } else {
                    args.warmup = d;
                }
            }
            "--levels" => {
                args.levels = value
                    .split(',')
                    .map(|l| l.trim().parse::<usize>().ok().filter(|n| *n > 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        format!("--levels {value:?}: give client counts from 1, e.g. 1,16,256")
                    })?;
            }
            "--rounds" => {
                args.rounds = value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--rounds {value:?}: give a count from 1"))?;
            }
            "--dir" => args.dir = PathBuf::from(value),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    Ok(args)
}

fn tug_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let tug = exe.with_file_name("tug");
    if tug.is_file() {
        Ok(tug)
    } else {
        Err(format!(
            "{} not found: build it first (cargo build --release -p tug)",
            tug.display()
        )
        .into())
    }
}

/// `n` distinct free loopback ports (all bound at once, then released).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| format!("cannot read a bound port: {e}").into())
        })
        .collect()
}

/// A process's log file, opened for its stdout and stderr.
fn log_to(cmd: &mut Command, path: &Path) -> Result<()> {
    let out = File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("cannot clone the handle of {}: {e}", path.display()))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    Ok(())
}

/// The last lines of every log, for an error message.
fn log_tails(logs: &[PathBuf]) -> String {
    let mut out = String::new();
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(15)..];
        let _ = write!(out, "\n--- {} ---\n{}", log.display(), tail.join("\n"));
    }
    out
}

/// Three replicas of one system: stopped by PID (guards) before their data dir is removed.
struct Cluster {
    name: &'static str,
    guards: Vec<ChildGuard>,
    logs: Vec<PathBuf>,
    /// Client addresses, `http://127.0.0.1:PORT`, in replica order.
    urls: Vec<String>,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn pids(&self) -> Vec<u32> {
        self.guards.iter().map(ChildGuard::pid).collect()
    }

    /// An error if a replica has exited.
    fn check_alive(&mut self) -> Result<()> {
        for (i, guard) in self.guards.iter_mut().enumerate() {
            if let Some(status) = guard.try_wait()? {
                return Err(format!(
                    "{} replica {} exited ({status}){}",
                    self.name,
                    i + 1,
                    log_tails(&self.logs)
                )
                .into());
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        for guard in &mut self.guards {
            if let Err(err) = guard.stop(Duration::from_secs(10)) {
                eprintln!("bench-controller: stopping {}: {err}", self.name);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Every replica gets SIGTERM first, so none waits for the others' grace period.
        self.stop();
    }
}

fn temp_dir_in(root: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(root)
        .map_err(|e| format!("cannot create a data dir under {}: {e}", root.display()).into())
}

fn start_tug(tug: &Path, root: &Path) -> Result<Cluster> {
    let dir = temp_dir_in(root, "bench-controller-tug-")?;
    let ports = free_ports(REPLICAS)?;
    let peers = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut cluster = Cluster {
        name: "tug",
        guards: Vec::new(),
        logs: Vec::new(),
        urls: ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect(),
        dir,
    };
    for (i, port) in ports.iter().enumerate() {
        let id = i + 1;
        let data = cluster.dir.path().join(format!("node{id}"));
        let log = cluster.dir.path().join(format!("node{id}.log"));
        let mut cmd = Command::new(tug);
        cmd.arg("--data-dir")
            .arg(&data)
            .arg("controller")
            .args(["--id", &id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--peers", &peers]);
        log_to(&mut cmd, &log)?;
        cluster.logs.push(log);
        cluster.guards.push(spawn(&mut cmd)?);
    }
    Ok(cluster)
}

fn start_etcd(root: &Path) -> Result<Cluster> {
    let etcd = exec::require("etcd")?;
    let dir = temp_dir_in(root, "bench-controller-etcd-")?;
    let ports = free_ports(2 * REPLICAS)?;
    let (client_ports, peer_ports) = ports.split_at(REPLICAS);
    let initial = peer_ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("m{}=http://127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut cluster = Cluster {
        name: "etcd",
        guards: Vec::new(),
        logs: Vec::new(),
        urls: client_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect(),
        dir,
    };
    for (i, peer_port) in peer_ports.iter().enumerate() {
        let name = format!("m{}", i + 1);
        let data = cluster.dir.path().join(&name);
        let log = cluster.dir.path().join(format!("{name}.log"));
        let client = &cluster.urls[i];
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(&etcd);
        cmd.arg("--name")
            .arg(&name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", client])
            .args(["--advertise-client-urls", client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--initial-cluster-token",
                &format!("bench-controller-{}", std::process::id()),
            ])
            // Keep ETCD_* settings of the environment out of the benchmark.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        log_to(&mut cmd, &log)?;
        cluster.logs.push(log);
        cluster.guards.push(spawn(&mut cmd)?);
    }
    Ok(cluster)
}

async fn connect(url: &str) -> Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url}: not an address: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}").into())
}

/// Retries `probe` every 100 ms until it yields a value, a replica dies, or the time is up.
async fn wait_ready<T, F, Fut>(cluster: &mut Cluster, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut(Vec<String>) -> Fut,
    Fut: Future<Output = std::result::Result<T, String>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        cluster.check_alive()?;
        let last = match probe(cluster.urls.clone()).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "{} not ready after {:?} ({what}): {last}{}",
                cluster.name,
                READY_TIMEOUT,
                log_tails(&cluster.logs)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader's client URL, once a replica reports one.
async fn tug_leader(urls: Vec<String>) -> std::result::Result<String, String> {
    let mut last = String::from("no replica answered");
    for url in &urls {
        let channel = match connect(url).await {
            Ok(c) => c,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        match ControlClient::new(channel)
            .cluster_status(ClusterStatusRequest {})
            .await
        {
            Ok(resp) => {
                let status = resp.into_inner();
                if status.leader_id == 0 {
                    last = format!("{url}: no leader yet");
                    continue;
                }
                if let Some(m) = status.members.iter().find(|m| m.id == status.leader_id) {
                    let addr = &m.address;
                    return Ok(if addr.contains("://") {
                        addr.clone()
                    } else {
                        format!("http://{addr}")
                    });
                }
                last = format!("{url}: leader {} is not a member", status.leader_id);
            }
            Err(s) => last = format!("{url}: {}", s.message()),
        }
    }
    Err(last)
}

/// The leader's client URL: the member whose own id is the leader id it reports.
async fn etcd_leader(urls: Vec<String>) -> std::result::Result<String, String> {
    let mut last = String::from("no member answered");
    for url in &urls {
        let channel = match connect(url).await {
            Ok(c) => c,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        match MaintenanceClient::new(channel)
            .status(StatusRequest {})
            .await
        {
            Ok(resp) => {
                let status = resp.into_inner();
                let me = status.header.map(|h| h.member_id).unwrap_or_default();
                if status.leader != 0 && status.leader == me {
                    return Ok(url.clone());
                }
                last = format!("{url}: not the leader (leader {:x})", status.leader);
            }
            Err(s) => last = format!("{url}: {}", s.message()),
        }
    }
    Err(last)
}

fn service(name: String) -> Service {
    Service {
        metadata: Some(ObjectMeta {
            name,
            ..Default::default()
        }),
        spec: Some(
            ServiceSpec {
                image: "busybox".into(),
                replicas: 1,
                ..Default::default()
            }
            .into(),
        ),
        previous_spec: None,
    }
}

/// One client's sequential writes.
trait Writer: Clone + Send + 'static {
    fn write(
        &mut self,
        name: String,
    ) -> impl Future<Output = std::result::Result<(), String>> + Send;
}

#[derive(Clone)]
struct TugWriter(ControlClient<Channel>);

impl Writer for TugWriter {
    async fn write(&mut self, name: String) -> std::result::Result<(), String> {
        self.0
            .apply(ApplyRequest {
                services: vec![service(name)],
            })
            .await
            .map(|_| ())
            .map_err(|s| format!("apply: {:?}: {}", s.code(), s.message()))
    }
}

#[derive(Clone)]
struct EtcdWriter(KvClient<Channel>);

impl Writer for EtcdWriter {
    async fn write(&mut self, name: String) -> std::result::Result<(), String> {
        let value = service(name.clone()).encode_to_vec();
        self.0
            .put(PutRequest {
                key: name.into_bytes(),
                value,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| format!("put: {:?}: {}", s.code(), s.message()))
    }
}

#[derive(Debug, Default)]
struct Measured {
    /// Sorted.
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    /// CPU time (user + system) the three replicas used while measured.
    server_cpu: Duration,
    /// CPU time this program (the clients) used meanwhile.
    client_cpu: Duration,
    /// Acknowledged writes of the warm-ups (not in `latencies`).
    warmup_writes: u64,
    /// Writes/s of each round added, in order.
    round_rates: Vec<f64>,
}

impl Measured {
    /// Adds another round of the same level.
    fn add(&mut self, round: Measured) {
        self.round_rates.push(round.per_sec());
        self.latencies.extend(round.latencies);
        self.latencies.sort_unstable();
        self.errors += round.errors;
        if self.first_error.is_none() {
            self.first_error = round.first_error;
        }
        self.elapsed += round.elapsed;
        self.server_cpu += round.server_cpu;
        self.client_cpu += round.client_cpu;
        self.warmup_writes += round.warmup_writes;
    }

    /// Every acknowledged write, warm-ups included.
    fn all_writes(&self) -> u64 {
        self.latencies.len() as u64 + self.warmup_writes
    }

    /// CPU microseconds per acknowledged write.
    fn cpu_per_write(&self, cpu: Duration) -> f64 {
        if self.latencies.is_empty() {
            0.0
        } else {
            cpu.as_secs_f64() * 1e6 / self.latencies.len() as f64
        }
    }

    fn per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.latencies.len() as f64 / secs
        } else {
            0.0
        }
    }

    fn p(&self, p: f64) -> Duration {
        percentile_of_sorted(&self.latencies, p)
    }
}

/// `writers` (one per client, each its own connection) write sequentially until `duration` is
/// over; names are `w-<tag>-<client>-<n>`, unique per write.
async fn drive<W: Writer>(writers: &[W], tag: &str, duration: Duration) -> Result<Measured> {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::with_capacity(writers.len());
    for (c, w) in writers.iter().enumerate() {
        let mut w = w.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut m = Measured::default();
            let mut n = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                match w.write(format!("w-{tag}-{c}-{n}")).await {
                    Ok(()) => m.latencies.push(t.elapsed()),
                    Err(e) => {
                        m.errors += 1;
                        m.first_error.get_or_insert(e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                n += 1;
            }
            m
        }));
    }
    let mut total = Measured::default();
    for task in tasks {
        let m = task
            .await
            .map_err(|e| format!("a writer task failed: {e}"))?;
        total.latencies.extend(m.latencies);
        total.errors += m.errors;
        if total.first_error.is_none() {
            total.first_error = m.first_error;
        }
    }
    // Until the last write in flight at the end came back: every counted write is inside.
    total.elapsed = start.elapsed();
    total.latencies.sort_unstable();
    Ok(total)
}

/// Linux reports process CPU times in /proc in USER_HZ ticks, which is 100 per second.
const USER_HZ: u64 = 100;

/// CPU time (user + system, every thread) that process `pid` has used so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    // Fields after the command name (which may hold spaces) start with the state, field 3;
    // utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok(Duration::from_millis((user + system) * 1000 / USER_HZ)),
        _ => Err(format!("{path}: no CPU times in {stat:?}").into()),
    }
}

fn cpu_of(pids: &[u32]) -> Result<Duration> {
    pids.iter().map(|&pid| cpu_time(pid)).sum()
}

/// Resident memory (VmRSS) of processes `pids` together now, in bytes.
fn rss_of(pids: &[u32]) -> Result<u64> {
    let mut bytes = 0;
    for &pid in pids {
        let kib = proc_status_kib(pid, "VmRSS").map_err(|e| format!("pid {pid}: {e}"))?;
        bytes += kib * 1024;
    }
    Ok(bytes)
}

/// The replicas' resident memory after every level, and its growth since `start` (their RSS
/// before the first level) per write, each replica holding every write.
fn memory_line(system: &str, pids: &[u32], start: u64, writes: u64) -> Result<String> {
    let end = rss_of(pids)?;
    let replicas = pids.len().max(1) as u64;
    Ok(format!(
        "{system}: replicas' memory (RSS) {:.0} MiB each at the end, {:.2} KB more a write \
         ({writes} writes)",
        (end / replicas) as f64 / f64::from(1 << 20),
        end.saturating_sub(start) as f64 / replicas as f64 / writes.max(1) as f64 / 1e3,
    ))
}

/// Round `round` of one level: a warm-up (not counted), then the measured writes, with the CPU
/// time the replicas (`pids`) and this program used meanwhile. Every round writes new names, so
/// every write creates an object (none is an unchanged re-apply).
async fn level<W: Writer>(
    writers: &[W],
    clients: usize,
    round: usize,
    args: &Args,
    system: &str,
    pids: &[u32],
) -> Result<Measured> {
    let mut warmup_writes = 0;
    if !args.warmup.is_zero() {
        let warm = drive(writers, &format!("{clients}w{round}"), args.warmup).await?;
        warmup_writes = warm.all_writes();
    }
    let me = std::process::id();
    let (server0, client0) = (cpu_of(pids)?, cpu_time(me)?);
    let mut m = drive(writers, &format!("{clients}m{round}"), args.duration).await?;
    m.server_cpu = cpu_of(pids)?.saturating_sub(server0);
    m.client_cpu = cpu_time(me)?.saturating_sub(client0);
    m.warmup_writes = warmup_writes;
    eprintln!(
        "  {system:<4} {clients:>4} clients: {:>8.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, \
         {:.0} us server CPU a write, {} errors",
        m.per_sec(),
        ms(m.p(50.0)),
        ms(m.p(99.0)),
        m.cpu_per_write(m.server_cpu),
        m.errors
    );
    Ok(m)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn table(rows: &[(usize, Measured, Measured)]) -> String {
    let mut out = format!(
        "{:>7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9}\n",
        "clients",
        "tug w/s",
        "etcd w/s",
        "tug/etcd",
        "tug p50",
        "etcd p50",
        "tug p99",
        "etcd p99",
        "p99 t/e",
        "tug cpu/w",
        "etcd cpu/w",
        "cpu t/e",
    );
    for (clients, tug, etcd) in rows {
        let (tug_cpu, etcd_cpu) = (
            tug.cpu_per_write(tug.server_cpu),
            etcd.cpu_per_write(etcd.server_cpu),
        );
        let _ = writeln!(
            out,
            "{clients:>7} {:>10.0} {:>10.0} {:>9} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>9} \
             {:>8.0}us {:>8.0}us {:>9}",
            tug.per_sec(),
            etcd.per_sec(),
            ratio(tug.per_sec(), etcd.per_sec()),
            ms(tug.p(50.0)),
            ms(etcd.p(50.0)),
            ms(tug.p(99.0)),
            ms(etcd.p(99.0)),
            ratio(ms(tug.p(99.0)), ms(etcd.p(99.0))),
            tug_cpu,
            etcd_cpu,
            ratio(tug_cpu, etcd_cpu),
        );
    }
    out.push_str(
        "cpu/w: CPU time (user + system) of the three replicas together per acknowledged write\n",
    );
    for (clients, tug, etcd) in rows {
        out.push_str(&verdict(*clients, tug, etcd));
        out.push('\n');
    }
    for (clients, tug, etcd) in rows {
        let _ = writeln!(
            out,
            "client CPU a write at {clients} clients (this program): {:.0} us for tug, {:.0} us \
             for etcd",
            tug.cpu_per_write(tug.client_cpu),
            etcd.cpu_per_write(etcd.client_cpu),
        );
    }
    for (clients, tug, etcd) in rows {
        for (name, m) in [("tug", tug), ("etcd", etcd)] {
            if m.errors > 0 {
                let _ = writeln!(
                    out,
                    "{name} at {clients} clients: {} failed writes (not counted), first: {}",
                    m.errors,
                    m.first_error.as_deref().unwrap_or("?")
                );
            }
        }
    }
    out
}

/// The target at one level, judged on the figures of the table (every round's writes
/// together): at least [`TARGET_RATIO`] times etcd's writes/s and a lower p99. With each
/// round's own ratio (tug's round against the etcd round that followed it), whose spread
/// shows how much the machine moved during the run.
fn verdict(clients: usize, tug: &Measured, etcd: &Measured) -> String {
    let rounds = paired_ratios(
        tug.round_rates.iter().copied(),
        etcd.round_rates.iter().copied(),
    );
    let count = rounds.len();
    let by_round = match rounds.iter().copied().reduce(f64::min) {
        Some(min) => format!(
            "rounds {min:.2}x (lowest) / {:.2}x (median) of {count}",
            median_of(rounds)
        ),
        None => "no round with etcd writes".into(),
    };
    let (tug_rate, etcd_rate) = (tug.per_sec(), etcd.per_sec());
    let (tug_p99, etcd_p99) = (tug.p(99.0), etcd.p(99.0));
    let fast = etcd_rate > 0.0 && tug_rate >= TARGET_RATIO * etcd_rate;
    let tail = !etcd.latencies.is_empty() && tug_p99 < etcd_p99;
    let met = if fast && tail { "met" } else { "NOT met" };
    format!(
        "target at {clients} clients ({TARGET_RATIO}x etcd's writes/s, a lower p99): {met} \
         ({}, {by_round}; p99 {})",
        ratio(tug_rate, etcd_rate),
        ratio(ms(tug_p99), ms(etcd_p99)),
    )
}

async fn writers<W, F>(url: &str, n: usize, make: F) -> Result<Vec<W>>
where
    F: Fn(Channel) -> W,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(make(connect(url).await?));
    }
    Ok(out)
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let tug = tug_binary()?;
    exec::require("etcd")?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // Started from this (the main) thread: the kernel kills them if it dies.
    let mut tug_cluster = start_tug(&tug, &args.dir)?;
    let mut etcd_cluster = start_etcd(&args.dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let result = runtime.block_on(async {
        let tug_leader = wait_ready(
            &mut tug_cluster,
            "a leader and a first apply",
            |urls| async move {
                let leader = tug_leader(urls).await?;
                let channel = connect(&leader).await.map_err(|e| e.to_string())?;
                TugWriter(ControlClient::new(channel))
                    .write("w-ready".into())
                    .await?;
                Ok(leader)
            },
        )
        .await?;
        let etcd_leader = wait_ready(
            &mut etcd_cluster,
            "a leader and a first put",
            |urls| async move {
                let leader = etcd_leader(urls).await?;
                let channel = connect(&leader).await.map_err(|e| e.to_string())?;
                EtcdWriter(KvClient::new(channel))
                    .write("w-ready".into())
                    .await?;
                Ok(leader)
            },
        )
        .await?;
        println!(
            "tug controller vs etcd {}: 3 replicas each on loopback, both fsync every write \
             (their defaults), data under {} (one disk), {cores} cores shared by both clusters \
             and the clients; writes to the leader ({} / {}), one connection per client; \
             per level {} rounds, each {:.1} s of tug then {:.1} s of etcd, after {:.1} s of \
             warm-up each\n",
            etcd_version(),
            args.dir.display(),
            tug_leader,
            etcd_leader,
            args.rounds,
            args.duration.as_secs_f64(),
            args.duration.as_secs_f64(),
            args.warmup.as_secs_f64(),
        );
        let (tug_pids, etcd_pids) = (tug_cluster.pids(), etcd_cluster.pids());
        let (tug_rss, etcd_rss) = (rss_of(&tug_pids)?, rss_of(&etcd_pids)?);
        let mut rows = Vec::new();
        for &clients in &args.levels {
            let tug_writers = writers(&tug_leader, clients, |c| TugWriter(ControlClient::new(c)));
            let tug_writers = tug_writers.await?;
            let etcd_writers = writers(&etcd_leader, clients, |c| EtcdWriter(KvClient::new(c)));
            let etcd_writers = etcd_writers.await?;
            // Rounds alternate the two systems, so a machine that speeds up or slows down
            // during the run (other tenants, page cache reclaim) weighs on both alike.
            let (mut t, mut e) = (Measured::default(), Measured::default());
            for round in 0..args.rounds {
                t.add(level(&tug_writers, clients, round, &args, "tug", &tug_pids).await?);
                tug_cluster.check_alive()?;
                e.add(level(&etcd_writers, clients, round, &args, "etcd", &etcd_pids).await?);
                etcd_cluster.check_alive()?;
            }
            rows.push((clients, t, e));
        }
        println!("{}", table(&rows));
        let tug_writes = rows.iter().map(|(_, t, _)| t.all_writes()).sum::<u64>();
        let etcd_writes = rows.iter().map(|(_, _, e)| e.all_writes()).sum::<u64>();
        println!("{}", memory_line("tug", &tug_pids, tug_rss, tug_writes)?);
        println!(
            "{} (with the pages of its database file it has mapped)",
            memory_line("etcd", &etcd_pids, etcd_rss, etcd_writes)?
        );
        Ok::<(), Error>(())
    });
    drop(runtime);
    tug_cluster.stop();
    etcd_cluster.stop();
    result
}

fn etcd_version() -> String {
    Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("etcd Version: ").map(str::to_string))
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One round of `writes` in a second, each write taking `latency_us`, but the slowest
    /// 2% taking `tail_us`.
    fn round(writes: u32, latency_us: u64, tail_us: u64) -> Measured {
        let slow = writes / 50;
        let mut latencies: Vec<Duration> = (0..writes)
            .map(|i| Duration::from_micros(if i < slow { tail_us } else { latency_us }))
            .collect();
        latencies.sort_unstable();
        Measured {
            latencies,
            elapsed: Duration::from_secs(1),
            ..Measured::default()
        }
    }

    /// A level of these rounds, as `run` adds them up.
    fn level(tug: Vec<Measured>, etcd: Vec<Measured>) -> (Measured, Measured) {
        let (mut t, mut e) = (Measured::default(), Measured::default());
        tug.into_iter().for_each(|r| t.add(r));
        etcd.into_iter().for_each(|r| e.add(r));
        (t, e)
    }

    #[test]
    fn the_verdict_needs_both_the_throughput_and_the_tail() {
        // 1.6x the writes/s and a lower p99, though one round alone was below 1.5x.
        let (t, e) = level(
            vec![round(2400, 300, 600), round(3000, 300, 600)],
            vec![round(1700, 500, 900), round(1700, 500, 900)],
        );
        let v = verdict(1, &t, &e);
        assert!(v.starts_with("target at 1 clients (1.5x etcd's writes/s, a lower p99): met (1.59x, rounds 1.41x (lowest) / 1.59x (median) of 2; p99 0.67x)"), "{v}");

        // 1.49x: not met, whatever the tail.
        let (t, e) = level(vec![round(2980, 300, 600)], vec![round(2000, 500, 900)]);
        assert!(verdict(16, &t, &e).contains(": NOT met (1.49x,"));

        // Fast enough, but the p99 is higher.
        let (t, e) = level(vec![round(3200, 300, 1000)], vec![round(2000, 500, 900)]);
        assert!(verdict(256, &t, &e).contains(": NOT met (1.60x,"));

        // No etcd writes: no ratio to meet.
        let (t, e) = level(vec![round(3200, 300, 600)], vec![round(0, 500, 900)]);
        let v = verdict(1, &t, &e);
        assert!(
            v.contains(": NOT met (-, no round with etcd writes;"),
            "{v}"
        );
    }
}
