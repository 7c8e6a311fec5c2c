//! The cost of the agent's metrics with many containers: the test bed's cluster (three controller
//! hosts, three agent hosts), N idle containers (default 200) placed on agent a0, then
//!
//! - scrape time of a0's `/metrics` (median and p90 over repeated scrapes, from another host);
//! - a0's CPU per scrape (its process CPU time over back-to-back scrapes), and what that is at a
//!   15 s scrape interval; a0's total CPU over a window scraped every 15 s (heartbeats and usage
//!   reports included);
//! - a0's resident memory before the containers and with them;
//!
//! next to the targets (a scrape under 50 ms with 200 containers; scraping every 15 s under 1%
//! of a core). cAdvisor, the peer these names come from, is not packaged for Debian 12, so it is
//! not run; the output says so.
//!
//! Run: `e2e/bench.sh metrics [CONTAINERS] [WINDOW_SECS]`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tug_e2e::TestImages;
use tug_e2e::bench::{Samples, proc_status_kib};
use tug_e2e::cluster::{AGENTS, Cluster};
use tug_e2e::prometheus::get_text;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const TIMEOUT: Duration = Duration::from_secs(600);
const SCRAPES: usize = 50;
const INTERVAL: Duration = Duration::from_secs(15);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-metrics: {err}");
            ExitCode::FAILURE
        }
    }
}

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        Ok(fields
            .get(i)
            .ok_or("short /proc/PID/stat")?
            .parse::<u64>()?)
    };
    // After the comm: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    Ok(field(11)? + field(12)?)
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let containers: usize = match args.next() {
        Some(n) => n.parse().map_err(|e| format!("CONTAINERS {n:?}: {e}"))?,
        None => 200,
    };
    let window: u64 = match args.next() {
        Some(n) => n.parse().map_err(|e| format!("WINDOW_SECS {n:?}: {e}"))?,
        None => 60,
    };
    let tug = std::env::current_exe()?.with_file_name("tug");
    if !tug.is_file() {
        return Err(format!("{} not found: cargo build --release -p tug", tug.display()).into());
    }
    let images = TestImages::get()?;
    let cluster = Cluster::start(&tug, "1s")?;
    let result = measure(&cluster, images, containers, window);
    if result.is_err() {
        cluster.dump_logs();
    }
    result
}

fn measure(cluster: &Cluster, images: &TestImages, containers: usize, window: u64) -> Result<()> {
    let image = images.oci.reference(&cluster.registry);
    wait("the agents to register", || {
        let out = cluster.ok(&["get", "nodes", "-o", "json"])?;
        Ok(out.matches("\"state\": 1").count() == AGENTS)
    })?;
    let agent_pid = cluster.agents[0]
        .as_ref()
        .map(|a| a.pid())
        .ok_or("agent a0 is not running")?;
    let client = cluster.client_host().netns().clone();
    let url = format!("http://{}:7443/metrics", cluster.agent_host(0).addr());
    let scrape = || -> Result<usize> { Ok(get_text(&client, &url)?.len()) };

    scrape()?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = proc_status_kib(agent_pid, "VmRSS")?;
    let (empty_scrape, _, _) = scrapes(&scrape, agent_pid)?;

    // N idle containers, all on a0 (its zone), with the image pulled once.
    let manifest = cluster.manifest("idle", &image, containers as u32, "8Mi")?;
    let text = std::fs::read_to_string(&manifest)?.replace(
        "  stopGracePeriod: 2s\n",
        "  stopGracePeriod: 1s\n  placement:\n    constraints: [\"zone==z0\"]\n",
    );
    let text = text.replace("cpu: 100m", "cpu: 10m");
    std::fs::write(&manifest, text)?;
    let started = Instant::now();
    cluster.apply(&manifest)?;
    wait("every container running on a0", || {
        Ok(cluster.containers(0).len() == containers)
    })?;
    let start_all = started.elapsed();
    // Let the starts settle (the status reports, the first usage samples).
    std::thread::sleep(Duration::from_secs(10));
    let rss_full = proc_status_kib(agent_pid, "VmRSS")?;
    let body = scrape()?;
    let (full_scrape, cpu_per_scrape, scraped) = scrapes(&scrape, agent_pid)?;

    // A window scraped every 15 s, as Prometheus would: the agent's whole CPU.
    let hz = ticks_per_second();
    let before = cpu_ticks(agent_pid)?;
    let t0 = Instant::now();
    let mut next = t0;
    while t0.elapsed() < Duration::from_secs(window) {
        if Instant::now() >= next {
            scrape()?;
            next += INTERVAL;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let window_cpu = (cpu_ticks(agent_pid)? - before) as f64 / hz / t0.elapsed().as_secs_f64();

    cluster.ok(&["delete", "service", "idle"])?;
    wait("the containers to go", || {
        Ok(cluster.containers(0).is_empty())
    })?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let scrape_share = cpu_per_scrape / INTERVAL.as_secs_f64();
    println!(
        "agent /metrics with {containers} idle containers on one agent ({} started in {:.1} s); \
         {SCRAPES} scrapes each, from another host",
        containers,
        start_all.as_secs_f64()
    );
    println!(
        "  scrape, 0 containers:   median {:>7.2} ms   p90 {:>7.2} ms",
        ms(empty_scrape.median()),
        ms(empty_scrape.p90())
    );
    println!(
        "  scrape, {containers} containers: median {:>7.2} ms   p90 {:>7.2} ms   ({} KiB, {scraped} scrapes)   target < 50 ms: {}",
        ms(full_scrape.median()),
        ms(full_scrape.p90()),
        body / 1024,
        verdict(ms(full_scrape.median()) < 50.0)
    );
    println!(
        "  agent cpu per scrape: {:.2} ms -> every 15 s: {:.3}% of a core   target < 1%: {}",
        cpu_per_scrape * 1000.0,
        scrape_share * 100.0,
        verdict(scrape_share < 0.01)
    );
    println!(
        "  agent cpu over {window} s scraped every 15 s (heartbeats, status and usage reports \
         included): {:.3}% of a core",
        window_cpu * 100.0
    );
    println!(
        "  agent RSS: {:.1} MiB without containers, {:.1} MiB with {containers} ({:+.1} MiB)",
        rss_idle as f64 / 1024.0,
        rss_full as f64 / 1024.0,
        (rss_full as f64 - rss_idle as f64) / 1024.0
    );
    println!(
        "  peer: cAdvisor is not packaged for Debian 12 (no `cadvisor` package), so it was not \
         run; no ratio is given."
    );
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// `SCRAPES` back-to-back scrapes: their times, the agent's CPU seconds per scrape, the count.
fn scrapes(scrape: &impl Fn() -> Result<usize>, pid: u32) -> Result<(Samples, f64, usize)> {
    let mut samples = Samples::new("scrape");
    let before = cpu_ticks(pid)?;
    for _ in 0..SCRAPES {
        samples.time(scrape)?;
    }
    let cpu = (cpu_ticks(pid)? - before) as f64 / ticks_per_second() / SCRAPES as f64;
    Ok((samples, cpu, SCRAPES))
}

fn wait(what: &str, check: impl FnMut() -> Result<bool>) -> Result<()> {
    tug_e2e::cluster::wait_for(what, TIMEOUT, check)
}
