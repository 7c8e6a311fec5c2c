//! Three `tug controller` processes on loopback, driven by the `tug` client: apply the example
//! manifests, read them from every replica, reject an invalid manifest, kill -9 the leader while
//! a client keeps writing (no acknowledged write may be lost), and restart the killed replica
//! (it catches up). Every process started here is killed by PID, also when the test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

const WAIT: Duration = Duration::from_secs(30);
const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests");

fn tug() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tug"));
    cmd.env_remove("TUG_CONTROLLER").env_remove("TUG_DATA_DIR");
    cmd
}

/// `tug --controller ADDRS ARGS...`.
fn client(addrs: &str, args: &[&str]) -> TestResult<Output> {
    Ok(tug().arg("--controller").arg(addrs).args(args).output()?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A controller process; killed (SIGKILL) and reaped when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    base: PathBuf,
    ports: BTreeMap<u64, u16>,
    procs: BTreeMap<u64, Proc>,
}

fn free_port() -> TestResult<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl Cluster {
    /// Starts three replicas on free loopback ports; if one cannot bind (the port was taken in
    /// the meantime), starts over once with new ports.
    fn start(base: &Path) -> TestResult<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut ports = BTreeMap::new();
            for id in 1..=3 {
                ports.insert(id, free_port()?);
            }
            let mut cluster = Self {
                base: base.to_path_buf(),
                ports,
                procs: BTreeMap::new(),
            };
            for id in 1..=3 {
                cluster.spawn(id)?;
            }
            thread::sleep(Duration::from_millis(500));
            let mut exited = false;
            for proc in cluster.procs.values_mut() {
                exited |= proc.child.try_wait()?.is_some();
            }
            if !exited {
                return Ok(cluster);
            }
            if attempt >= 2 {
                return Err(format!(
                    "a controller exited right after starting:\n{}",
                    cluster.logs()
                )
                .into());
            }
        }
    }

    fn addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.ports.get(&id).copied().unwrap_or(0))
    }

    fn all(&self) -> String {
        self.ports
            .keys()
            .map(|id| self.addr(*id))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.base.join(format!("controller-{id}.log"))
    }

    /// Starts replica `id` with its data dir (kept across restarts).
    fn spawn(&mut self, id: u64) -> TestResult {
        let peers: Vec<String> = self
            .ports
            .keys()
            .map(|p| format!("{p}={}", self.addr(*p)))
            .collect();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(id))?;
        let child = tug()
            .env("RUST_LOG", "info")
            .args(["controller", "--id", &id.to_string()])
            .arg("--data-dir")
            .arg(self.base.join(format!("node-{id}")))
            .args(["--listen", &self.addr(id)])
            .args(["--peers", &peers.join(",")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.procs.insert(id, Proc { child });
        Ok(())
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for id in self.ports.keys() {
            let log = fs::read_to_string(self.log_path(*id)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            out.push_str(&format!("--- controller {id} (last lines)\n"));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The leader as reported by `tug cluster status` through `addrs`.
    fn leader(&self, addrs: &str) -> TestResult<u64> {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = client(addrs, &["cluster", "status"])?;
            let stdout = text(&out.stdout);
            let leader = stdout
                .lines()
                .find_map(|l| l.strip_prefix("leader: "))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|id| id.parse::<u64>().ok());
            if out.status.success()
                && let Some(id) = leader
            {
                return Ok(id);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no leader within {WAIT:?}: {stdout}{}\n{}",
                    text(&out.stderr),
                    self.logs()
                )
                .into());
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Service names (namespace/name) as `tug get services -o json` on `addr` reports them.
fn names(addr: &str, stale: bool) -> TestResult<BTreeSet<String>> {
    let mut args = vec!["get", "services", "-o", "json"];
    if stale {
        args.push("--stale");
    }
    let out = client(addr, &args)?;
    if !out.status.success() {
        return Err(format!("get services on {addr} failed: {}", text(&out.stderr)).into());
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(service_names(&json))
}

/// `namespace/name` of every service in a `get services -o json` answer.
fn service_names(json: &serde_json::Value) -> BTreeSet<String> {
    json.get("services")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let meta = s.get("metadata")?;
            Some(format!(
                "{}/{}",
                meta.get("namespace")?.as_str()?,
                meta.get("name")?.as_str()?
            ))
        })
        .collect()
}

fn numbered_manifest(dir: &Path, i: usize) -> TestResult<PathBuf> {
    let path = dir.join(format!("load-{i}.yaml"));
    fs::write(
        &path,
        format!(
            "apiVersion: tug.dev/v1\nkind: Service\nmetadata:\n  name: load-{i}\nspec:\n  \
             image: busybox\n  replicas: 1\n"
        ),
    )?;
    Ok(path)
}

#[test]
fn three_controller_processes_survive_kill_9_of_the_leader() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path())?;
    let all = cluster.all();
    cluster.leader(&all)?;

    // Apply the example manifests through any replica.
    let out = client(&all, &["apply", "-f", MANIFESTS])?;
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        cluster.logs()
    );
    let stdout = text(&out.stdout);
    for line in [
        "service/hello created",
        "service/web created",
        "service/worker created",
        "service/migrate created",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in {stdout}");
    }
    let expected: BTreeSet<String> = [
        "default/hello",
        "default/migrate",
        "default/worker",
        "shop/web",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for id in 1..=3 {
        assert_eq!(names(&cluster.addr(id), false)?, expected, "replica {id}");
    }
    let again = client(&all, &["apply", "-f", MANIFESTS])?;
    assert!(text(&again.stdout).contains("service/web unchanged"));

    // An invalid manifest is rejected with its place and changes nothing.
    let bad_dir = tempfile::tempdir()?;
    let bad = bad_dir.path().join("bad.yaml");
    fs::write(
        &bad,
        "apiVersion: tug.dev/v1\nkind: Service\nmetadata:\n  name: bad\nspec:\n  image: busybox\n  \
         replicas: -1\n",
    )?;
    let before = client(&all, &["get", "services", "-o", "json"])?;
    let out = client(&all, &["apply", "-f", &bad.display().to_string()])?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:7:13: spec.replicas", bad.display())),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    let after = client(&all, &["get", "services", "-o", "json"])?;
    let services = |o: &Output| -> TestResult<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        Ok(v.get("services").cloned().unwrap_or_default())
    };
    assert_eq!(services(&before)?, services(&after)?);

    // kill -9 the leader while a client keeps writing numbered services.
    let leader = cluster.leader(&all)?;
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let acked = acked.clone();
        let stop = stop.clone();
        let all = all.clone();
        let dir = bad_dir.path().to_path_buf();
        thread::spawn(move || -> Result<usize, String> {
            let mut attempts = 0;
            while !stop.load(Ordering::Relaxed) {
                let path = numbered_manifest(&dir, attempts).map_err(|e| e.to_string())?;
                let out = client(&all, &["apply", "-f", &path.display().to_string()])
                    .map_err(|e| e.to_string())?;
                if out.status.success() {
                    acked
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(format!("default/load-{attempts}"));
                }
                attempts += 1;
            }
            Ok(attempts)
        })
    };
    // A reader meanwhile: linearizable reads through any replica. Each read records the
    // revision it saw and the writes acknowledged before it started; reads may never go back in
    // time, and a read must see every write acknowledged before it began.
    let reader = {
        let acked = acked.clone();
        let stop = stop.clone();
        let all = all.clone();
        thread::spawn(move || -> Result<usize, String> {
            let mut last_revision = 0u64;
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let before: Vec<String> =
                    acked.lock().unwrap_or_else(PoisonError::into_inner).clone();
                let Ok(out) = client(&all, &["get", "services", "-o", "json"]) else {
                    continue;
                };
                if !out.status.success() {
                    continue; // no leader for a moment: a failed read, not a wrong one
                }
                let json: serde_json::Value =
                    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
                let revision = json.get("revision").and_then(|r| r.as_u64()).unwrap_or(0);
                if revision < last_revision {
                    return Err(format!(
                        "a read went back in time: revision {revision} after {last_revision}"
                    ));
                }
                last_revision = revision;
                let seen = service_names(&json);
                if let Some(missing) = before.iter().find(|n| !seen.contains(*n)) {
                    return Err(format!(
                        "a read at revision {revision} misses {missing}, acknowledged before it began"
                    ));
                }
                reads += 1;
            }
            Ok(reads)
        })
    };
    let count = || acked.lock().unwrap_or_else(PoisonError::into_inner).len();
    let deadline = Instant::now() + WAIT;
    while count() < 5 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    if let Some(proc) = cluster.procs.get_mut(&leader) {
        proc.kill();
    }
    let at_kill = count();
    let deadline = Instant::now() + WAIT;
    while count() < at_kill + 5 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let attempts = writer.join().map_err(|_| "the writer thread panicked")??;
    let reads = reader.join().map_err(|_| "the reader thread panicked")??;
    assert!(reads > 0, "the reader never got an answer");
    let acked: Vec<String> = acked.lock().unwrap_or_else(PoisonError::into_inner).clone();
    assert!(
        acked.len() >= at_kill + 5,
        "only {} of {attempts} writes acknowledged ({at_kill} before the kill)\n{}",
        acked.len(),
        cluster.logs()
    );

    eprintln!(
        "writes: {attempts} attempted, {} acknowledged ({at_kill} before killing leader {leader})",
        acked.len()
    );

    // Every acknowledged write is on both survivors.
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for id in &survivors {
        let have = names(&cluster.addr(*id), false)?;
        let lost: Vec<&String> = acked.iter().filter(|n| !have.contains(*n)).collect();
        assert!(
            lost.is_empty(),
            "replica {id} lost acknowledged writes {lost:?}"
        );
        assert!(expected.is_subset(&have));
    }
    let new_leader = cluster.leader(&cluster.addr(survivors[0]))?;
    assert_ne!(new_leader, leader);

    // The killed replica restarts from its data dir and catches up.
    cluster.spawn(leader)?;
    let deadline = Instant::now() + WAIT;
    loop {
        let have = names(&cluster.addr(leader), true).unwrap_or_default();
        if acked.iter().all(|n| have.contains(n)) && expected.is_subset(&have) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the restarted replica {leader} did not catch up within {WAIT:?}\n{}",
                cluster.logs()
            )
            .into());
        }
        thread::sleep(Duration::from_millis(200));
    }

    // Restart all three at once (kill -9 every process): the state is intact on each.
    for proc in cluster.procs.values_mut() {
        proc.kill();
    }
    for id in 1..=3 {
        cluster.spawn(id)?;
    }
    cluster.leader(&all)?;
    for id in 1..=3 {
        let deadline = Instant::now() + WAIT;
        loop {
            let have = names(&cluster.addr(id), false).unwrap_or_default();
            if acked.iter().all(|n| have.contains(n)) && expected.is_subset(&have) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "replica {id} lost state across a restart of all three\n{}",
                    cluster.logs()
                )
                .into());
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// One controller process for tests that need no quorum games; killed when dropped.
struct Single {
    addr: String,
    log: PathBuf,
    _proc: Proc,
}

