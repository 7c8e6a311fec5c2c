//! The orchestrator end to end, on the test bed: three `tug controller` hosts and three
//! `tug agent` hosts (network namespaces), the real registry on a host of its own, real images
//! and containers. Every process is started here and stopped by PID; every container the agents
//! made is removed at the end, also when the test fails.
//!
//! One scenario, in order: 6 replicas spread 2/2/2 and really running; scale to 9 and back to 3;
//! a rolling update that keeps every replica available while the controller leader is killed;
//! an agent killed (kill -9) and one cut off the network: their tasks move, and their stale
//! containers stop when they come back; an agent restart keeps its containers' PIDs; a service
//! that fits nowhere stays pending with the reason; deleting services removes every container.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

use tug_e2e::TestImages;
use tug_e2e::cluster::{AGENTS, Cluster, DESIRED_RUNNING, LOST, RUNNING};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

const WAIT: Duration = Duration::from_secs(60);

const TUG: &str = env!("CARGO_BIN_EXE_tug");

fn wait(what: &str, check: impl FnMut() -> TestResult<bool>) -> TestResult {
    tug_e2e::cluster::wait_for(what, WAIT, check)
}

fn counts(map: &BTreeMap<String, usize>) -> Vec<usize> {
    (0..AGENTS)
        .map(|i| map.get(&format!("a{i}")).copied().unwrap_or(0))
        .collect()
}

#[test]
fn apply_scale_roll_lose_nodes_restart_and_delete() -> TestResult {
    let images = TestImages::get()?;
    let mut bed = Cluster::start(Path::new(TUG), "500ms")?;
    let result = scenario(&mut bed, images);
    if result.is_err() {
        bed.dump_logs();
    }
    result
}

/// The highest-numbered agent on which a task of `service` runs (its container included).
fn agent_running(bed: &Cluster, service: &str) -> TestResult<usize> {
    let mut found = None;
    wait(&format!("an agent running {service}"), || {
        found = bed
            .running(service)?
            .keys()
            .filter_map(|node| node.trim_start_matches('a').parse::<usize>().ok())
            .filter(|&i| !bed.containers(i).is_empty())
            .max();
        Ok(found.is_some())
    })?;
    found.ok_or_else(|| format!("no agent runs {service}").into())
}

