//! The per-container monitor: `tug` exec'd in a mode with no async runtime (DESIGN.md). It
//! detaches (fork, setsid: the caller's death or restart does not touch it), clones the
//! container's init while it still has a single thread, places it in its cgroup, and tells the
//! caller on stdout `{"created":PID}` or `{"error":"..."}`. Then it records the start, copies
//! stdout/stderr into the rotated JSON log, reaps the init, and writes the exit code, signal
//! and OOM kill into state.json before it exits.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, clone};
use nix::sys::signal::{SigHandler, Signal, kill, signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe2, setsid};
use oci_spec::runtime::Spec;

use super::cgroups::{Cgroup, CgroupDriver};
use super::init::{self, InitArgs};
use super::logs::{LogWriter, copy_lines};
use super::mounts::CgroupView;
use super::state::{RuntimeOptions, State, StateDir, Status, now, read_json};

const CHILD_STACK: usize = 8 << 20;

/// Entry point of `tug __monitor STATE_DIR`; returns the monitor's exit code.
pub fn main(dir: &Path) -> i32 {
    // Detach: the caller waits for this intermediate process only, and the monitor keeps
    // running (reparented to init) whatever happens to the caller.
    // SAFETY: this process was just exec'd and has one thread.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => return 0,
        Ok(ForkResult::Child) => {}
        Err(e) => {
            report(&serde_json::json!({ "error": format!("fork the monitor: {e}") }));
            return 1;
        }
    }
    let _ = setsid();
    limit_malloc_arenas();
    // Whatever the starter blocked is not ours to block.
    let _ = nix::sys::signal::SigSet::all().thread_unblock();
    for sig in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGPIPE] {
        // SAFETY: SigIgn installs no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let sd = StateDir::new(dir);
    match create(&sd) {
        Ok(mut c) => {
            report(
                &serde_json::json!({ "created": c.pid.as_raw(), "monitor": std::process::id() }),
            );
            // The caller has its answer: stop writing to its pipe.
            if let Ok(null) = open("/dev/null", OFlag::O_WRONLY, Mode::empty()) {
                let _ = nix::unistd::dup2_stdout(&null);
            }
            release_free_memory();
            supervise(&sd, &mut c);
            0
        }
        Err(msg) => {
            report(&serde_json::json!({ "error": msg }));
            1
        }
    }
}

/// One monitor runs per container for its whole life, so its idle footprint counts: the log
/// copier threads share the main malloc arena instead of creating one each (they copy lines
/// and hold the log lock anyway).
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes a malloc tunable; no other thread exists yet.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// Give the heap that parsing the spec and setting up the container used back to the kernel.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

