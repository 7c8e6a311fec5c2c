//! The container's first process, between clone and exec. It runs in the monitor's copy of
//! memory (the monitor has no other threads when it clones), inside the new pid, mount, uts,
//! ipc and net namespaces:
//!
//! 1. join its cgroup (v1: by itself; v2: the monitor moves it), unshare the cgroup namespace;
//! 2. hostname, mounts, devices, pivot_root, masked and read-only paths;
//! 3. find the executable, set rlimits, no_new_privs, user and capabilities;
//! 4. tell the monitor "ok" (or "error: ...": one line, then exit);
//! 5. block on `exec.fifo` until `start`, tell the monitor "start", wait until it has recorded
//!    that, release `start`, install seccomp, exec.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;
use nix::unistd::{AccessFlags, access, dup2_stderr, dup2_stdin, dup2_stdout, execve, sethostname};
use oci_spec::runtime::Spec;
use seccompiler::BpfProgram;

use super::cgroups::v1::join_current_thread;
use super::{mounts, seccomp, security};

/// What the child needs, prepared by the monitor before it clones.
pub struct InitArgs {
    pub spec: Spec,
    pub rootfs: PathBuf,
    pub seccomp: Vec<BpfProgram>,
    /// Read: a byte once the monitor has moved the child into its cgroup (v2 only), and one
    /// once it has recorded the start.
    pub from_monitor: OwnedFd,
    /// The child's copy of the monitor's end of that pipe (the clone copied every
    /// descriptor), closed first so that the monitor's death reads as EOF.
    pub monitor_end: RawFd,
    /// Write: "ok\n", "start\n" or "error: ...\n".
    pub sync: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// O_PATH descriptor of the state dir's exec.fifo (opened for writing to wait for start).
    pub fifo: OwnedFd,
    pub cgroups: mounts::CgroupView,
    /// v1: the container's directory in every hierarchy it has one in (the init joins each);
    /// `cgroups` may show fewer (only those under /sys/fs/cgroup can be mounted).
    pub join_dirs: Vec<PathBuf>,
}

impl std::fmt::Debug for InitArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitArgs")
            .field("rootfs", &self.rootfs)
            .finish_non_exhaustive()
    }
}

/// Run in the cloned child; returns only on failure (after reporting it).
pub fn run(args: InitArgs) -> isize {
    // SAFETY: the descriptor is this process's copy of the monitor's end, open and owned by
    // nothing else here; dropping it closes it.
    drop(unsafe { OwnedFd::from_raw_fd(args.monitor_end) });
    let mut sync = File::from(args.sync);
    let streams = Streams {
        from_monitor: args.from_monitor,
        stdout: args.stdout,
        stderr: args.stderr,
    };
    match setup(
        &args.spec,
        &args.rootfs,
        &args.cgroups,
        &args.join_dirs,
        &streams,
    ) {
        Ok(exec) => {
            let _ = sync.write_all(b"ok\n");
            match wait_and_exec(&args.fifo, &args.seccomp, exec, &mut sync, &streams) {
                Ok(never) => match never {},
                Err(msg) => {
                    // After "ok" the monitor no longer waits for errors: say it in the log too
                    // (stderr is the log pipe by now).
                    let _ = writeln!(std::io::stderr(), "tug: {msg}");
                    let _ = sync.write_all(format!("error: {msg}\n").as_bytes());
                    127
                }
            }
        }
        Err(msg) => {
            let _ = sync.write_all(format!("error: {}\n", msg.replace('\n', " ")).as_bytes());
            1
        }
    }
}

