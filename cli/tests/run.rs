//! `tug run` and `tug runtime` on images from the test bed's real registry: isolation, limits,
//! exit statuses, survival of the starter, and clean failure. Runs as root (CI does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tug_e2e::{Registry, RegistryOptions, TestImages};

type TestResult = Result<(), Box<dyn std::error::Error>>;

static SEQ: AtomicU32 = AtomicU32::new(0);

struct Bed {
    registry: Registry,
    data: tempfile::TempDir,
    image: String,
}

impl Drop for Bed {
    /// Whatever a failed test left: containers (force-deleted, which also removes their
    /// cgroups), then rootfs mounts under the data dir.
    fn drop(&mut self) {
        let containers = self.data.path().join("containers");
        for e in std::fs::read_dir(&containers)
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = e.file_name().to_string_lossy().into_owned();
            let _ = self
                .tug()
                .args(["runtime", "delete", "--force", &id])
                .output();
        }
        let data = self.data.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for mp in mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&data))
        {
            let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Bed {
    fn new() -> Result<Bed, Box<dyn std::error::Error>> {
        let images = TestImages::get()?;
        let registry = Registry::start_with(RegistryOptions::default().with_images())?;
        let image = images.oci.reference(&registry);
        let bed = Bed {
            registry,
            data: tempfile::tempdir()?,
            image,
        };
        // Pulled once up front, so runs print only the container's output.
        let pulled = bed.tug().args(["image", "pull", &bed.image]).output()?;
        assert!(pulled.status.success(), "{:?}", pulled);
        Ok(bed)
    }

    fn tug(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tug"));
        c.arg("--data-dir")
            .arg(self.data.path())
            .args(["--insecure-registry", &self.registry.host_port()]);
        c.env("DOCKER_CONFIG", self.data.path().join("no-docker-config"));
        c
    }

    /// `tug run --rm [flags] IMAGE -- sh -c SCRIPT` (`--keep` in flags: without --rm).
    fn run(&self, flags: &[&str], script: &str) -> Result<Output, std::io::Error> {
        let keep = flags.contains(&"--keep");
        let flags: Vec<&str> = flags.iter().copied().filter(|f| *f != "--keep").collect();
        let mut cmd = self.tug();
        cmd.arg("run");
        if !keep {
            cmd.arg("--rm");
        }
        cmd.args(flags)
            .arg(&self.image)
            .args(["--", "/bin/sh", "-c", script])
            .output()
    }

    fn state(&self, id: &str) -> Option<serde_json::Value> {
        let out = self.tug().args(["runtime", "state", id]).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Nothing of any container is left: state dirs, rootfs dirs, mounts, cgroups.
    fn assert_clean(&self, name: &str) {
        let containers = self.data.path().join("containers");
        let left: Vec<_> = std::fs::read_dir(&containers)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "state dirs left: {left:?}");
        let rootfs = self.data.path().join("rootfs");
        let left: Vec<_> = std::fs::read_dir(&rootfs)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "rootfs dirs left: {left:?}");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let data = self.data.path().to_string_lossy().into_owned();
        assert!(!mounts.contains(&data), "mounts left under {data}");
        for ctrl in ["memory", "pids", "cpu", "freezer"] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(ctrl)
                .join("tug")
                .join(name);
            assert!(!dir.exists(), "cgroup left: {}", dir.display());
        }
    }
}

