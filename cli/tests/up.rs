//! `tug up`, the quick start's cluster: one process with a controller and this machine's agent,
//! on a test host (a network namespace) so its bridge and NAT rules stay off the machine's own.
//! Runs the quick-start manifest (manifests/hello.yaml, its image served by a test registry),
//! follows the rollout until both replicas are healthy, runs a command in one, restarts `tug up`
//! (the containers keep running, same PIDs), and deletes the service (no container left).

use std::collections::HashMap;
use std::error::Error;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tug_e2e::process::{self, ChildGuard};
use tug_e2e::{Netns, Registry, RegistryOptions, TestImages, TestNet};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

const TUG: &str = env!("CARGO_BIN_EXE_tug");
const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/hello.yaml");
const WAIT: Duration = Duration::from_secs(60);

struct Up {
    /// The test host `tug up` runs on: a network namespace of its own, so its bridge, routes and
    /// NAT rules never touch the machine's.
    ns: Arc<Netns>,
    dir: tempfile::TempDir,
    registry: String,
    controller: String,
    agent: String,
    process: Option<ChildGuard>,
}

impl Up {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start(&mut self) -> TestResult {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("up.log"))?;
        // Only the network is the host's (setns): the agent needs the machine's cgroups.
        let mut cmd = self.ns.enter_command(TUG)?;
        cmd.env("RUST_LOG", "info")
            .arg("--data-dir")
            .arg(self.data())
            .args(["--insecure-registry", &self.registry])
            .args(["up", "--listen", &self.controller])
            .args(["--agent-listen", &self.agent, "--name", "up-test"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.process = Some(process::spawn(&mut cmd)?);
        Ok(())
    }

    fn tug(&self, args: &[&str]) -> TestResult<Output> {
        Ok(self
            .ns
            .command(TUG)
            .env_remove("TUG_CONTROLLER")
            .arg("--data-dir")
            .arg(self.data())
            .args(["--controller", &self.controller])
            .args(args)
            .output()?)
    }

    fn ok(&self, args: &[&str]) -> TestResult<String> {
        let out = self.tug(args)?;
        if !out.status.success() {
            return Err(format!(
                "tug {args:?}: {}{}\n--- up.log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Running containers of this machine's agent: id -> pid.
    fn containers(&self) -> HashMap<String, i64> {
        tug_e2e::cluster::running_containers(&self.data())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.stop(Duration::from_secs(5));
        }
        // A failed test may leave containers: remove them with the CLI.
        if let Ok(entries) = std::fs::read_dir(self.data().join("containers")) {
            for entry in entries.flatten() {
                let _ = Command::new(TUG)
                    .arg("--data-dir")
                    .arg(self.data())
                    .args(["rm", "-f", &entry.file_name().to_string_lossy()])
                    .output();
            }
        }
    }
}

fn wait(what: &str, check: impl FnMut() -> TestResult<bool>) -> TestResult {
    tug_e2e::cluster::wait_for(what, WAIT, check)
}

#[test]
fn up_runs_the_quick_start_manifest_and_survives_a_restart() -> TestResult {
    TestImages::get()?;
    let mut net = TestNet::new(0)?;
    net.add_host("up")?;
    let host = net.host(0);
    let registry = Registry::start_on(host, RegistryOptions::default().with_images())?;
    tug_e2e::cluster::sweep_stale("tug-up-", std::path::Path::new(TUG));
    let dir = tempfile::Builder::new().prefix("tug-up-").tempdir()?;
    tug_e2e::cluster::claim(dir.path())?;
    let mut up = Up {
        dir,
        ns: host.netns().clone(),
        registry: registry.host_port(),
        controller: "127.0.0.1:7440".into(),
        agent: "127.0.0.1:7441".into(),
        process: None,
    };
    // The quick-start manifest, pointed at this test's registry.
    let manifest = up.dir.path().join("hello.yaml");
    std::fs::write(
        &manifest,
        std::fs::read_to_string(HELLO)?.replace("127.0.0.1:5000", &up.registry),
    )?;
    let manifest = manifest.to_string_lossy().into_owned();

    up.start()?;
    wait("the node", || Ok(up.ok(&["nodes"])?.contains("up-test")))?;
    assert!(
        up.ok(&["apply", "-f", &manifest])?
            .contains("service/hello created")
    );
    let rollout = up.ok(&["rollout", "status", "hello", "--timeout", "60s"])?;
    assert!(rollout.contains("successfully rolled out"), "{rollout}");
    assert_eq!(up.containers().len(), 2);
    let served = up.ok(&["exec", "hello", "--", "cat", "/tmp/index.html"])?;
    assert!(served.starts_with("hello from "), "{served:?}");
    // Each replica has its own address on the node's bridge and serves there.
    let tasks: serde_json::Value =
        serde_json::from_str(&up.ok(&["get", "tasks", "--service", "hello", "-o", "json"])?)?;
    let addresses: Vec<String> = tasks
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter_map(|t| t["status"]["address"].as_str().map(String::from))
                .filter(|a| !a.is_empty())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(addresses.len(), 2, "{tasks}");
    for address in &addresses {
        let out = up
            .ns
            .command("busybox")
            .args(["wget", "-q", "-O", "-"])
            .arg(format!("http://{address}:8080/index.html"))
            .output()?;
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(body.starts_with("hello from "), "{address}: {body:?}");
    }
    // Logs come from the agent that runs the task.
    let echo = up.dir.path().join("echo.yaml");
    std::fs::write(
        &echo,
        std::fs::read_to_string(&manifest)?
            .replace("name: hello", "name: echo")
            .replace(
                "exec httpd -f -p 8080 -h /tmp",
                "echo logged-by-$(hostname) && exec httpd -f -p 8080 -h /tmp",
            ),
    )?;
    up.ok(&["apply", "-f", &echo.to_string_lossy()])?;
    up.ok(&["rollout", "status", "echo", "--timeout", "60s"])?;
    let logs = up.ok(&["logs", "echo"])?;
    assert_eq!(logs.matches("logged-by-").count(), 2, "{logs}");
    // -f keeps streaming from the agent: it shows what is there, then waits for more.
    let mut follow = process::spawn(
        up.ns
            .command(TUG)
            .arg("--data-dir")
            .arg(up.data())
            .args(["--controller", &up.controller, "logs", "-f", "echo"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let stdout = follow.take_stdout().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = rx.recv_timeout(WAIT)?;
    assert!(first.contains("logged-by-"), "{first}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(follow.try_wait()?.is_none(), "logs -f keeps following");
    follow.kill()?;
    up.ok(&["delete", "service", "echo"])?;
    wait("echo's containers gone", || Ok(up.containers().len() == 2))?;
    let described = up.ok(&["describe", "service", "hello"])?;
    assert!(
        described.contains("2 desired, 2 running, 2 updated and available"),
        "{described}"
    );

    // Restart: the containers keep running with the same PIDs, and stay assigned.
    let before = up.containers();
    if let Some(mut p) = up.process.take() {
        p.stop(Duration::from_secs(10))?;
    }
    assert_eq!(up.containers(), before, "containers outlive tug up");
    up.start()?;
    wait("the node again", || {
        Ok(up.ok(&["nodes"])?.contains("ready"))
    })?;
    up.ok(&["rollout", "status", "hello", "--timeout", "60s"])?;
    assert_eq!(up.containers(), before, "the restarted agent adopted them");

    up.ok(&["delete", "service", "hello"])?;
    wait("no containers", || Ok(up.containers().is_empty()))?;
    Ok(())
}