fn report(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// How the monitor learns that `start` released the container.
enum StartWaiter {
    /// The built-in init says "start" on its sync pipe (EOF if it died before), and waits
    /// on `to_init` until the start is recorded before it releases `start` and execs.
    Builtin {
        sync: BufReader<File>,
        to_init: File,
    },
    /// An external runtime's container: the monitor waits on exec.fifo itself, then runs
    /// `RUNTIME start`.
    External {
        runtime: PathBuf,
        root: PathBuf,
        id: String,
    },
}

/// A created container, as the monitor holds it.
struct Created {
    pid: Pid,
    cgroup: Cgroup,
    state: State,
    start: StartWaiter,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    opts: RuntimeOptions,
}

fn create(sd: &StateDir) -> Result<Created, String> {
    let spec: Spec = read_json(&sd.config()).map_err(|e| e.to_string())?;
    let opts: RuntimeOptions = read_json(&sd.runtime()).map_err(|e| e.to_string())?;
    if let Some(runtime) = opts.oci_runtime.clone() {
        return super::external::create(sd, runtime, opts).map(
            |(pid, cgroup, state, stdout, stderr, opts)| Created {
                pid,
                cgroup,
                state,
                start: StartWaiter::External {
                    runtime: opts.oci_runtime.clone().unwrap_or_default(),
                    root: sd.oci_root(),
                    id: state_id(sd),
                },
                stdout: Some(stdout),
                stderr: Some(stderr),
                opts,
            },
        );
    }
    let rootfs = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .ok_or("the spec has no root")?;
    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().clone()) {
        Some(profile) => super::seccomp::compile(&profile).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let driver = CgroupDriver::detect().map_err(|e| e.to_string())?;
    let cgroup =
        Cgroup::create(&driver, &opts.cgroup_path, &opts.resources).map_err(|e| e.to_string())?;

    let result = clone_init(
        sd,
        spec,
        rootfs,
        seccomp,
        &cgroup,
        opts.network_hook.as_deref(),
    );
    match result {
        Ok((pid, sync, to_init, stdout, stderr)) => {
            let state = State::created(state_id(sd), pid.as_raw());
            sd.write_state(&state).map_err(|e| e.to_string())?;
            Ok(Created {
                pid,
                cgroup,
                state,
                start: StartWaiter::Builtin { sync, to_init },
                stdout: Some(stdout),
                stderr: Some(stderr),
                opts,
            })
        }
        Err(msg) => {
            let _ = cgroup.kill_all(Signal::SIGKILL);
            let _ = cgroup.remove();
            Err(msg)
        }
    }
}

type Cloned = (Pid, BufReader<File>, File, OwnedFd, OwnedFd);

fn clone_init(
    sd: &StateDir,
    spec: Spec,
    rootfs: std::path::PathBuf,
    seccomp: Vec<seccompiler::BpfProgram>,
    cgroup: &Cgroup,
    network_hook: Option<&str>,
) -> Result<Cloned, String> {
    let p = |e: nix::Error| format!("pipe: {e}");
    let (from_monitor, to_init) = pipe2(OFlag::O_CLOEXEC).map_err(p)?;
    let monitor_end = to_init.as_raw_fd();
    let (sync_r, sync_w) = pipe2(OFlag::O_CLOEXEC).map_err(p)?;
    let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(p)?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(p)?;
    let fifo = open(
        &sd.exec_fifo(),
        OFlag::O_PATH | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open exec.fifo: {e}"))?;

    // v1: the init joins every hierarchy's directory; the `cgroup` mount can show only those
    // under /sys/fs/cgroup.
    let (cgroups, join_dirs) = match cgroup {
        Cgroup::V2(_) => (CgroupView::V2, Vec::new()),
        Cgroup::V1(v1) => {
            let dirs: Vec<PathBuf> = v1.dirs().into_iter().map(Path::to_path_buf).collect();
            let view = dirs
                .iter()
                .filter_map(|dir| {
                    let name = dir
                        .strip_prefix("/sys/fs/cgroup")
                        .ok()?
                        .components()
                        .next()?
                        .as_os_str()
                        .to_string_lossy()
                        .into_owned();
                    Some((name, dir.clone()))
                })
                .collect();
            (CgroupView::V1(view), dirs)
        }
    };
    let mut args = Some(InitArgs {
        spec,
        rootfs,
        seccomp,
        from_monitor,
        monitor_end,
        sync: sync_w,
        stdout: out_w,
        stderr: err_w,
        fifo,
        cgroups,
        join_dirs,
    });
    let mut stack = vec![0u8; CHILD_STACK];
    let flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET;
    let child = Box::new(move || match args.take() {
        Some(a) => init::run(a),
        None => 1,
    });
    // SAFETY: the monitor has a single thread here, so the child's copy of memory is
    // consistent; the child only touches its own copy and exits or execs.
    let pid = unsafe { clone(child, &mut stack, flags, Some(Signal::SIGCHLD as i32)) }
        .map_err(|e| format!("clone the container's init: {e}"))?;
    // The parent's copies of the child's ends (moved into the closure) were dropped with it.

    let mut sync = BufReader::new(File::from(sync_r));
    let mut to_init = File::from(to_init);
    // v2: the monitor moves the init into its cgroup and tells it so; on v1 the init moves
    // itself (faster: see `join_current_thread`).
    if let Cgroup::V2(_) = cgroup {
        let placed = cgroup
            .add_process(pid.as_raw())
            .map_err(|e| e.to_string())
            .and_then(|()| {
                to_init
                    .write_all(&[1])
                    .map_err(|e| format!("release the container's init: {e}"))
            });
        if let Err(e) = placed {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(e);
        }
    }
    let mut line = String::new();
    let _ = sync.read_line(&mut line);
    if line.trim() == "ok" {
        match hand_over_network(sd, network_hook, pid) {
            Ok(()) => return Ok((pid, sync, to_init, out_r, err_r)),
            Err(e) => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                super::netns::unpin(&sd.netns());
                return Err(e);
            }
        }
    }
    let _ = kill(pid, Signal::SIGKILL);
    let _ = waitpid(pid, None);
    let msg = line
        .trim()
        .strip_prefix("error: ")
        .unwrap_or(line.trim())
        .to_string();
    Err(if msg.is_empty() {
        "the container's init exited during setup".into()
    } else {
        msg
    })
}

pub(crate) fn state_id(sd: &StateDir) -> String {
    sd.path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Pin the new network namespace and let the network plugin wire it.
pub(crate) fn hand_over_network(sd: &StateDir, hook: Option<&str>, pid: Pid) -> Result<(), String> {
    super::netns::pin(pid.as_raw(), &sd.netns())?;
    if let Some(hook) = hook {
        let id = sd
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        super::netns::run_hook(hook, &id, &sd.netns(), pid.as_raw())?;
    }
    Ok(())
}

fn supervise(sd: &StateDir, c: &mut Created) {
    // The log copiers: threads are fine now that the init has been cloned.
    let writer = LogWriter::open(
        &sd.log(),
        c.opts.log_max_bytes.max(1 << 20),
        c.opts.log_max_files.max(2),
    );
    let mut copiers = Vec::new();
    let streams = [(c.stdout.take(), "stdout"), (c.stderr.take(), "stderr")];
    match writer {
        Ok(w) => {
            let w = Arc::new(Mutex::new(w));
            for (fd, stream) in streams {
                if let Some(fd) = fd {
                    let w = w.clone();
                    copiers.push(std::thread::spawn(move || {
                        copy_lines(File::from(fd), stream, &w)
                    }));
                }
            }
        }
        // Without a log the output is dropped (the pipes close with `streams`).
        Err(e) => tracing::warn!(error = %e, "cannot open the container log"),
    }

    let started = match &mut c.start {
        // "start" when the process is released; EOF if it died before.
        StartWaiter::Builtin { sync, .. } => {
            let mut line = String::new();
            sync.read_line(&mut line).is_ok() && line.trim() == "start"
        }
        StartWaiter::External { runtime, root, id } => {
            super::external::wait_and_start(sd, runtime, root, id, c.pid)
        }
    };
    if started {
        c.state.status = Status::Running;
        c.state.started_at = Some(now());
        let _ = sd.write_state(&c.state);
        // Recorded: the init may release `start` (which then finds the container running
        // without polling) and exec.
        if let StartWaiter::Builtin { to_init, .. } = &mut c.start {
            let _ = to_init.write_all(&[1]);
        }
    }
    let status = loop {
        match waitpid(c.pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    match status {
        Ok(WaitStatus::Exited(_, code)) => c.state.exit_code = Some(code),
        Ok(WaitStatus::Signaled(_, sig, _)) => c.state.signal = Some(sig as i32),
        _ => c.state.exit_code = Some(255),
    }
    c.state.oom_killed = c.state.signal == Some(Signal::SIGKILL as i32)
        && c.cgroup.stats().map(|s| s.oom_kills > 0).unwrap_or(false);
    for t in copiers {
        let _ = t.join();
    }
    c.state.status = Status::Stopped;
    c.state.finished_at = Some(now());
    let _ = sd.write_state(&c.state);
}