fn name() -> String {
    format!(
        "t{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_container_is_isolated_and_confined() -> TestResult {
    let bed = Bed::new()?;
    let n = name();
    let script = "echo pid=$$; echo procs=$(ls /proc | grep -cE '^[0-9]+$'); hostname; \
        echo timer=$(cat /proc/timer_list | wc -c); \
        (echo 1 > /proc/sys/kernel/panic) 2>/dev/null || echo procsys=ro; \
        mount -t tmpfs x /mnt 2>/dev/null || echo mount=denied; \
        echo x > /tmp/m.ko; insmod /tmp/m.ko 2>/dev/null || echo insmod=denied; \
        unshare -U true 2>/dev/null || echo userns=denied; \
        grep CapEff /proc/self/status; id";
    let out = bed.run(&["--name", &n, "--hostname", "box-1"], script)?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    for expected in [
        "pid=1",
        "box-1",
        "timer=0",
        "procsys=ro",
        "mount=denied",
        "insmod=denied",
        "userns=denied",
        "CapEff:\t00000000a80425fb",
        "uid=0(root) gid=0(root)",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}{stderr}"
        );
    }
    // Only the shell and its children: no host process is visible.
    let procs: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(99);
    assert!(procs <= 5, "{procs} processes visible");
    bed.assert_clean(&n);
    Ok(())
}

#[test]
fn exit_codes_and_signals_propagate() -> TestResult {
    let bed = Bed::new()?;
    let out = bed.run(&[], "echo out; echo err >&2; exit 3")?;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!((stdout.as_str(), stderr.trim_end()), ("out\n", "err"));

    // SIGTERM to tug run reaches the container; a process that handles it exits its own way...
    let mut child = bed
        .tug()
        .arg("run")
        .arg(&bed.image)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    wait_for_line(&mut child, "ready")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    assert_eq!(child.wait()?.code(), Some(42));

    // Other signals are passed on as they are.
    let mut child = bed
        .tug()
        .arg("run")
        .arg("--rm")
        .arg(&bed.image)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "trap 'exit 11' USR1; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    wait_for_line(&mut child, "ready")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )?;
    assert_eq!(child.wait()?.code(), Some(11));

    // ...and one that ignores it is killed after the stop timeout: 128 + SIGKILL.
    let mut child = bed
        .tug()
        .arg("run")
        .args(["--stop-timeout", "1"])
        .arg(&bed.image)
        .args(["--", "/bin/sh", "-c", "echo ready; exec sleep 100"])
        .stdout(Stdio::piped())
        .spawn()?;
    wait_for_line(&mut child, "ready")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    assert_eq!(child.wait()?.code(), Some(137));
    Ok(())
}

fn wait_for_line(child: &mut Child, line: &str) -> TestResult {
    use std::io::BufRead;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut reader = std::io::BufReader::new(out);
    let mut got = String::new();
    reader.read_line(&mut got)?;
    assert_eq!(got.trim(), line);
    // Keep draining so the container never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok(())
}

#[test]
fn memory_limit_ends_in_an_oom_kill_reported_as_such() -> TestResult {
    let bed = Bed::new()?;
    let n = name();
    let out = bed.run(
        &["--name", &n, "--memory", "16Mi"],
        "exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
    )?;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(137), "{stdout}{stderr}");
    assert!(stderr.contains("out of memory (limit 16Mi)"), "{stderr}");
    bed.assert_clean(&n);
    Ok(())
}

#[test]
fn pids_limit_contains_a_fork_bomb() -> TestResult {
    let bed = Bed::new()?;
    let n = name();
    // busybox sh gives up at the first fork the kernel refuses.
    let out = bed.run(
        &["--name", &n, "--pids-limit", "8"],
        "for i in $(seq 30); do sleep 5 & done; echo escaped",
    )?;
    let (stdout, stderr) = text(&out);
    assert!(stderr.contains("can't fork"), "{stdout}{stderr}");
    assert!(
        !stdout.contains("escaped"),
        "30 processes started under pids.max=8"
    );
    assert_eq!(out.status.code(), Some(2));
    bed.assert_clean(&n);
    Ok(())
}

