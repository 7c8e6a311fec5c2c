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

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tug_e2e::process::{self, ChildGuard};
use tug_e2e::{Host, Registry, RegistryOptions, TestImages, TestNet};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

const WAIT: Duration = Duration::from_secs(60);
/// TaskState / DesiredState numbers as the JSON output has them (see objects.proto).
const RUNNING: i64 = 5;
const LOST: i64 = 8;
const DESIRED_RUNNING: i64 = 1;

const TUG: &str = env!("CARGO_BIN_EXE_tug");

struct Bed {
    net: TestNet,
    base: tempfile::TempDir,
    registry: Registry,
    controllers: Vec<Option<ChildGuard>>,
    agents: Vec<Option<ChildGuard>>,
}

const CONTROLLERS: usize = 3;
const AGENTS: usize = 3;

impl Bed {
    fn start() -> TestResult<Bed> {
        // Hosts: c0..c2, a0..a2, registry, client.
        let mut net = TestNet::new(0)?;
        for i in 0..CONTROLLERS {
            net.add_host(&format!("c{i}"))?;
        }
        for i in 0..AGENTS {
            net.add_host(&format!("a{i}"))?;
        }
        net.add_host("reg")?;
        net.add_host("cli")?;
        let registry = Registry::start_on(
            net.host(CONTROLLERS + AGENTS),
            RegistryOptions::default().with_images(),
        )?;
        let base = tempfile::Builder::new()
            .prefix("tug-orchestrate-")
            .tempdir()?;
        let mut bed = Bed {
            net,
            base,
            registry,
            controllers: Vec::new(),
            agents: Vec::new(),
        };
        for i in 0..CONTROLLERS {
            let c = bed.spawn_controller(i)?;
            bed.controllers.push(Some(c));
        }
        for i in 0..AGENTS {
            let a = bed.spawn_agent(i)?;
            bed.agents.push(Some(a));
        }
        Ok(bed)
    }

    fn controller_host(&self, i: usize) -> &Host {
        self.net.host(i)
    }

    fn agent_host(&self, i: usize) -> &Host {
        self.net.host(CONTROLLERS + i)
    }

    fn client_host(&self) -> &Host {
        self.net.host(CONTROLLERS + AGENTS + 1)
    }

    fn controller_addr(&self, i: usize) -> String {
        format!("{}:7440", self.controller_host(i).addr())
    }

