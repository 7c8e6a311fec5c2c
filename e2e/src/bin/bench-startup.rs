//! Startup latency on real hosts: the test bed's three controller hosts and three agent hosts
//! (network namespaces on this machine, real registry, real containers). The image is pulled
//! onto every agent first (a warm-up service), then one service of N replicas (default 100) is
//! applied; per task, the latency is from its creation by the controller (`created_ms`) to its
//! container's start reported by its agent (`started_ms`), both wall clocks of this machine.
//! Prints median, p90, p99 and max, and the time from `apply` until every replica is reported
//! running, next to Kubernetes' pod-startup SLO (p99 under 5 s for stateless pods with images
//! already on the node,
//! https://github.com/kubernetes/community/blob/master/sig-scalability/slos/pod_startup_latency.md).
//!
//! Run: `e2e/bench.sh startup [REPLICAS]`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tug_e2e::TestImages;
use tug_e2e::cluster::{AGENTS, Cluster, DESIRED_RUNNING, RUNNING};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-startup: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let replicas: u32 = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|e| format!("REPLICAS {n:?}: {e}"))?,
        None => 100,
    };
    let tug = std::env::current_exe()?.with_file_name("tug");
    if !tug.is_file() {
        return Err(format!("{} not found: cargo build --release -p tug", tug.display()).into());
    }
    let images = TestImages::get()?;
    let cluster = Cluster::start(&tug, "1s")?;
    let image = images.oci.reference(&cluster.registry);
    wait(&cluster, "the agents to register", || {
        let out = cluster.ok(&["get", "nodes", "-o", "json"])?;
        Ok(out.matches("\"state\": 1").count() == AGENTS)
    })?;

    // Warm-up: the image lands on every agent.
    let warm = cluster.manifest("warmup", &image, AGENTS as u32, "16Mi")?;
    cluster.apply(&warm)?;
    wait(&cluster, "the warm-up replicas", || {
        Ok(cluster.running("warmup")?.len() == AGENTS)
    })?;
    cluster.ok(&["delete", "service", "warmup"])?;
    wait(&cluster, "the warm-up to go", || {
        Ok(cluster.tasks("warmup")?.is_empty())
    })?;

    let manifest = cluster.manifest("bench", &image, replicas, "16Mi")?;
    let t0 = Instant::now();
    cluster.apply(&manifest)?;
    wait(&cluster, "every replica running", || {
        Ok(cluster.running("bench")?.values().sum::<usize>() == replicas as usize)
    })?;
    let total = t0.elapsed();
    let mut latencies: Vec<Duration> = cluster
        .tasks("bench")?
        .iter()
        .filter(|t| t["desired_state"] == DESIRED_RUNNING && t["status"]["state"] == RUNNING)
        .filter_map(|t| {
            let created = t["created_ms"].as_u64()?;
            let started = t["status"]["started_ms"].as_u64()?;
            Some(Duration::from_millis(started.saturating_sub(created)))
        })
        .collect();
    latencies.sort();
    let pct = |p: f64| tug_e2e::bench::percentile_of_sorted(&latencies, p);
    cluster.ok(&["delete", "service", "bench"])?;
    wait(&cluster, "the containers to go", || {
        Ok((0..AGENTS).all(|i| cluster.containers(i).is_empty()))
    })?;
    println!(
        "{replicas} replicas on {AGENTS} agent hosts (image cached), per-container latency from \
         task creation to container start:"
    );
    println!(
        "  median {:>6.0} ms   p90 {:>6.0} ms   p99 {:>6.0} ms   max {:>6.0} ms   ({} samples)",
        ms(pct(50.0)),
        ms(pct(90.0)),
        ms(pct(99.0)),
        ms(latencies.last().copied().unwrap_or_default()),
        latencies.len()
    );
    println!(
        "  apply -> all {replicas} reported running: {:.2} s",
        total.as_secs_f64()
    );
    println!(
        "  Kubernetes pod-startup SLO: p99 < 5000 ms -> tug p99 is {:.3}x of it",
        ms(pct(99.0)) / 5000.0
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn wait(cluster: &Cluster, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if check().unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