/// Starts `tug controller --id ID --listen ADDR EXTRA...` with its own data dir under `base`.
fn start_controller(base: &Path, id: u64, port: u16, extra: &[&str]) -> TestResult<Single> {
    let addr = format!("127.0.0.1:{port}");
    let log_path = base.join(format!("controller-{id}.log"));
    let log = File::options().create(true).append(true).open(&log_path)?;
    let child = tug()
        .env("RUST_LOG", "info")
        .args(["controller", "--id", &id.to_string()])
        .arg("--data-dir")
        .arg(base.join(format!("node-{id}")))
        .args(["--listen", &addr])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(Single {
        addr,
        log: log_path,
        _proc: Proc { child },
    })
}

impl Single {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `tug cluster status` through this controller names a leader.
    fn wait_for_leader(&self) -> TestResult<u64> {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = client(&self.addr, &["cluster", "status"])?;
            let stdout = text(&out.stdout);
            let leader = stdout
                .lines()
                .find_map(|l| l.strip_prefix("leader: "))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|id| id.parse::<u64>().ok());
            if out.status.success()
                && let Some(id) = leader
            {
                return Ok(id);
            }
            if Instant::now() > deadline {
                return Err(format!("no leader within {WAIT:?}: {stdout}\n{}", self.log()).into());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn describe_service_prints_metadata_and_spec() -> TestResult {
    let dir = tempfile::tempdir()?;
    let controller = start_controller(dir.path(), 1, free_port()?, &[])?;
    controller.wait_for_leader()?;
    let out = client(&controller.addr, &["apply", "-f", MANIFESTS])?;
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = client(
        &controller.addr,
        &["describe", "service", "web", "-n", "shop"],
    )?;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for want in [
        "Name:                web",
        "Namespace:           shop",
        "Labels:              app=web, tier=front",
        "Generation:          1",
        "  Image:             127.0.0.1:5000/tug-test/busybox:oci",
        "  Replicas:          3",
        "  Command:           /bin/sh -c",
        "    MODE=production",
        "    http 8080/TCP (published on the node's port 80)",
        "  Resources:         cpu 250m, memory 64Mi",
        "    Probe:           http GET :8080/index.html",
        "    Interval:        5s",
        "  Stop grace period: 15s",
        "      role!=db",
        "    Spread:          zone",
        "    Order:           start-first",
    ] {
        assert!(
            stdout.lines().any(|l| l == want),
            "{want:?} missing from:\n{stdout}"
        );
    }
    // Tasks follow the spec (pending here: no agent runs in this test).
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("Replicas:") && l.contains("3 desired")),
        "no replica summary in:\n{stdout}"
    );
    let revision = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Revision:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or("no revision line")?;
    assert!(revision > 1, "{stdout}");

