//! Containers run by an external OCI runtime (runc, crun) under tug's monitor: the monitor
//! becomes a child subreaper, runs `RUNTIME create` with its log pipes as the container's stdio
//! (the container's init is reparented to the monitor when the runtime exits, so the monitor
//! reaps it and records its exit like a built-in container's), pins the network namespace and
//! runs the hook, and on `start` runs `RUNTIME start`. The state dir is the bundle.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, pipe2};
use oci_spec::runtime::Spec;

use super::cgroups::{Cgroup, CgroupDriver};
use super::state::{RuntimeOptions, State, StateDir, read_json, write_json};

type Created = (Pid, Cgroup, State, OwnedFd, OwnedFd, RuntimeOptions);

fn runtime_cmd(runtime: &Path, root: &Path) -> Command {
    let mut cmd = Command::new(runtime);
    cmd.arg("--root").arg(root);
    cmd
}

pub fn create(sd: &StateDir, runtime: PathBuf, opts: RuntimeOptions) -> Result<Created, String> {
    let id = super::monitor::state_id(sd);
    // The cgroup the runtime creates is ours to read and freeze: give it tug's path.
    let mut spec: Spec = read_json(&sd.config()).map_err(|e| e.to_string())?;
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_cgroups_path(Some(PathBuf::from(format!("/{}", opts.cgroup_path))));
    spec.set_linux(Some(linux));
    write_json(&sd.config(), &spec).map_err(|e| e.to_string())?;
    hide_hybrid_cgroup2()?;
    // The container's init becomes our child once the runtime exits.
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| format!("become a subreaper: {e}"))?;

    let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let root = sd.oci_root();
    let log = sd.path().join("oci.log");
    let status = runtime_cmd(&runtime, &root)
        .arg("--log")
        .arg(&log)
        .args(["create", "--bundle"])
        .arg(sd.path())
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .status()
        .map_err(|e| format!("run {}: {e}", runtime.display()))?;
    if !status.success() {
        let why = std::fs::read_to_string(&log).unwrap_or_default();
        let last = why.lines().last().unwrap_or("").to_string();
        return Err(format!(
            "{} create failed ({status}): {last}",
            runtime.display()
        ));
    }
    let pid = runtime_pid(&runtime, &root, &id)?;
    let cleanup = |msg: String| {
        let _ = runtime_cmd(&runtime, &root)
            .args(["delete", "--force", &id])
            .output();
        msg
    };
    if let Err(e) = super::monitor::hand_over_network(sd, opts.network_hook.as_deref(), pid) {
        super::netns::unpin(&sd.netns());
        return Err(cleanup(e));
    }
    let cgroup = CgroupDriver::detect()
        .and_then(|d| Cgroup::open(&d, &opts.cgroup_path))
        .map_err(|e| cleanup(e.to_string()))?;
    let state = State::created(id, pid.as_raw());
    sd.write_state(&state).map_err(|e| e.to_string())?;
    Ok((pid, cgroup, state, out_r, err_r, opts))
}

fn runtime_pid(runtime: &Path, root: &Path, id: &str) -> Result<Pid, String> {
    let out = runtime_cmd(runtime, root)
        .args(["state", id])
        .output()
        .map_err(|e| format!("{} state: {e}", runtime.display()))?;
    let state: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{} state: {e}", runtime.display()))?;
    state["pid"]
        .as_i64()
        .filter(|p| *p > 0)
        .map(|p| Pid::from_raw(p as i32))
        .ok_or_else(|| format!("{} state has no pid", runtime.display()))
}

/// Block until `start` opens exec.fifo, then `RUNTIME start`; false if the container could not
/// be started (it is killed then, and the monitor records its end).
pub fn wait_and_start(sd: &StateDir, runtime: &Path, root: &Path, id: &str, pid: Pid) -> bool {
    let opened = File::options()
        .write(true)
        .open(sd.exec_fifo())
        .and_then(|mut f| f.write_all(&[0]));
    if opened.is_err() {
        let _ = kill(pid, Signal::SIGKILL);
        return false;
    }
    match runtime_cmd(runtime, root)
        .args(["start", id])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => true,
        _ => {
            let _ = kill(pid, Signal::SIGKILL);
            false
        }
    }
}

/// Remove the external runtime's record of the container (its cgroup goes with it).
pub fn delete(runtime: &Path, sd: &StateDir, id: &str) {
    let _ = runtime_cmd(runtime, &sd.oci_root())
        .args(["delete", "--force", id])
        .stdin(Stdio::null())
        .output();
}

/// On a host with cgroup2 mounted beside the v1 hierarchies (hybrid), crun refuses to run:
/// give this monitor (single-threaded here) a private mount namespace without that mount.
fn hide_hybrid_cgroup2() -> Result<(), String> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let hybrid = std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|m| m.lines().any(|l| l.contains(" /sys/fs/cgroup/unified ")));
    if !hybrid {
        return Ok(());
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("private mount namespace: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("make / a slave: {e}"))?;
    umount2("/sys/fs/cgroup/unified", MntFlags::MNT_DETACH)
        .map_err(|e| format!("hide cgroup2: {e}"))
}