fn scenario(bed: &mut Cluster, images: &TestImages) -> TestResult {
    let old = images.oci.reference(&bed.registry);
    let new = images.docker.reference(&bed.registry);

    wait("three ready nodes", || {
        let out = bed.ok(&["get", "nodes", "-o", "json"])?;
        Ok(out.matches("\"state\": 1").count() == AGENTS)
    })?;

    // 6 replicas: 2/2/2, and the containers really run on each host.
    let web = bed.manifest("web", &old, 6, "64Mi")?;
    bed.apply(&web)?;
    wait("6 running, 2 per node", || {
        Ok(counts(&bed.running("web")?) == vec![2, 2, 2])
    })?;
    for t in bed.tasks("web")? {
        let node = t["node"].as_str().unwrap_or("");
        let agent: usize = node.trim_start_matches('a').parse()?;
        let id = t["id"].as_str().unwrap_or("");
        assert!(
            bed.containers(agent).contains_key(id),
            "task {id} has no running container on {node}"
        );
    }

    // Scale to 9 and back to 3.
    bed.ok(&["scale", "web", "9"])?;
    wait(
        "3/3/3",
        || Ok(counts(&bed.running("web")?) == vec![3, 3, 3]),
    )?;
    bed.ok(&["scale", "web", "3"])?;
    wait("1/1/1 and only 3 containers", || {
        let total: usize = (0..AGENTS).map(|i| bed.containers(i).len()).sum();
        Ok(counts(&bed.running("web")?) == vec![1, 1, 1] && total == 3)
    })?;

    // Rolling update (maxSurge 1, maxUnavailable 0): at least 3 running at every sample, while
    // the controller leader is killed halfway.
    let updated = bed.manifest("web", &new, 3, "64Mi")?;
    bed.apply(&updated)?;
    let mut killed = None;
    let deadline = Instant::now() + WAIT;
    loop {
        let tasks = bed.tasks("web").unwrap_or_default();
        let live = |image: &str| {
            tasks
                .iter()
                .filter(|t| {
                    t["desired_state"] == DESIRED_RUNNING && t["status"]["state"] == RUNNING
                })
                .filter(|t| t["spec"]["image"] == image)
                .count()
        };
        let (o, n) = (live(&old), live(&new));
        if !tasks.is_empty() {
            assert!(
                o + n >= 3,
                "availability dropped during the rollout: {o} old + {n} new"
            );
        }
        if n >= 1 && killed.is_none() {
            let leader = bed.leader()?;
            if let Some(mut c) = bed.controllers[leader].take() {
                c.kill()?;
            }
            killed = Some(leader);
        }
        if n == 3 && o == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not finish: {o} old, {n} new"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    bed.ok(&["rollout", "status", "web", "--timeout", "30s"])?;
    if let Some(i) = killed {
        let c = bed.spawn_controller(i)?;
        bed.controllers[i] = Some(c);
    }

    // kill -9 an agent that runs a task (the rollout's surge may have left one without):
    // its task moves to the others; its stale container stops when it is back.
    let victim = agent_running(bed, "web")?;
    let victim_node = format!("a{victim}");
    if let Some(mut a) = bed.agents[victim].take() {
        a.kill()?;
    }
    wait("the killed agent's task replaced", || {
        let r = bed.running("web")?;
        Ok(!r.contains_key(&victim_node) && r.values().sum::<usize>() == 3)
    })?;
    assert!(
        bed.tasks("web")?
            .iter()
            .any(|t| t["status"]["state"] == LOST && t["node"] == victim_node.as_str()),
        "the task on {victim_node} is marked lost"
    );
    let stale = bed.containers(victim);
    assert!(
        !stale.is_empty(),
        "{victim_node}'s containers keep running without their agent"
    );
    let a = bed.spawn_agent(victim)?;
    bed.agents[victim] = Some(a);
    wait("the killed agent's stale container stopped", || {
        Ok(bed.containers(victim).is_empty())
    })?;

    // Cut an agent that runs a task off the network: the same.
    let cut = agent_running(bed, "web")?;
    let cut_node = format!("a{cut}");
    assert!(!bed.containers(cut).is_empty());
    bed.net.cut(bed.agent_host(cut))?;
    wait("the cut agent's tasks replaced", || {
        let r = bed.running("web")?;
        Ok(!r.contains_key(&cut_node) && r.values().sum::<usize>() == 3)
    })?;
    // Cut off, the node keeps running what it had: no controller told it otherwise.
    assert!(
        !bed.containers(cut).is_empty(),
        "{cut_node} keeps its containers while no controller is reachable"
    );
    bed.net.heal(bed.agent_host(cut))?;
    wait("the cut agent's stale containers stopped", || {
        Ok(bed.containers(cut).is_empty())
    })?;

    // An agent restart keeps its containers (same PIDs).
    let restarted = agent_running(bed, "web")?;
    let before = bed.containers(restarted);
    if let Some(mut a) = bed.agents[restarted].take() {
        a.stop(Duration::from_secs(10))?;
    }
    let a = bed.spawn_agent(restarted)?;
    bed.agents[restarted] = Some(a);
    wait("the restarted agent registered again", || {
        let out = bed.ok(&["get", "nodes", "-o", "json"])?;
        Ok(out.matches("\"state\": 1").count() == AGENTS)
    })?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        bed.containers(restarted),
        before,
        "a restarted agent keeps its containers"
    );
    wait("3 running", || {
        Ok(bed.running("web")?.values().sum::<usize>() == 3)
    })?;

    // Fits nowhere: pending with the reason.
    let huge = bed.manifest("huge", &old, 1, "1Ti")?;
    bed.apply(&huge)?;
    wait("a pending reason", || {
        let out = bed.ok(&["describe", "service", "huge"])?;
        Ok(out.contains("0/3 nodes available: 3 insufficient memory"))
    })?;

    // Delete removes every container.
    bed.ok(&["delete", "service", "web"])?;
    bed.ok(&["delete", "service", "huge"])?;
    wait("no containers left", || {
        Ok((0..AGENTS).all(|i| bed.containers(i).is_empty()) && bed.tasks("web")?.is_empty())
    })?;
    Ok(())
}