#[test]
fn cpu_quota_and_limits_are_in_the_cgroup() -> TestResult {
    let bed = Bed::new()?;
    let n = name();
    let mut child = bed
        .tug()
        .arg("run")
        .args([
            "--rm",
            "--name",
            &n,
            "--cpus",
            "0.5",
            "--memory",
            "64Mi",
            "--pids-limit",
            "20",
        ])
        .arg(&bed.image)
        .args(["--", "/bin/sh", "-c", "echo ready; sleep 3"])
        .stdout(Stdio::piped())
        .spawn()?;
    wait_for_line(&mut child, "ready")?;
    let read = |ctrl: &str, file: &str| {
        std::fs::read_to_string(
            Path::new("/sys/fs/cgroup")
                .join(ctrl)
                .join("tug")
                .join(&n)
                .join(file),
        )
        .map(|s| s.trim().to_string())
    };
    assert_eq!(read("cpu", "cpu.cfs_quota_us")?, "50000");
    assert_eq!(read("cpu", "cpu.cfs_period_us")?, "100000");
    assert_eq!(
        read("memory", "memory.limit_in_bytes")?,
        (64u64 << 20).to_string()
    );
    assert_eq!(read("pids", "pids.max")?, "20");
    // The init joins its cgroup by itself (writing to each hierarchy's `tasks`): its
    // processes are in every hierarchy, and in the same ones.
    let procs = read("memory", "cgroup.procs")?;
    assert!(!procs.is_empty(), "no process in the memory cgroup");
    for ctrl in ["cpu", "cpuacct", "pids", "freezer"] {
        assert_eq!(
            read(ctrl, "cgroup.procs")?,
            procs,
            "processes in the {ctrl} cgroup"
        );
    }
    assert_eq!(child.wait()?.code(), Some(0));
    bed.assert_clean(&n);
    Ok(())
}

#[test]
fn writes_stay_in_the_upper_dir_and_volumes_outlive_the_container() -> TestResult {
    let bed = Bed::new()?;
    let n = name();
    let volume = tempfile::tempdir()?;
    let v = format!("{}:/data", volume.path().display());
    let out = bed.run(
        &["--name", &n, "--keep", "-v", &v],
        "echo kept > /data/f; echo new > /etc/new; rm /bin/ls; echo changed > /etc/passwd",
    )?;
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(std::fs::read_to_string(volume.path().join("f"))?, "kept\n");
    let upper = bed.data.path().join("rootfs").join(&n).join("upper");
    assert_eq!(std::fs::read_to_string(upper.join("etc/new"))?, "new\n");
    assert!(
        std::fs::symlink_metadata(upper.join("bin/ls")).map(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_char_device()
        })?,
        "deleting a lower file leaves a whiteout in the upper dir"
    );
    let layers: Vec<PathBuf> = std::fs::read_dir(bed.data.path().join("images/layers"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(layers.len(), 1);
    assert!(
        std::fs::read_to_string(layers[0].join("etc/passwd"))?.starts_with("root:x:0:0"),
        "the image layer was written to"
    );
    assert!(std::fs::symlink_metadata(layers[0].join("bin/ls")).is_ok());
    // The kept container is still known, then goes with `tug runtime delete`.
    let state = bed.state(&n).ok_or("no state")?;
    assert_eq!(state["status"], "stopped");
    assert!(
        bed.tug()
            .args(["runtime", "delete", &n])
            .status()?
            .success()
    );
    std::fs::remove_dir_all(bed.data.path().join("rootfs").join(&n))?;
    bed.assert_clean(&n);
    Ok(())
}

#[test]
fn a_container_outlives_its_starter_and_is_readopted_with_its_exit_code() -> TestResult {
    let bed = Bed::new()?;
    let n = name();
    let mut child = bed
        .tug()
        .arg("run")
        .args(["--name", &n])
        .arg(&bed.image)
        .args(["--", "/bin/sh", "-c", "echo ready; sleep 1; exit 7"])
        .stdout(Stdio::piped())
        .spawn()?;
    wait_for_line(&mut child, "ready")?;
    child.kill()?; // SIGKILL: tug run gets no chance to clean up or stop anything
    child.wait()?;
    let state = bed.state(&n).ok_or("no state")?;
    assert_eq!(
        state["status"], "running",
        "the container died with its starter: {state}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let state = loop {
        let s = bed.state(&n).ok_or("no state")?;
        if s["status"] == "stopped" || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        (state["status"].as_str(), state["exitCode"].as_i64()),
        (Some("stopped"), Some(7)),
        "{state}"
    );
    assert!(
        bed.tug()
            .args(["runtime", "delete", &n])
            .status()?
            .success()
    );
    // tug run was killed before it could unmount the rootfs: do it the way an agent would.
    let rootfs = bed.data.path().join("rootfs").join(&n).join("rootfs");
    nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH)?;
    std::fs::remove_dir_all(bed.data.path().join("rootfs").join(&n))?;
    bed.assert_clean(&n);
    Ok(())
}

