//! Scheduling and convergence at scale: one `tug controller` process (release build) and N
//! simulated agents in this process (tug_e2e::sim_agent: the real node protocol over gRPC —
//! register, heartbeat, assignment streams, status reports — but no containers). Services adding
//! up to T replicas are applied at once; the program measures the time from `apply` until every
//! task is placed and streamed to its node, and until every node has reported every task
//! running (acknowledged by the controller), placements per second, and the controller's peak
//! memory.
//!
//! No orchestrator peer can run here (no Nomad or Kubernetes packages), so the table ends with
//! their published figures for scale: Nomad's "C1M" (one million containers on 5,000 hosts in
//! under 5 minutes, https://www.hashicorp.com/c1m) and the Kubernetes scheduler's measured
//! throughput (about 100 pods/s in the SIG Scalability 5,000-node tests; the pod-startup SLO is
//! p99 under 5 s, https://github.com/kubernetes/community/blob/master/sig-scalability/slos/slos.md).
//!
//! Run: `e2e/bench.sh schedule [--scale NODES:TASKS,...] [--replicas-per-service N]`
//! (default scales 1000:100000 and 10000:1000000).

use std::fmt::Write as _;
use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tug_api::v1::control_client::ControlClient;
use tug_api::v1::{
    ApplyRequest, ClusterStatusRequest, ListNodesRequest, NodeState, ObjectMeta, Resources,
    Service, ServiceSpec,
};
use tug_e2e::bench::proc_status_kib;
use tug_e2e::sim_agent::{SimAgent, SimAgentConfig};
use tug_e2e::{ChildGuard, spawn};

type Error = Box<dyn std::error::Error>;
type Result<T> = std::result::Result<T, Error>;

/// Agents per shared HTTP/2 connection. Few: agents sharing one connection share its flow
/// control window, so one agent's large assignment stream would hold back the others'
/// heartbeats (real agents each have their own connection).
const AGENTS_PER_CHANNEL: usize = 25;
const TIMEOUT: Duration = Duration::from_secs(1200);

#[derive(Debug, Clone)]
struct Args {
    scales: Vec<(usize, usize)>,
    per_service: usize,
    heartbeat: String,
    dir: PathBuf,
}

const USAGE: &str = "usage: bench-schedule [--scale NODES:TASKS,...] [--replicas-per-service N] \
[--heartbeat-period 10s] [--dir DIR]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        scales: vec![(1000, 100_000), (10_000, 1_000_000)],
        per_service: 1000,
        heartbeat: "10s".into(),
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
            "--scale" => {
                args.scales = value
                    .split(',')
                    .map(|pair| {
                        let (n, t) = pair
                            .split_once(':')
                            .ok_or_else(|| format!("--scale {pair:?} is not NODES:TASKS"))?;
                        Ok((n.parse()?, t.parse()?))
                    })
                    .collect::<Result<_>>()?;
            }
            "--replicas-per-service" => args.per_service = value.parse()?,
            "--heartbeat-period" => args.heartbeat = value,
            "--dir" => args.dir = value.into(),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}").into()),
        }
    }
    if args.per_service == 0 {
        return Err("--replicas-per-service must be at least 1".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-schedule: {err}");
            ExitCode::FAILURE
        }
    }
}

struct Row {
    nodes: usize,
    tasks: usize,
    register: Duration,
    placed: Duration,
    running: Duration,
    peak_rss_kib: u64,
}

async fn run(args: Args) -> Result<()> {
    let tug = tug_binary()?;
    let mut rows = Vec::new();
    for (nodes, tasks) in args.scales.clone() {
        eprintln!("== {nodes} nodes, {tasks} tasks");
        rows.push(scenario(&tug, &args, nodes, tasks).await?);
    }
    println!("{}", table(&rows));
    Ok(())
}

