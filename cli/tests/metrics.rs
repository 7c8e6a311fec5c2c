//! Metrics end to end, on the test bed (DESIGN.md, "Observability"): three `tug controller`
//! hosts and three `tug agent` hosts, and a real Prometheus server (Debian's) on the client host
//! that finds every endpoint through the controllers' HTTP service discovery and scrapes them.
//! Everything is asked through PromQL over Prometheus' HTTP API:
//!
//! - every endpoint's output passes `promtool check metrics`;
//! - every running task has its cpu and memory series with the right labels;
//! - a container that fills 40 MiB of /dev/shm shows at least that working set;
//! - a container whose child is OOM-killed counts it in `container_oom_events_total`;
//! - `tug top services` shows the same usage without Prometheus;
//! - killing the leader controller is counted in `tug_raft_leader_changes_total`.
//!
//! Prometheus is started here, inside the client host, and stopped by PID (its guard); the
//! cluster stops its processes and removes its containers when dropped, also on failure.

use std::error::Error;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tug_e2e::TestImages;
use tug_e2e::cluster::{AGENTS, CONTROLLERS, Cluster, DESIRED_RUNNING, RUNNING};
use tug_e2e::prometheus::{Prometheus, get_text, promtool_check};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

const WAIT: Duration = Duration::from_secs(90);
const TUG: &str = env!("CARGO_BIN_EXE_tug");
const MIB: f64 = 1024.0 * 1024.0;

fn wait(what: &str, check: impl FnMut() -> TestResult<bool>) -> TestResult {
    tug_e2e::cluster::wait_for(what, WAIT, check)
}

/// A service running `script` under `sh -c`, one replica.
fn service(dir: &Path, name: &str, image: &str, memory: &str, script: &str) -> TestResult<String> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: tug.dev/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  replicas: 1\n  command: [\"/bin/sh\", \"-c\", {script:?}]\n  resources:\n    cpu: 100m\n    memory: {memory}\n  stopGracePeriod: 1s\n",
        ),
    )?;
    Ok(path.to_string_lossy().into_owned())
}

#[test]
fn prometheus_discovers_and_scrapes_the_cluster() -> TestResult {
    let images = TestImages::get()?;
    let mut bed = Cluster::start(Path::new(TUG), "500ms")?;
    let manifests = tempfile::Builder::new().prefix("tug-metrics-").tempdir()?;
    let result = scenario(&mut bed, images, manifests.path());
    if result.is_err() {
        bed.dump_logs();
    }
    result
}