    // A missing service: one clear line, exit 1, nothing on stdout.
    let out = client(&controller.addr, &["describe", "service", "nope"])?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("service \"nope\" not found in namespace \"default\""),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    Ok(())
}

#[test]
fn controller_members_are_added_and_removed_by_the_cli() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (p1, p2) = (free_port()?, free_port()?);
    let peers = format!("1=127.0.0.1:{p1},2=127.0.0.1:{p2}");
    // Controller 1 founds a one-member cluster; it knows nothing of 2.
    let one = start_controller(dir.path(), 1, p1, &[])?;
    one.wait_for_leader()?;
    let out = client(&one.addr, &["apply", "-f", MANIFESTS])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Controller 2 starts empty and waits to be added.
    let two = start_controller(dir.path(), 2, p2, &["--peers", &peers, "--join"])?;

    let out = client(
        &one.addr,
        &[
            "controller",
            "add-member",
            "--id",
            "2",
            "--address",
            &two.addr,
        ],
    )?;
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        text(&out.stderr),
        one.log(),
        two.log()
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("controller 2 added"), "{stdout}");
    assert!(stdout.contains(&two.addr), "{stdout}");

    // It catches up: its own (stale) view holds every service.
    let deadline = Instant::now() + WAIT;
    while names(&two.addr, true).unwrap_or_default().len() < 4 {
        if Instant::now() > deadline {
            return Err(format!("controller 2 did not catch up\n{}", two.log()).into());
        }
        thread::sleep(Duration::from_millis(100));
    }

    // Removing the leader (1) hands leadership to 2 first; 2 then runs alone.
    let both = format!("{},{}", one.addr, two.addr);
    let out = client(&both, &["controller", "remove-member", "--id", "1"])?;
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        text(&out.stderr),
        one.log(),
        two.log()
    );
    assert!(text(&out.stdout).contains("controller 1 removed"));
    assert_eq!(two.wait_for_leader()?, 2);
    drop(one);
    let out = client(&two.addr, &["delete", "service", "hello"])?;
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), two.log());
    let out = client(&two.addr, &["cluster", "status"])?;
    let status = text(&out.stdout);
    assert!(
        status
            .lines()
            .any(|l| l.contains(&two.addr) && l.contains("leader")),
        "{status}"
    );
    assert!(!status.contains(&format!("127.0.0.1:{p1}")), "{status}");
    Ok(())
}