struct Streams {
    from_monitor: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// The resolved executable, arguments and environment.
struct Exec {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

fn setup(
    spec: &Spec,
    rootfs: &Path,
    cgroups: &mounts::CgroupView,
    join_dirs: &[PathBuf],
    streams: &Streams,
) -> Result<Exec, String> {
    join_cgroup(cgroups, join_dirs, streams)?;
    super::netns::loopback_up()?;
    if let Some(h) = spec.hostname() {
        sethostname(h).map_err(|e| format!("set hostname {h:?}: {e}"))?;
    }
    mounts::prepare_rootfs(spec, rootfs, cgroups).map_err(|e| e.to_string())?;
    mounts::pivot_into(rootfs).map_err(|e| e.to_string())?;
    mounts::protect_paths(spec).map_err(|e| e.to_string())?;

    let process = spec.process().clone().ok_or("the spec has no process")?;
    let argv_s = process.args().clone().unwrap_or_default();
    let env = process.env().clone().unwrap_or_default();
    let first = argv_s.first().ok_or("the spec's process has no args")?;
    let path = find_executable(first, &env)?;
    let cwd = process.cwd();
    std::env::set_current_dir(cwd)
        .map_err(|e| format!("working directory {}: {e}", cwd.display()))?;

    let cstr = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let exec = Exec {
        path: CString::new(path.as_os_str().as_bytes())
            .map_err(|_| "executable path contains a NUL byte")?,
        argv: argv_s.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?,
        envp: env.iter().map(|e| cstr(e)).collect::<Result<_, _>>()?,
    };
    security::set_rlimits(&process).map_err(|e| e.to_string())?;
    security::set_no_new_privs(&process).map_err(|e| e.to_string())?;
    security::drop_privileges(&process).map_err(|e| e.to_string())?;

    // Standard streams: stdin from /dev/null, stdout and stderr to the monitor's pipes.
    let null = open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open /dev/null: {e}"))?;
    dup2_stdin(&null).map_err(|e| format!("stdin: {e}"))?;
    dup2_stdout(&streams.stdout).map_err(|e| format!("stdout: {e}"))?;
    dup2_stderr(&streams.stderr).map_err(|e| format!("stderr: {e}"))?;
    Ok(exec)
}

/// Into the container's cgroup, which becomes the root of a new cgroup namespace. On v1 the
/// init moves itself (it has a single thread: see `cgroups::v1::join_current_thread` for why
/// that is fast); on v2 the monitor moves it and says so.
fn join_cgroup(
    cgroups: &mounts::CgroupView,
    join_dirs: &[PathBuf],
    streams: &Streams,
) -> Result<(), String> {
    match cgroups {
        mounts::CgroupView::V1(_) => {
            join_current_thread(join_dirs.iter().map(PathBuf::as_path))
                .map_err(|e| e.to_string())?;
        }
        mounts::CgroupView::V2 => wait_for_monitor(streams)?,
    }
    unshare(CloneFlags::CLONE_NEWCGROUP).map_err(|e| format!("new cgroup namespace: {e}"))
}

/// One byte from the monitor; EOF means it is gone.
fn wait_for_monitor(streams: &Streams) -> Result<(), String> {
    let mut byte = [0u8; 1];
    match nix::unistd::read(&streams.from_monitor, &mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => Err("the monitor went away".into()),
        Err(e) => Err(format!("wait for the monitor: {e}")),
    }
}

/// `name` if it has a '/', else the first executable `name` on the process's PATH.
fn find_executable(name: &str, env: &[String]) -> Result<PathBuf, String> {
    let runnable = |p: &Path| p.is_file() && access(p, AccessFlags::X_OK).is_ok();
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if runnable(&p) {
            Ok(p)
        } else {
            Err(format!("executable {name:?} not found in the image"))
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(super::spec::DEFAULT_PATH.trim_start_matches("PATH="));
    path.split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| runnable(p))
        .ok_or_else(|| format!("executable {name:?} not found in $PATH ({path}) of the image"))
}

/// The container's process starts as a fresh one would: default dispositions and no blocked
/// signals (the monitor ignores some, and its starter may have blocked others; both survive exec).
fn reset_signals() {
    use nix::sys::signal::{SigHandler, SigSet, Signal, signal};
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: SigDfl installs no handler code.
            let _ = unsafe { signal(sig, SigHandler::SigDfl) };
        }
    }
    let _ = SigSet::all().thread_unblock();
}

fn wait_and_exec(
    fifo: &OwnedFd,
    filters: &[BpfProgram],
    exec: Exec,
    sync: &mut File,
    streams: &Streams,
) -> Result<std::convert::Infallible, String> {
    // Opening the fifo for writing blocks until `start` opens it for reading.
    let fifo_path = format!("/proc/self/fd/{}", fifo.as_raw_fd());
    let mut fifo = File::options()
        .write(true)
        .open(&fifo_path)
        .map_err(|e| format!("wait for start: {e}"))?;
    // The monitor records the start first, so `start` returns with the container running.
    sync.write_all(b"start\n")
        .map_err(|e| format!("report start: {e}"))?;
    wait_for_monitor(streams)?;
    // The start is recorded: the container runs even if `start` died since it opened the
    // fifo (the write then fails with EPIPE).
    if let Err(e) = fifo.write_all(&[0]) {
        let _ = writeln!(std::io::stderr(), "tug: tell start: {e}");
    }
    drop(fifo);
    reset_signals();
    seccomp::apply(filters).map_err(|e| e.to_string())?;
    // Everything but 0, 1 and 2 closes on exec.
    // SAFETY: close_range only sets the close-on-exec flag on descriptors.
    let rc = unsafe { nix::libc::close_range(3, u32::MAX, nix::libc::CLOSE_RANGE_CLOEXEC as i32) };
    if rc != 0 {
        return Err(format!(
            "close descriptors: {}",
            std::io::Error::last_os_error()
        ));
    }
    let err = execve(&exec.path, &exec.argv, &exec.envp).err();
    Err(format!(
        "exec {:?}: {}",
        exec.path,
        err.map(|e| e.to_string()).unwrap_or_default()
    ))
}