async fn scenario(tug: &PathBuf, args: &Args, nodes: usize, tasks: usize) -> Result<Row> {
    let dir = tempfile::Builder::new()
        .prefix("tug-bench-schedule-")
        .tempdir_in(&args.dir)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let log = File::create(dir.path().join("controller.log"))?;
    let mut cmd = Command::new(tug);
    cmd.env("RUST_LOG", "warn")
        .arg("--data-dir")
        .arg(dir.path().join("c1"))
        .args(["controller", "--id", "1", "--listen", &addr])
        .args(["--peers", &format!("1={addr}")])
        .args(["--heartbeat-period", &args.heartbeat])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let controller: ChildGuard = spawn(&mut cmd)?;
    let pid = controller.pid();
    let mut control = wait_for_leader(&addr).await?;

    // Agents, sharing connections.
    let started = Instant::now();
    let mut channels = Vec::new();
    for _ in 0..nodes.div_ceil(AGENTS_PER_CHANNEL) {
        channels.push(
            Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    // Heartbeats and status reports on connections of their own: no assignment data queues in
    // front of their answers (see `SimAgentConfig::unary_channel`).
    let mut beat_channels = Vec::new();
    for _ in 0..nodes.div_ceil(AGENTS_PER_CHANNEL * 4) {
        beat_channels.push(
            Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let agents: Vec<SimAgent> = (0..nodes)
        .map(|i| {
            let mut cfg = SimAgentConfig::new(&format!("sim-{i:05}"));
            cfg.unary_channel = Some(beat_channels[i / (AGENTS_PER_CHANNEL * 4)].clone());
            cfg.labels.insert("zone".into(), format!("z{}", i % 3));
            cfg.cpu_millis = 64_000;
            cfg.memory_bytes = 256 << 30;
            SimAgent::start(vec![channels[i / AGENTS_PER_CHANNEL].clone()], cfg)
        })
        .collect();
    wait(&format!("{nodes} ready nodes"), || async {
        let listed = control
            .clone()
            .list_nodes(ListNodesRequest::default())
            .await?
            .into_inner();
        Ok(listed
            .nodes
            .iter()
            .filter(|n| {
                n.node
                    .as_ref()
                    .is_some_and(|n| n.state() == NodeState::Ready)
            })
            .count()
            == nodes)
    })
    .await?;
    let register = started.elapsed();
    eprintln!("   {nodes} nodes registered in {register:?}");

    // Apply every service at once, in requests of 100 services.
    let services: Vec<Service> = (0..tasks.div_ceil(args.per_service))
        .map(|i| {
            let replicas = args.per_service.min(tasks - i * args.per_service);
            service(&format!("svc-{i:05}"), replicas as u32)
        })
        .collect();
    let t0 = Instant::now();
    for chunk in services.chunks(100) {
        control
            .apply(ApplyRequest {
                services: chunk.to_vec(),
            })
            .await?;
    }
    let mut placed = None;
    let deadline = Instant::now() + TIMEOUT;
    let running = loop {
        let assigned: usize = agents.iter().map(SimAgent::running_count).sum();
        let reported: usize = agents.iter().map(SimAgent::reported_running).sum();
        if placed.is_none() && assigned >= tasks {
            placed = Some(t0.elapsed());
            eprintln!("   all {tasks} placed and streamed in {:?}", t0.elapsed());
        }
        if reported >= tasks {
            break t0.elapsed();
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not converged in {TIMEOUT:?}: {assigned} placed, {reported} reported running"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("   all {tasks} reported running in {running:?}");
    // VmHWM: the process's peak resident memory (0 if it cannot be read).
    let peak_rss_kib = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    for agent in agents {
        agent.stop().await;
    }
    drop(controller);
    Ok(Row {
        nodes,
        tasks,
        register,
        placed: placed.unwrap_or(running),
        running,
        peak_rss_kib,
    })
}

fn service(name: &str, replicas: u32) -> Service {
    Service {
        metadata: Some(ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        spec: Some(
            ServiceSpec {
                image: "registry.example/app:1".into(),
                replicas,
                resources: Some(Resources {
                    cpu_millis: 10,
                    memory_bytes: 16 << 20,
                }),
                ..Default::default()
            }
            .into(),
        ),
        previous_spec: None,
    }
}

async fn wait_for_leader(addr: &str) -> Result<ControlClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
        {
            let mut c = ControlClient::new(channel).max_decoding_message_size(256 << 20);
            if let Ok(s) = c.cluster_status(ClusterStatusRequest {}).await
                && s.get_ref().leader_id != 0
            {
                return Ok(c);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("the controller at {addr} elected no leader").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tug_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
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

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>7} {:>9} {:>10} {:>12} {:>12} {:>13} {:>12}",
        "nodes", "tasks", "register", "all placed", "placed/s", "all running", "ctrl peak"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>7} {:>9} {:>9.1}s {:>11.1}s {:>12.0} {:>12.1}s {:>9} MiB",
            r.nodes,
            r.tasks,
            r.register.as_secs_f64(),
            r.placed.as_secs_f64(),
            r.tasks as f64 / r.placed.as_secs_f64().max(1e-9),
            r.running.as_secs_f64(),
            r.peak_rss_kib / 1024,
        );
    }
    let _ = writeln!(
        out,
        "\npublished figures (not run here; no Nomad or Kubernetes on this machine):\n\
         - Nomad C1M: 1,000,000 containers on 5,000 hosts in under 5 minutes (~3,300 placements/s)\n\
         - Kubernetes scheduler: ~100 pods/s in 5,000-node SIG Scalability runs; pod startup SLO p99 < 5 s\n\
         target: 1,000,000 tasks on 10,000 simulated nodes running in under 300 s"
    );
    for r in rows.iter().filter(|r| r.tasks >= 1_000_000) {
        let _ = writeln!(
            out,
            "{} tasks on {} nodes: {:.1}s to all running ({:.2}x the 300 s target; {:.1}x C1M's placement rate)",
            r.tasks,
            r.nodes,
            r.running.as_secs_f64(),
            r.running.as_secs_f64() / 300.0,
            (r.tasks as f64 / r.placed.as_secs_f64().max(1e-9)) / 3333.0
        );
    }
    out
}
