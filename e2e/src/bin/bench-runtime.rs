//! The built-in runtime against runc and crun on the same bundle (busybox from the test image,
//! unpacked by umoci), in the same run:
//! 1. create-start-wait-delete of a container running /bin/true (`tug runtime run`, `runc run`,
//!    `crun run`), interleaved, after warm-up; median, p90, ratio; `unshare ... /bin/true` as
//!    the floor. Each timed run starts after a pause of SETTLE on a quiet machine: on cgroup v1,
//!    moving a process into a cgroup waits for an RCU grace period (5-15 ms here) unless another
//!    move happened within about one grace period before, so without the pause a contender
//!    would start with the kernel state the previous one left warm (crun after runc did).
//! 2. 200 idle containers (`sleep`) started with `tug runtime create` + `start`: time per
//!    container and each monitor's private memory (Private_Clean + Private_Dirty).
//!
//! crun refuses this hybrid-cgroup host as it is; every contender therefore runs in a private
//! mount namespace of this process where /sys/fs/cgroup/unified is unmounted.
//! Run: `e2e/bench.sh runtime [RUNS] [IDLE]`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tug_e2e::bench::{Samples, report};
use tug_e2e::bundle::{Bundle, enter_private_mount_namespace_for_crun};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The pause before each timed run (see the module's documentation).
const SETTLE: Duration = Duration::from_millis(50);

fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn run() -> Result<()> {
    // Before any thread exists: a mount namespace of our own for all contenders.
    enter_private_mount_namespace_for_crun()?;
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let idle: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let tug = std::env::current_exe()?.with_file_name("tug");
    if !tug.is_file() {
        return Err(format!("{} not found: cargo build --release -p tug", tug.display()).into());
    }
    let bundle = Bundle::busybox(&["/bin/true"], "/tug-bench/true")?;
    let b = bundle.path();
    let (data, runc_root, crun_root) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );

    let mut ours = Samples::new("tug runtime run");
    let mut runc = Samples::new("runc run");
    let mut crun = Samples::new("crun run");
    let mut floor = Samples::new("floor: unshare -pfmnui /bin/true");
    let tug_run = |id: String| -> Result<()> {
        quiet(
            Command::new(&tug)
                .arg("--data-dir")
                .arg(data.path())
                .args(["runtime", "run", &id, "--bundle"])
                .arg(&b),
        )
    };
    let runc_run = |id: String| {
        quiet(
            Command::new("runc")
                .arg("--root")
                .arg(runc_root.path())
                .args(["run", "--bundle"])
                .arg(&b)
                .arg(id),
        )
    };
    let crun_run = |id: String| {
        quiet(
            Command::new("crun")
                .arg("--root")
                .arg(crun_root.path())
                .args(["run", "--bundle"])
                .arg(&b)
                .arg(id),
        )
    };
    let unshare = || {
        quiet(Command::new("unshare").args([
            "-p",
            "-f",
            "-m",
            "-n",
            "-u",
            "-i",
            "--mount-proc",
            "/bin/true",
        ]))
    };
    for i in 0..3 {
        tug_run(format!("w{i}"))?;
        runc_run(format!("w{i}"))?;
        crun_run(format!("w{i}"))?;
    }
    for i in 0..runs {
        std::thread::sleep(SETTLE);
        ours.time(|| tug_run(format!("t{i}")))?;
        std::thread::sleep(SETTLE);
        runc.time(|| runc_run(format!("r{i}")))?;
        std::thread::sleep(SETTLE);
        crun.time(|| crun_run(format!("c{i}")))?;
        std::thread::sleep(SETTLE);
        floor.time(unshare)?;
    }
    println!(
        "{}",
        report(
            &format!(
                "create + start + wait + delete of /bin/true, same bundle, each run after {} ms \
                 of quiet (lower is better)",
                SETTLE.as_millis()
            ),
            &[ours.clone(), runc.clone(), crun.clone(), floor]
        )
    );
    println!(
        "tug / crun median: {:.2}x, tug / runc median: {:.2}x\n",
        ours.median().as_secs_f64() / crun.median().as_secs_f64(),
        ours.median().as_secs_f64() / runc.median().as_secs_f64()
    );

    let idled = if idle > 0 {
        idle_containers(&tug, data.path(), idle)
    } else {
        Ok(())
    };
    remove_bench_cgroups();
    idled
}

/// runc and crun remove their containers' cgroups but not the parents made for the bundle's
/// cgroupsPath (/tug-bench/...): remove those, deepest first.
fn remove_bench_cgroups() {
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for c in controllers.flatten() {
        let parent = c.path().join("tug-bench");
        if let Ok(children) = std::fs::read_dir(&parent) {
            for child in children.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(child.path());
            }
        }
        let _ = std::fs::remove_dir(&parent);
    }
}

/// Start `n` sleeping containers, report time and monitor memory, remove them.
fn idle_containers(tug: &Path, data: &Path, n: usize) -> Result<()> {
    let bundle = Bundle::busybox(&["/bin/sleep", "3600"], "")?;
    let b: PathBuf = bundle.path();
    let tug_cmd = |args: &[&str]| -> Result<()> {
        quiet(Command::new(tug).arg("--data-dir").arg(data).args(args))
    };
    let start = Instant::now();
    let mut ids = Vec::new();
    let mut failure = None;
    for i in 0..n {
        let id = format!("idle{i}");
        let created = tug_cmd(&["runtime", "create", &id, "--bundle", &b.to_string_lossy()])
            .and_then(|()| tug_cmd(&["runtime", "start", &id]));
        ids.push(id);
        if let Err(e) = created {
            failure = Some(e);
            break;
        }
    }
    let elapsed = start.elapsed();
    let mut private_kb = Vec::new();
    let mut rss_kb = Vec::new();
    for id in &ids {
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(
            data.join("containers").join(id).join("state.json"),
        )?)?;
        if let Some(pid) = state["monitor_pid"].as_i64() {
            let rollup =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            let field = |name: &str| -> u64 {
                rollup
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            private_kb.push(field("Private_Clean:") + field("Private_Dirty:"));
            rss_kb.push(field("Rss:"));
        }
    }
    for id in &ids {
        let _ = tug_cmd(&["runtime", "delete", "--force", id]);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    private_kb.sort_unstable();
    let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    println!("{n} idle containers (sleep) with tug runtime create + start");
    println!(
        "  total {:.2} s, {:.1} ms per container",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e3 / n as f64
    );
    println!(
        "  monitor private memory: mean {:.0} KiB, median {} KiB, max {} KiB (RSS incl. shared pages: mean {:.0} KiB); target < 1024 KiB",
        avg(&private_kb),
        private_kb.get(private_kb.len() / 2).copied().unwrap_or(0),
        private_kb.last().copied().unwrap_or(0),
        avg(&rss_kb)
    );
    Ok(())
}