fn scenario(bed: &mut Cluster, images: &TestImages, dir: &Path) -> TestResult {
    let image = images.oci.reference(&bed.registry);
    wait("three ready nodes", || {
        let out = bed.ok(&["get", "nodes", "-o", "json"])?;
        Ok(out.matches("\"state\": 1").count() == AGENTS)
    })?;

    // Three idle replicas, one container that fills 40 MiB of tmpfs, one whose child is
    // OOM-killed (awk doubling a string under a 32 MiB limit) while it keeps running.
    let web = bed.manifest("web", &image, 3, "64Mi")?;
    bed.apply(&web)?;
    let hog = service(
        dir,
        "hog",
        &image,
        "256Mi",
        "dd if=/dev/zero of=/dev/shm/fill bs=1048576 count=40 && sleep 3600",
    )?;
    bed.ok(&["apply", "-f", &hog])?;
    let oom = service(
        dir,
        "oom",
        &image,
        "32Mi",
        "awk 'BEGIN { s = \"x\"; while (1) s = s s }'; sleep 3600",
    )?;
    bed.ok(&["apply", "-f", &oom])?;
    wait("web, hog and oom running", || {
        Ok(bed.running("web")?.values().sum::<usize>() == 3
            && bed.running("hog")?.values().sum::<usize>() == 1
            && bed.running("oom")?.values().sum::<usize>() == 1)
    })?;

    // Every endpoint the discovery lists passes promtool, containers included.
    let client_ns = bed.client_host().netns().clone();
    let client = &*client_ns;
    let sd_addr = SocketAddr::from((bed.controller_host(0).addr(), 7442));
    let sd: Value = serde_json::from_str(&get_text(client, &format!("http://{sd_addr}/sd"))?)?;
    let groups = sd.as_array().cloned().unwrap_or_default();
    assert_eq!(
        groups.len(),
        CONTROLLERS + AGENTS,
        "every controller and agent is discovered: {sd}"
    );
    for group in &groups {
        let role = group["labels"]["role"].as_str().unwrap_or("");
        assert!(role == "controller" || role == "agent", "{group}");
        let target: SocketAddr = group["targets"][0].as_str().unwrap_or("").parse()?;
        let text = get_text(client, &format!("http://{target}/metrics"))?;
        promtool_check(&text).map_err(|e| format!("{target}: {e}"))?;
        if role == "agent" {
            assert!(
                group["labels"]["zone"]
                    .as_str()
                    .is_some_and(|z| z.starts_with('z')),
                "agents carry their zone label: {group}"
            );
            assert!(
                text.contains("container_cpu_usage_seconds_total{"),
                "{text}"
            );
        }
    }

    let sd_urls: Vec<String> = (0..CONTROLLERS)
        .map(|i| format!("http://{}:7442/sd", bed.controller_host(i).addr()))
        .collect();
    let prometheus = Prometheus::start(bed.client_host(), &sd_urls, "1s")?;
    wait("all 6 targets up", || {
        let up = prometheus.query("up{job=\"tug\"}")?;
        Ok(up.len() == CONTROLLERS + AGENTS && up.iter().all(|(_, v)| *v == 1.0))
    })?;

    // Each running task: cpu and memory series with its labels.
    let mut tasks = Vec::new();
    for svc in ["web", "hog", "oom"] {
        tasks.extend(
            bed.tasks(svc)?.into_iter().filter(|t| {
                t["desired_state"] == DESIRED_RUNNING && t["status"]["state"] == RUNNING
            }),
        );
    }
    assert_eq!(tasks.len(), 5);
    for metric in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
    ] {
        wait(&format!("{metric} of every running task"), || {
            let series = prometheus.query(metric)?;
            Ok(tasks.iter().all(|t| {
                series.iter().any(|(labels, _)| {
                    labels["task"] == t["id"]
                        && labels["node"] == t["node"]
                        && labels["service"] == t["service"]
                        && labels["namespace"] == t["namespace"]
                        && labels["image"] == t["spec"]["image"]
                        && labels["role"] == "agent"
                })
            }))
        })?;
    }

    // The known allocation shows in the working set.
    let mut working_set = 0.0;
    wait("hog's working set >= 40 MiB", || {
        let v = prometheus.query("container_memory_working_set_bytes{service=\"hog\"}")?;
        working_set = v.first().map_or(0.0, |(_, v)| *v);
        Ok(v.len() == 1 && working_set >= 40.0 * MIB)
    })?;
    eprintln!("hog's working set: {:.1} MiB", working_set / MIB);
    // The OOM kill is counted.
    let mut ooms = 0.0;
    wait("oom's OOM kill counted", || {
        let v = prometheus.query("container_oom_events_total{service=\"oom\"}")?;
        ooms = v.first().map_or(0.0, |(_, v)| *v);
        Ok(v.len() == 1 && ooms >= 1.0)
    })?;
    eprintln!("oom's OOM events: {ooms}");
    // Every container has its own eth0 on the node network: its counters are its own.
    wait("eth0 counters of every running task", || {
        let series = prometheus.query("container_network_transmit_bytes_total")?;
        Ok(tasks.iter().all(|t| {
            series
                .iter()
                .any(|(labels, _)| labels["task"] == t["id"] && labels["interface"] == "eth0")
        }))
    })?;

    // `tug top` sees the same without Prometheus.
    wait("tug top services shows hog's memory", || {
        let rows: Value = serde_json::from_str(&bed.ok(&["top", "services", "-o", "json"])?)?;
        let rows = rows.as_array().cloned().unwrap_or_default();
        let row = |name: &str| rows.iter().find(|r| r["service"] == name).cloned();
        Ok(
            row("hog").is_some_and(|r| r["memory_bytes"].as_f64().unwrap_or(0.0) >= 40.0 * MIB)
                && row("web").is_some_and(|r| r["tasks"] == 3),
        )
    })?;
    let nodes: Value = serde_json::from_str(&bed.ok(&["top", "nodes", "-o", "json"])?)?;
    assert_eq!(
        nodes.as_array().map(Vec::len),
        Some(AGENTS),
        "one row per node: {nodes}"
    );

    // A failover is counted by the survivors.
    let leader = bed.leader()?;
    let survivor = format!("controller-{}", (leader + 1) % CONTROLLERS + 1);
    let changes = |prometheus: &Prometheus| -> TestResult<f64> {
        let v = prometheus.query(&format!(
            "tug_raft_leader_changes_total{{node=\"{survivor}\"}}"
        ))?;
        v.first()
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("no leader changes series for {survivor}").into())
    };
    let mut before = 0.0;
    wait("the survivor's leader changes are scraped", || {
        before = changes(&prometheus)?;
        Ok(before >= 1.0)
    })?;
    if let Some(mut c) = bed.controllers[leader].take() {
        c.kill()?;
    }
    wait("a new leader", || Ok(bed.leader()? != leader))?;
    let mut after = before;
    wait("the failover is counted", || {
        after = changes(&prometheus)?;
        Ok(after > before)
    })?;
    eprintln!("{survivor}: leader changes {before} -> {after}");
    wait("one leader among the replicas scraped", || {
        let leaders = prometheus.query("sum(tug_raft_is_leader{role=\"controller\"})")?;
        Ok(leaders.first().map(|(_, v)| *v) == Some(1.0))
    })?;
    Ok(())
}
