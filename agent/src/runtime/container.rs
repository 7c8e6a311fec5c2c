//! Containers from the caller's side (the agent, `tug run`, `tug runtime`): create spawns the
//! monitor and waits for its answer, start releases the process, wait follows the monitor's
//! exit, kill signals the process, delete removes what is left. Everything a container has lives
//! in its state dir, so a restarted caller finds its containers again with `state`.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::unistd::{Pid, mkfifo};
use oci_spec::runtime::Spec;

use super::cgroups::{Cgroup, CgroupDriver};
use super::state::{RuntimeOptions, State, StateDir, StateError, Status, write_json};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid container id {0:?}: use 1-64 letters, digits, '_', '-' or '.'")]
    InvalidId(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container {id} is {status:?}: {what}")]
    WrongState {
        id: String,
        status: Status,
        what: &'static str,
    },
    #[error("container {id}: {message}")]
    Failed { id: String, message: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

type Result<T, E = ContainerError> = std::result::Result<T, E>;

/// Where containers live and how the monitor is started.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// `DATA/containers`.
    pub root: PathBuf,
    /// The `tug` binary (its `__monitor` mode).
    pub monitor_exe: PathBuf,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !id.starts_with('.')
}

impl Runtime {
    pub fn dir(&self, id: &str) -> StateDir {
        StateDir::new(self.root.join(id))
    }

    /// Set up a container (namespaces, mounts, cgroup) whose process waits for `start`.
    /// On any failure nothing is left: no state dir, no cgroup.
    pub fn create(&self, id: &str, spec: &Spec, opts: &RuntimeOptions) -> Result<State> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidId(id.into()));
        }
        let sd = self.dir(id);
        fs::create_dir_all(&self.root).map_err(|source| ContainerError::Io {
            what: "create",
            path: self.root.clone(),
            source,
        })?;
        match fs::create_dir(sd.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ContainerError::Exists(id.into()));
            }
            Err(source) => {
                return Err(ContainerError::Io {
                    what: "create",
                    path: sd.path().into(),
                    source,
                });
            }
        }
        let result = self.spawn_monitor(id, &sd, spec, opts);
        if result.is_err() {
            super::netns::unpin(&sd.netns());
            let _ = fs::remove_dir_all(sd.path());
        }
        result
    }

    fn spawn_monitor(
        &self,
        id: &str,
        sd: &StateDir,
        spec: &Spec,
        opts: &RuntimeOptions,
    ) -> Result<State> {
        let failed = |message: String| ContainerError::Failed {
            id: id.into(),
            message,
        };
        write_json(&sd.config(), spec)?;
        write_json(&sd.runtime(), opts)?;
        mkfifo(&sd.exec_fifo(), Mode::from_bits_truncate(0o600))
            .map_err(|e| failed(format!("mkfifo: {e}")))?;
        let log = fs::File::create(sd.monitor_log()).map_err(|source| ContainerError::Io {
            what: "create",
            path: sd.monitor_log(),
            source,
        })?;
        let mut child = Command::new(&self.monitor_exe)
            .arg("__monitor")
            .arg(sd.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .map_err(|e| {
                failed(format!(
                    "start the monitor {}: {e}",
                    self.monitor_exe.display()
                ))
            })?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| failed("monitor has no stdout".into()))?;
        let mut line = String::new();
        let read = BufReader::new(out).read_line(&mut line);
        // The first process only forks the monitor and exits.
        let _ = child.wait();
        read.map_err(|e| failed(format!("read the monitor's answer: {e}")))?;
        let answer: serde_json::Value = serde_json::from_str(line.trim()).map_err(|_| {
            let log = fs::read_to_string(sd.monitor_log()).unwrap_or_default();
            failed(format!(
                "the monitor gave no answer{}",
                if log.is_empty() {
                    String::new()
                } else {
                    format!(": {}", log.trim())
                }
            ))
        })?;
        if let Some(err) = answer.get("error").and_then(|e| e.as_str()) {
            return Err(failed(err.to_string()));
        }
        Ok(sd.read_state()?)
    }

    /// Let a created container's process exec; returns once it is running (or has already
    /// stopped, if exec failed).
    pub fn start(&self, id: &str) -> Result<State> {
        let sd = self.existing(id)?;
        let state = sd.read_state()?;
        if state.status != Status::Created {
            return Err(ContainerError::WrongState {
                id: id.into(),
                status: state.status,
                what: "only a created container can be started",
            });
        }
        let fifo = sd.exec_fifo();
        let mut f = fs::File::open(&fifo).map_err(|source| ContainerError::Io {
            what: "open",
            path: fifo.clone(),
            source,
        })?;
        let mut byte = [0u8; 1];
        let _ = f.read(&mut byte);
        let _ = fs::remove_file(&fifo);
        // The built-in init releases `start` once the monitor has recorded it; with an
        // external runtime the monitor records it after `RUNTIME start`.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = sd.read_state()?;
            if state.status != Status::Created {
                return Ok(state);
            }
            if Instant::now() > deadline {
                return Err(ContainerError::Timeout(Duration::from_secs(10)));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn state(&self, id: &str) -> Result<State> {
        Ok(self.existing(id)?.read_state()?)
    }

    /// Every container under the root.
    pub fn list(&self) -> Result<Vec<State>> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            if let Ok(s) = StateDir::new(e.path()).read_state() {
                out.push(s);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Block until the container has stopped (or `timeout`), then return its final state.
    pub fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<State> {
        let sd = self.existing(id)?;
        let state = sd.read_state()?;
        if state.status == Status::Stopped {
            return Ok(state);
        }
        // The monitor writes the final state, then exits: wait for its exit with a pidfd.
        // (No pidfd means the monitor is already gone.)
        if let Some(pidfd) = pidfd_open(state.monitor_pid) {
            let ms = timeout
                .map(|t| t.as_millis().min(i32::MAX as u128) as i32)
                .unwrap_or(-1);
            let mut fds = [nix::poll::PollFd::new(
                pidfd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let timeout = if ms < 0 {
                nix::poll::PollTimeout::NONE
            } else {
                nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX)
            };
            loop {
                match nix::poll::poll(&mut fds, timeout) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Ok(0) => {
                        return Err(ContainerError::Timeout(Duration::from_millis(ms as u64)));
                    }
                    _ => break,
                }
            }
        }
        let state = sd.read_state()?;
        if state.status != Status::Stopped {
            return Err(ContainerError::Failed {
                id: id.into(),
                message: "the monitor died before it recorded the exit; see monitor.log".into(),
            });
        }
        Ok(state)
    }

    /// Signal the container's process.
    pub fn kill(&self, id: &str, signal: Signal) -> Result<()> {
        let state = self.state(id)?;
        match (state.status, state.pid) {
            (Status::Stopped, _) | (_, None) => Err(ContainerError::WrongState {
                id: id.into(),
                status: state.status,
                what: "it has no process to signal",
            }),
            (_, Some(pid)) => {
                kill(Pid::from_raw(pid), signal).map_err(|e| ContainerError::Failed {
                    id: id.into(),
                    message: format!("kill {pid}: {e}"),
                })
            }
        }
    }

    /// Freeze every process of a running container (or thaw them).
    pub fn pause(&self, id: &str, paused: bool) -> Result<()> {
        let state = self.state(id)?;
        if state.status != Status::Running {
            return Err(ContainerError::WrongState {
                id: id.into(),
                status: state.status,
                what: "only a running container can be paused or resumed",
            });
        }
        let opts: RuntimeOptions = super::state::read_json(&self.dir(id).runtime())?;
        let failed = |e: super::cgroups::CgroupError| ContainerError::Failed {
            id: id.into(),
            message: e.to_string(),
        };
        let cgroup = CgroupDriver::detect()
            .and_then(|d| Cgroup::open(&d, &opts.cgroup_path))
            .map_err(failed)?;
        cgroup.freeze(paused).map_err(failed)
    }

    /// Whether a container's processes are frozen.
    pub fn is_paused(&self, id: &str) -> bool {
        let Ok(opts) = super::state::read_json::<RuntimeOptions>(&self.dir(id).runtime()) else {
            return false;
        };
        CgroupDriver::detect()
            .and_then(|d| Cgroup::open(&d, &opts.cgroup_path))
            .is_ok_and(|c| c.is_frozen())
    }

    /// Stop it: `signal` (SIGTERM), up to `grace`, then SIGKILL; returns the final state.
    pub fn stop(&self, id: &str, grace: Duration) -> Result<State> {
        let state = self.state(id)?;
        if state.status == Status::Stopped {
            return Ok(state);
        }
        // A frozen process would never see the signal.
        let _ = self.pause(id, false);
        let _ = self.kill(id, Signal::SIGTERM);
        match self.wait(id, Some(grace)) {
            Err(ContainerError::Timeout(_)) => {
                let _ = self.kill(id, Signal::SIGKILL);
                self.wait(id, Some(Duration::from_secs(30)))
            }
            other => other,
        }
    }

    /// Remove a stopped container (with `force`, stop it first): its cgroup and state dir.
    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let state = self.state(id)?;
        let opts: RuntimeOptions = super::state::read_json(&self.dir(id).runtime())?;
        let cgroup_path = opts.cgroup_path.as_str();
        if state.status != Status::Stopped {
            if !force {
                return Err(ContainerError::WrongState {
                    id: id.into(),
                    status: state.status,
                    what: "stop it first, or delete with force",
                });
            }
            let _ = self.pause(id, false);
            let _ = self.kill(id, Signal::SIGKILL);
            // A created container's process waits on the fifo; SIGKILL ends it all the same.
            match self.wait(id, Some(Duration::from_secs(30))) {
                Ok(_) => {}
                // Its monitor was killed (not by us): nobody records the exit, but the process
                // got its SIGKILL above; what is left to remove is ours.
                Err(ContainerError::Failed { message, .. }) => {
                    tracing::warn!(container = id, %message, "removing a container without its monitor");
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(runtime) = &opts.oci_runtime {
            super::external::delete(runtime, &self.dir(id), id);
        }
        if let Ok(driver) = CgroupDriver::detect()
            && let Ok(cg) = Cgroup::open(&driver, cgroup_path)
        {
            cg.remove().map_err(|e| ContainerError::Failed {
                id: id.into(),
                message: e.to_string(),
            })?;
        }
        let dir = self.dir(id);
        super::netns::unpin(&dir.netns());
        fs::remove_dir_all(dir.path()).map_err(|source| ContainerError::Io {
            what: "remove",
            path: dir.path().into(),
            source,
        })
    }

    fn existing(&self, id: &str) -> Result<StateDir> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidId(id.into()));
        }
        let sd = self.dir(id);
        if sd.state().exists() {
            Ok(sd)
        } else {
            Err(ContainerError::NotFound(id.into()))
        }
    }
}

/// A pidfd for `pid`, or None if the process is gone.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: a plain syscall; on success it returns a new descriptor we own.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor returned by the kernel.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