    fn all_controllers(&self) -> String {
        (0..CONTROLLERS)
            .map(|i| self.controller_addr(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn agent_dir(&self, i: usize) -> PathBuf {
        self.base.path().join(format!("a{i}"))
    }

    fn log(&self, name: &str) -> TestResult<std::fs::File> {
        Ok(std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.base.path().join(format!("{name}.log")))?)
    }

    fn spawn_controller(&self, i: usize) -> TestResult<ChildGuard> {
        let peers: Vec<String> = (0..CONTROLLERS)
            .map(|k| format!("{}={}", k + 1, self.controller_addr(k)))
            .collect();
        let log = self.log(&format!("c{i}"))?;
        let mut cmd = self.controller_host(i).command(TUG);
        cmd.env("RUST_LOG", "info")
            .arg("--data-dir")
            .arg(self.base.path().join(format!("c{i}")))
            .args(["controller", "--id", &(i + 1).to_string()])
            .args(["--listen", &self.controller_addr(i)])
            .args(["--peers", &peers.join(",")])
            .args(["--heartbeat-period", "500ms"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(process::spawn(&mut cmd)?)
    }

    fn spawn_agent(&self, i: usize) -> TestResult<ChildGuard> {
        let log = self.log(&format!("a{i}"))?;
        let host = self.agent_host(i);
        // Not `ip netns exec`: that remounts /sys, hiding the cgroup hierarchies.
        let mut cmd = host.enter_command(TUG)?;
        cmd.env("RUST_LOG", "info")
            .arg("--data-dir")
            .arg(self.agent_dir(i))
            .args(["--insecure-registry", &self.registry.host_port()])
            .args(["agent", "--join", &self.all_controllers()])
            .args(["--name", &format!("a{i}")])
            .args(["--labels", &format!("zone=z{i}")])
            .args(["--listen", &format!("{}:7441", host.addr())])
            .args(["--cpus", "4", "--memory", "4Gi"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(process::spawn(&mut cmd)?)
    }

    /// `tug --controller ALL ARGS` on the client host.
    fn tug(&self, args: &[&str]) -> TestResult<Output> {
        Ok(self
            .client_host()
            .command(TUG)
            .env_remove("TUG_CONTROLLER")
            .args(["--controller", &self.all_controllers()])
            .args(args)
            .output()?)
    }

    fn ok(&self, args: &[&str]) -> TestResult<String> {
        let out = self.tug(args)?;
        if !out.status.success() {
            return Err(format!(
                "tug {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn tasks(&self, service: &str) -> TestResult<Vec<Value>> {
        let out = self.ok(&["get", "tasks", "--service", service, "-o", "json"])?;
        match serde_json::from_str::<Value>(&out)? {
            Value::Array(tasks) => Ok(tasks),
            other => Err(format!("tasks are not a list: {other}").into()),
        }
    }

    /// Running (and wanted) tasks of `service` per agent, as the controller reports them.
    fn running(&self, service: &str) -> TestResult<BTreeMap<String, usize>> {
        let mut out = BTreeMap::new();
        for t in self.tasks(service)? {
            if t["desired_state"] == DESIRED_RUNNING && t["status"]["state"] == RUNNING {
                *out.entry(t["node"].as_str().unwrap_or("").to_string())
                    .or_default() += 1;
            }
        }
        Ok(out)
    }

    /// Containers that really run on agent `i`: id -> pid (the state file names a live pid).
    fn containers(&self, i: usize) -> HashMap<String, i64> {
        let mut out = HashMap::new();
        let Ok(entries) = std::fs::read_dir(self.agent_dir(i).join("containers")) else {
            return out;
        };
        for entry in entries.flatten() {
            let state = entry.path().join("state.json");
            let Ok(text) = std::fs::read_to_string(&state) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let pid = v["pid"].as_i64().unwrap_or(0);
            let running = v["status"] == "running";
            if running && pid > 0 && Path::new(&format!("/proc/{pid}")).exists() {
                out.insert(entry.file_name().to_string_lossy().into_owned(), pid);
            }
        }
        out
    }

    fn leader(&self) -> TestResult<usize> {
        let out = self.ok(&["cluster", "status"])?;
        for line in out.lines() {
            if line.contains("leader") {
                let id: usize = line.split_whitespace().next().unwrap_or("0").parse()?;
                return Ok(id - 1);
            }
        }
        Err(format!("no leader in:\n{out}").into())
    }

    fn manifest(
        &self,
        name: &str,
        image: &str,
        replicas: u32,
        memory: &str,
    ) -> TestResult<PathBuf> {
        let path = self.base.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: tug.dev/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  replicas: {replicas}\n  command: [\"/bin/sleep\", \"3600\"]\n  resources:\n    cpu: 100m\n    memory: {memory}\n  stopGracePeriod: 2s\n  update:\n    maxSurge: 1\n    maxUnavailable: 0\n",
            ),
        )?;
        Ok(path)
    }

    fn apply(&self, path: &Path) -> TestResult<String> {
        self.ok(&["apply", "-f", &path.to_string_lossy()])
    }

    /// The tail of every process log, for a failed test.
    fn dump_logs(&self) {
        if let Ok(out) = self.tug(&["get", "tasks", "-o", "wide"]) {
            eprintln!(
                "--- tasks\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Ok(out) = self.tug(&["nodes"]) {
            eprintln!(
                "--- nodes\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let Ok(entries) = std::fs::read_dir(self.base.path()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!("--- {}\n{}", path.display(), tail.join("\n"));
            }
        }
    }

    /// Removes whatever containers the agents left (a failed test), by their own CLI.
    fn sweep(&self) {
        for i in 0..AGENTS {
            let dir = self.agent_dir(i);
            let Ok(entries) = std::fs::read_dir(dir.join("containers")) else {
                continue;
            };
            for entry in entries.flatten() {
                let _ = Command::new(TUG)
                    .arg("--data-dir")
                    .arg(&dir)
                    .args(["rm", "-f", &entry.file_name().to_string_lossy()])
                    .output();
            }
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for agent in self.agents.iter_mut() {
            if let Some(mut a) = agent.take() {
                let _ = a.stop(Duration::from_secs(5));
            }
        }
        self.sweep();
        for c in self.controllers.iter_mut() {
            if let Some(mut c) = c.take() {
                let _ = c.stop(Duration::from_secs(5));
            }
        }
    }
}

fn wait(what: &str, mut check: impl FnMut() -> TestResult<bool>) -> TestResult {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(err) => last = err.to_string(),
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what} (last error: {last})").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn counts(map: &BTreeMap<String, usize>) -> Vec<usize> {
    (0..AGENTS)
        .map(|i| map.get(&format!("a{i}")).copied().unwrap_or(0))
        .collect()
}

#[test]
fn apply_scale_roll_lose_nodes_restart_and_delete() -> TestResult {
    let images = TestImages::get()?;
    let mut bed = Bed::start()?;
    let result = scenario(&mut bed, images);
    if result.is_err() {
        bed.dump_logs();
    }
    result
}

fn scenario(bed: &mut Bed, images: &TestImages) -> TestResult {
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

    // kill -9 an agent: its task moves to the others; its stale container stops when it is back.
    if let Some(mut a) = bed.agents[2].take() {
        a.kill()?;
    }
    wait("a2's task replaced", || {
        let r = bed.running("web")?;
        Ok(!r.contains_key("a2") && r.values().sum::<usize>() == 3)
    })?;
    assert!(
        bed.tasks("web")?
            .iter()
            .any(|t| t["status"]["state"] == LOST),
        "the task on a2 is marked lost"
    );
    let stale = bed.containers(2);
    assert!(
        !stale.is_empty(),
        "a2's containers keep running without their agent"
    );
    let a = bed.spawn_agent(2)?;
    bed.agents[2] = Some(a);
    wait("a2's stale container stopped", || {
        Ok(bed.containers(2).is_empty())
    })?;

    // Cut an agent off the network: the same.
    let (on_a1, _) = (bed.containers(1).len(), ());
    assert!(on_a1 >= 1);
    bed.net.cut(bed.agent_host(1))?;
    wait("a1's tasks replaced", || {
        let r = bed.running("web")?;
        Ok(!r.contains_key("a1") && r.values().sum::<usize>() == 3)
    })?;
    bed.net.heal(bed.agent_host(1))?;
    wait("a1's stale containers stopped", || {
        Ok(bed.containers(1).is_empty())
    })?;

    // An agent restart keeps its containers (same PIDs).
    wait("a0 runs something", || Ok(!bed.containers(0).is_empty()))?;
    let before = bed.containers(0);
    if let Some(mut a) = bed.agents[0].take() {
        a.stop(Duration::from_secs(10))?;
    }
    let a = bed.spawn_agent(0)?;
    bed.agents[0] = Some(a);
    wait("a0 registered again", || {
        let out = bed.ok(&["get", "nodes", "-o", "json"])?;
        Ok(out.matches("\"state\": 1").count() == AGENTS)
    })?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        bed.containers(0),
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