#[test]
fn an_umoci_bundle_runs_under_tug_runtime() -> TestResult {
    let images = TestImages::get()?;
    let dir = tempfile::tempdir()?;
    let bundle = dir.path().join("bundle");
    let status = Command::new("umoci")
        .args([
            "unpack",
            "--image",
            &format!("{}:busybox", images.layout().display()),
        ])
        .arg(&bundle)
        .status()?;
    assert!(status.success());
    let config_path = bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    config["process"]["args"] =
        serde_json::json!(["/bin/sh", "-c", "echo from-bundle; hostname; exit 5"]);
    config["process"]["terminal"] = serde_json::json!(false);
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let data = tempfile::tempdir()?;
    let n = name();
    let out = Command::new(env!("CARGO_BIN_EXE_tug"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["runtime", "run", &n, "--bundle"])
        .arg(&bundle)
        .output()?;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stdout}{stderr}");
    assert_eq!(stdout, "from-bundle\numoci-default\n");
    Ok(())
}

#[test]
fn bad_input_is_one_clear_error_and_leaves_nothing_behind() -> TestResult {
    let bed = Bed::new()?;
    let n = name();
    let missing_image = format!("{}/tug-test/nothing:here", bed.registry.host_port());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--name".into(),
                n.clone(),
                missing_image,
                "--".into(),
                "true".into(),
            ],
            "not found",
        ),
        (
            vec![
                "--name".into(),
                n.clone(),
                "--memory".into(),
                "12MB".into(),
                bed.image.clone(),
                "--".into(),
                "true".into(),
            ],
            "invalid memory quantity \"12MB\"",
        ),
        (
            vec![
                "--name".into(),
                n.clone(),
                bed.image.clone(),
                "--".into(),
                "/no/such/binary".into(),
            ],
            "executable \"/no/such/binary\" not found in the image",
        ),
        (
            vec![
                "--name".into(),
                n.clone(),
                bed.image.clone(),
                "--".into(),
                "nosuchcommand".into(),
            ],
            "executable \"nosuchcommand\" not found in $PATH",
        ),
        (
            vec![
                "--name".into(),
                n.clone(),
                "-u".into(),
                "nobody2".into(),
                bed.image.clone(),
                "--".into(),
                "true".into(),
            ],
            "unknown user \"nobody2\"",
        ),
        (
            vec![
                "--name".into(),
                n.clone(),
                "-v".into(),
                "Bad_Name:/data".into(),
                bed.image.clone(),
                "--".into(),
                "true".into(),
            ],
            "invalid --volume",
        ),
    ];
    for (args, needle) in cases {
        let out = bed.tug().arg("run").args(&args).output()?;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout}{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("tug:")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert!(errors[0].contains(needle), "{args:?}: {stderr}");
        bed.assert_clean(&n);
    }
    Ok(())
}

