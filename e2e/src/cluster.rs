//! A whole tug cluster on the test bed: controller hosts and agent hosts (network namespaces),
//! Debian's registry with the test images on a host of its own, and a client host that runs the
//! `tug` CLI. Every process is started here and stopped by PID; every container the agents made
//! is removed when the cluster is dropped, also when a test fails. Used by the end-to-end
//! orchestration test and the startup-latency benchmark.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::net::{Host, TestNet};
use crate::process::{self, ChildGuard};
use crate::registry::{Registry, RegistryOptions};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// TaskState / DesiredState numbers as `tug get tasks -o json` prints them (objects.proto).
pub const RUNNING: i64 = 5;
pub const LOST: i64 = 8;
pub const DESIRED_RUNNING: i64 = 1;

pub const CONTROLLERS: usize = 3;
pub const AGENTS: usize = 3;

#[derive(Debug)]
pub struct Cluster {
    tug: PathBuf,
    heartbeat: String,
    /// Extra flags for every `tug agent` (e.g. `--network-mode vxlan`).
    agent_args: Vec<String>,
    pub net: TestNet,
    base: tempfile::TempDir,
    pub registry: Registry,
    pub controllers: Vec<Option<ChildGuard>>,
    pub agents: Vec<Option<ChildGuard>>,
}

impl Cluster {
    /// Starts the hosts, the registry (with the test images), the controllers and the agents.
    /// `tug` is the binary to run; agents heartbeat every `heartbeat` (e.g. `500ms`).
    pub fn start(tug: &Path, heartbeat: &str) -> Result<Cluster> {
        Cluster::start_with(tug, heartbeat, &[])
    }

    /// [`Cluster::start`], passing `agent_args` to every agent.
    pub fn start_with(tug: &Path, heartbeat: &str, agent_args: &[&str]) -> Result<Cluster> {
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
        sweep_stale("tug-orchestrate-", tug);
        let base = tempfile::Builder::new()
            .prefix("tug-orchestrate-")
            .tempdir()?;
        claim(base.path())?;
        let mut bed = Cluster {
            tug: tug.to_path_buf(),
            heartbeat: heartbeat.to_string(),
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
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

    pub fn controller_host(&self, i: usize) -> &Host {
        self.net.host(i)
    }

    pub fn agent_host(&self, i: usize) -> &Host {
        self.net.host(CONTROLLERS + i)
    }

    pub fn client_host(&self) -> &Host {
        self.net.host(CONTROLLERS + AGENTS + 1)
    }

    pub fn controller_addr(&self, i: usize) -> String {
        format!("{}:7440", self.controller_host(i).addr())
    }

    pub fn all_controllers(&self) -> String {
        (0..CONTROLLERS)
            .map(|i| self.controller_addr(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where the test bed keeps its files (data dirs, logs, manifests).
    pub fn base_dir(&self) -> &Path {
        self.base.path()
    }

    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.base.path().join(format!("a{i}"))
    }

    fn log(&self, name: &str) -> Result<std::fs::File> {
        Ok(std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.base.path().join(format!("{name}.log")))?)
    }

    pub fn spawn_controller(&self, i: usize) -> Result<ChildGuard> {
        let peers: Vec<String> = (0..CONTROLLERS)
            .map(|k| format!("{}={}", k + 1, self.controller_addr(k)))
            .collect();
        let log = self.log(&format!("c{i}"))?;
        let mut cmd = self.controller_host(i).command(&self.tug);
        cmd.env("RUST_LOG", "info")
            .arg("--data-dir")
            .arg(self.base.path().join(format!("c{i}")))
            .args(["controller", "--id", &(i + 1).to_string()])
            .args(["--listen", &self.controller_addr(i)])
            .args(["--peers", &peers.join(",")])
            .args(["--heartbeat-period", &self.heartbeat])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(process::spawn(&mut cmd)?)
    }

    pub fn spawn_agent(&self, i: usize) -> Result<ChildGuard> {
        self.spawn_agent_with(i, &[])
    }

    /// [`Cluster::spawn_agent`] with `extra` arguments after the cluster's own.
    pub fn spawn_agent_with(&self, i: usize, extra: &[&str]) -> Result<ChildGuard> {
        let log = self.log(&format!("a{i}"))?;
        let host = self.agent_host(i);
        // Not `ip netns exec`: that remounts /sys, hiding the cgroup hierarchies.
        let mut cmd = host.enter_command(&self.tug)?;
        cmd.env("RUST_LOG", "info")
            .arg("--data-dir")
            .arg(self.agent_dir(i))
            .args(["--insecure-registry", &self.registry.host_port()])
            .args(["agent", "--join", &self.all_controllers()])
            .args(["--name", &format!("a{i}")])
            .args(["--labels", &format!("zone=z{i}")])
            .args(["--listen", &format!("{}:7441", host.addr())])
            .args(["--cpus", "4", "--memory", "4Gi"])
            .args(&self.agent_args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(process::spawn(&mut cmd)?)
    }

    /// `tug --controller ALL ARGS` on the client host.
    pub fn tug(&self, args: &[&str]) -> Result<Output> {
        Ok(self
            .client_host()
            .command(&self.tug)
            .env_remove("TUG_CONTROLLER")
            .args(["--controller", &self.all_controllers()])
            .args(args)
            .output()?)
    }

    pub fn ok(&self, args: &[&str]) -> Result<String> {
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

    pub fn tasks(&self, service: &str) -> Result<Vec<Value>> {
        let out = self.ok(&["get", "tasks", "--service", service, "-o", "json"])?;
        match serde_json::from_str::<Value>(&out)? {
            Value::Array(tasks) => Ok(tasks),
            other => Err(format!("tasks are not a list: {other}").into()),
        }
    }

    /// Running (and wanted) tasks of `service` per agent, as the controller reports them.
    pub fn running(&self, service: &str) -> Result<BTreeMap<String, usize>> {
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
    pub fn containers(&self, i: usize) -> HashMap<String, i64> {
        running_containers(&self.agent_dir(i))
    }

    pub fn leader(&self) -> Result<usize> {
        let out = self.ok(&["cluster", "status"])?;
        for line in out.lines() {
            if line.contains("leader") {
                let id: usize = line.split_whitespace().next().unwrap_or("0").parse()?;
                return Ok(id - 1);
            }
        }
        Err(format!("no leader in:\n{out}").into())
    }

    pub fn manifest(
        &self,
        name: &str,
        image: &str,
        replicas: u32,
        memory: &str,
    ) -> Result<PathBuf> {
        let path = self.base.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: tug.dev/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  replicas: {replicas}\n  command: [\"/bin/sleep\", \"3600\"]\n  resources:\n    cpu: 100m\n    memory: {memory}\n  stopGracePeriod: 2s\n  update:\n    maxSurge: 1\n    maxUnavailable: 0\n",
            ),
        )?;
        Ok(path)
    }

    pub fn apply(&self, path: &Path) -> Result<String> {
        self.ok(&["apply", "-f", &path.to_string_lossy()])
    }

    /// The tail of every process log, for a failed test.
    pub fn dump_logs(&self) {
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
    pub fn sweep(&self) {
        for i in 0..AGENTS {
            let dir = self.agent_dir(i);
            let Ok(entries) = std::fs::read_dir(dir.join("containers")) else {
                continue;
            };
            for entry in entries.flatten() {
                let _ = Command::new(&self.tug)
                    .arg("--data-dir")
                    .arg(&dir)
                    .args(["rm", "-f", &entry.file_name().to_string_lossy()])
                    .output();
            }
        }
    }
}

impl Drop for Cluster {
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

/// The containers that really run under an agent's data dir: id -> pid (its state file says
/// running and names a live pid).
pub fn running_containers(data_dir: &Path) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(data_dir.join("containers")) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("state.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let pid = v["pid"].as_i64().unwrap_or(0);
        if v["status"] == "running" && pid > 0 && Path::new(&format!("/proc/{pid}")).exists() {
            out.insert(entry.file_name().to_string_lossy().into_owned(), pid);
        }
    }
    out
}

/// Polls `check` every 200 ms until it says true; an error from it counts as "not yet" (and is
/// reported if time runs out).
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(err) => last = err.to_string(),
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what} (last error: {last})").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Marks `dir` as owned by this process, for [`sweep_stale`].
pub fn claim(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
    Ok(())
}

/// Removes what test processes that were killed left in the temp dir under `prefix`: the
/// containers of every data dir (with `tug rm -f`, by their recorded PIDs), then the dir. A dir
/// whose owner still runs, or that has no owner file, is left alone.
pub fn sweep_stale(prefix: &str, tug: &Path) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(dir.join("owner.pid")) else {
            continue;
        };
        let alive = owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if alive {
            continue;
        }
        for data in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let data = data.path();
            for c in std::fs::read_dir(data.join("containers"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let _ = Command::new(tug)
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["rm", "-f", &c.file_name().to_string_lossy()])
                    .output();
            }
        }
        tracing::warn!(dir = %dir.display(), "removing what a killed test left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