#[test]
fn failures_restart_with_growing_back_off_and_named_volumes_persist() -> TestResult {
    let bed = Bed::new()?;
    let n = name();
    // Counts its runs in a named volume; succeeds on the third.
    let script = "n=$(cat /state/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /state/n; echo run $n; [ $n -ge 3 ] && exit 0; exit 1";
    let out = bed.run(
        &[
            "--name",
            &n,
            "--restart",
            "on-failure:5",
            "-v",
            "counter:/state",
        ],
        script,
    )?;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "run 1\nrun 2\nrun 3\n");
    let restarts: Vec<&str> = stderr.lines().filter(|l| l.contains("restart")).collect();
    assert_eq!(restarts.len(), 2, "{stderr}");
    assert!(
        restarts[0].ends_with("restart 1 in 100ms") && restarts[1].ends_with("restart 2 in 200ms"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(bed.data.path().join("volumes/counter/n"))?,
        "3\n",
        "the named volume outlives the containers"
    );

    // The retry budget runs out: the last status is the container's.
    let out = bed.run(
        &["--name", &n, "--restart", "on-failure:2"],
        "echo again; exit 4",
    )?;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert_eq!(stdout.matches("again").count(), 3, "1 run + 2 restarts");
    bed.assert_clean(&n);
    Ok(())
}

#[test]
fn the_same_bundle_behaves_the_same_under_tug_runc_and_crun() -> TestResult {
    let script = "echo out; echo err >&2; hostname; id -u; exit 7";
    let data = tempfile::tempdir()?;
    let mut results = Vec::new();
    for runtime in ["tug", "runc", "crun"] {
        let n = name();
        let bundle = tug_e2e::bundle::Bundle::busybox(
            &["/bin/sh", "-c", script],
            &format!("/tug-test-{n}"),
        )?;
        let root = data.path().join(runtime);
        let out = match runtime {
            "tug" => Command::new(env!("CARGO_BIN_EXE_tug")).arg("--data-dir").arg(&root).args(["runtime", "run", &n, "--bundle"]).arg(bundle.path()).output()?,
            "runc" => Command::new("runc").arg("--root").arg(&root).args(["run", "--bundle"]).arg(bundle.path()).arg(&n).output()?,
            // crun refuses this hybrid host unless cgroup2 is out of sight: its own mount namespace.
            _ => Command::new("unshare")
                .args(["-m", "--propagation", "private", "sh", "-c", "umount /sys/fs/cgroup/unified 2>/dev/null; exec crun --root \"$0\" run --bundle \"$1\" \"$2\""])
                .arg(&root)
                .arg(bundle.path())
                .arg(&n)
                .output()?,
        };
        for ctrl in [
            "memory", "pids", "cpu", "freezer", "blkio", "devices", "cpuset", "cpuacct", "systemd",
        ] {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(ctrl)
                    .join(format!("tug-test-{n}")),
            );
        }
        let (stdout, stderr) = text(&out);
        results.push((
            runtime,
            out.status.code(),
            stdout,
            stderr.trim().to_string(),
        ));
    }
    for r in &results {
        assert_eq!(
            (r.1, r.2.as_str(), r.3.as_str()),
            (Some(7), "out\numoci-default\n0\n", "err"),
            "{}: {r:?}",
            r.0
        );
    }
    Ok(())
}

#[test]
fn detached_containers_are_listed_logged_exec_paused_stopped_and_removed() -> TestResult {
    let bed = Bed::new()?;
    let n = name();
    let out = bed
        .tug()
        .args(["run", "-d", "--name", &n])
        .arg(&bed.image)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "echo started; trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done",
        ])
        .output()?;
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(text(&out).0.trim(), n, "-d prints the name");

    let ps = text(&bed.tug().arg("ps").output()?).0;
    assert!(
        ps.lines()
            .any(|l| l.starts_with(&n) && l.contains("running") && l.contains("tug-test/busybox")),
        "{ps}"
    );

    let exec = bed
        .tug()
        .args([
            "exec",
            "-e",
            "EXTRA=1",
            &n,
            "--",
            "/bin/sh",
            "-c",
            "echo $$ $EXTRA $(hostname); exit 9",
        ])
        .output()?;
    let (stdout, stderr) = text(&exec);
    assert_eq!(exec.status.code(), Some(9), "{stdout}{stderr}");
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(
        fields.get(1..),
        Some(&["1", &n[..n.len().min(12)]][..]),
        "exec sees the container's pid namespace, env and hostname: {stdout}"
    );
    assert_ne!(
        fields.first(),
        Some(&"1"),
        "exec'd process is not the container's init"
    );

    assert!(bed.tug().args(["pause", &n]).status()?.success());
    assert!(text(&bed.tug().arg("ps").output()?).0.contains("paused"));
    let st: serde_json::Value =
        serde_json::from_slice(&bed.tug().args(["runtime", "state", &n]).output()?.stdout)?;
    assert_eq!(st["status"], "paused");
    assert!(bed.tug().args(["unpause", &n]).status()?.success());

    let stop = bed.tug().args(["stop", "-t", "5", &n]).output()?;
    assert_eq!(
        text(&stop).0.trim(),
        format!("{n} exited (0)"),
        "the TERM trap ran"
    );
    let logs = text(&bed.tug().args(["logs", &n]).output()?).0;
    assert_eq!(logs, "started\nbye\n");
    let ps = text(&bed.tug().args(["ps", "-a"]).output()?).0;
    assert!(ps.contains("exited (0)"), "{ps}");
    assert!(bed.tug().args(["rm", &n]).status()?.success());
    bed.assert_clean(&n);
    Ok(())
}

#[test]
fn entrypoint_and_cmd_follow_docker() -> TestResult {
    let bed = Bed::new()?;
    // Trailing arguments replace the image's cmd (/bin/sh).
    let out = bed
        .tug()
        .args(["run", "--rm"])
        .arg(&bed.image)
        .args(["--", "echo", "as", "cmd"])
        .output()?;
    assert_eq!(text(&out).0, "as cmd\n");
    // --entrypoint replaces the entrypoint; arguments follow it.
    let out = bed
        .tug()
        .args(["run", "--rm", "--entrypoint", "/bin/echo"])
        .arg(&bed.image)
        .args(["--", "via", "entrypoint"])
        .output()?;
    assert_eq!(text(&out).0, "via entrypoint\n");
    Ok(())
}

#[test]
fn the_network_hook_wires_the_empty_namespace_before_the_process_starts() -> TestResult {
    let bed = Bed::new()?;
    let n = name();
    // Everything happens inside the container's own namespace (nsenter --net=$TUG_NETNS).
    let hook = "nsenter --net=\"$TUG_NETNS\" ip link add eth0 type veth peer name eth1 && \
                nsenter --net=\"$TUG_NETNS\" ip addr add 192.0.2.10/24 dev eth0 && \
                nsenter --net=\"$TUG_NETNS\" ip link set eth0 up";
    let out = bed.run(
        &["--name", &n, "--network-hook", hook],
        "ip -4 addr show | awk '/inet /{print $NF, $2}'",
    )?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stdout, "lo 127.0.0.1/8\neth0 192.0.2.10/24\n",
        "loopback up, the hook's link there when the process starts, nothing else: {stderr}"
    );
    // A failing hook fails the create and leaves nothing.
    let out = bed.run(
        &[
            "--name",
            &n,
            "--network-hook",
            "echo no address left >&2; exit 1",
        ],
        "true",
    )?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("the network hook failed") && stderr.contains("no address left"),
        "{stderr}"
    );
    bed.assert_clean(&n);
    Ok(())
}

#[test]
fn external_oci_runtimes_run_the_same_containers_under_the_monitor() -> TestResult {
    let bed = Bed::new()?;
    for runtime in ["/usr/sbin/runc", "/usr/bin/crun"] {
        let n = name();
        let out = bed.run(&["--name", &n, "--oci-runtime", runtime, "--memory", "32Mi", "--hostname", "ext"], "echo out; echo err >&2; hostname; cat /sys/fs/cgroup/memory/memory.limit_in_bytes; exit 6")?;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(6), "{runtime}: {stdout}{stderr}");
        assert_eq!(
            stdout,
            format!("out\next\n{}\n", 32u64 << 20),
            "{runtime}: {stderr}"
        );
        assert!(stderr.contains("err"), "{runtime}: {stderr}");
        bed.assert_clean(&n);
    }
    Ok(())
}
