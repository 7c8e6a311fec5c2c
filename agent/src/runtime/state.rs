//! A container's state dir (`DATA/containers/<id>/`) and the `state.json` in it, which the
//! monitor keeps current so anyone (a restarted agent, `tug runtime state`) can read it.
//!
//! ```text
//! config.json    the OCI runtime spec
//! runtime.json   tug's own settings (cgroup path, resources, log limits)
//! state.json     status, pids, times, exit code / signal / OOM kill
//! exec.fifo      opened by `start` to let the container's process exec
//! container.log  JSON lines of stdout/stderr (rotated: .1, .2, ...)
//! netns          the network namespace, pinned (bind mount) for the network plugin
//! oci/           the external OCI runtime's own state (with --oci-runtime)
//! monitor.log    the monitor's own diagnostics
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::cgroups::Resources;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Namespaces, mounts and cgroup are ready; the process waits for `start`.
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    pub status: Status,
    /// The container's init process, as seen from the host.
    pub pid: Option<i32>,
    pub monitor_pid: i32,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub exit_code: Option<i32>,
    /// Set when a signal ended the process.
    pub signal: Option<i32>,
    pub oom_killed: bool,
}

impl State {
    /// A container just created (its process waits for start), supervised by this process.
    pub fn created(id: String, pid: i32) -> State {
        State {
            id,
            status: Status::Created,
            pid: Some(pid),
            monitor_pid: std::process::id() as i32,
            created_at: now(),
            started_at: None,
            finished_at: None,
            exit_code: None,
            signal: None,
            oom_killed: false,
        }
    }

    /// What a shell would report: the exit code, or 128 + the signal.
    pub fn exit_status(&self) -> Option<i32> {
        match (self.exit_code, self.signal) {
            (_, Some(sig)) => Some(128 + sig),
            (Some(code), None) => Some(code),
            _ => None,
        }
    }
}

/// tug's settings for one container, beside the OCI spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeOptions {
    /// Relative cgroup path, e.g. `tug/<id>`.
    pub cgroup_path: String,
    pub resources: Resources,
    pub log_max_bytes: u64,
    pub log_max_files: u32,
    /// Run (by /bin/sh -c) once the empty network namespace exists and before the process
    /// starts, with TUG_CONTAINER_ID, TUG_NETNS (its pinned path) and TUG_PID: the network
    /// plugin's hand-over point.
    #[serde(default)]
    pub network_hook: Option<String>,
    /// Run the container with this OCI runtime binary (runc, crun) instead of the built-in one;
    /// the monitor still supervises it, logs its output and records its exit.
    #[serde(default)]
    pub oci_runtime: Option<PathBuf>,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> StateDir {
        StateDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> PathBuf {
        self.path.join("config.json")
    }

    pub fn runtime(&self) -> PathBuf {
        self.path.join("runtime.json")
    }

    pub fn state(&self) -> PathBuf {
        self.path.join("state.json")
    }

    pub fn exec_fifo(&self) -> PathBuf {
        self.path.join("exec.fifo")
    }

    pub fn log(&self) -> PathBuf {
        self.path.join("container.log")
    }

    /// The container's network namespace, pinned for the network plugin.
    pub fn netns(&self) -> PathBuf {
        self.path.join("netns")
    }

    /// The external OCI runtime's `--root`.
    pub fn oci_root(&self) -> PathBuf {
        self.path.join("oci")
    }

    pub fn monitor_log(&self) -> PathBuf {
        self.path.join("monitor.log")
    }

    pub fn read_state(&self) -> Result<State, StateError> {
        read_json(&self.state())
    }

    /// Atomically replace state.json (write, rename).
    pub fn write_state(&self, state: &State) -> Result<(), StateError> {
        write_json(&self.state(), state)
    }
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    let raw = fs::read(path).map_err(|source| StateError::Io {
        what: "read",
        path: path.into(),
        source,
    })?;
    serde_json::from_slice(&raw).map_err(|source| StateError::Json {
        path: path.into(),
        source,
    })
}

/// Replace `path` atomically (write a temp file, rename). Not fsynced: these files describe
/// processes, which a machine crash ends anyway, while the page cache survives any crash of
/// tug; an fsync here would make every create, start and exit wait for the disk (on ext4 for
/// every file written since the last commit).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let io = |what, source| StateError::Io {
        what,
        path: path.into(),
        source,
    };
    let raw = serde_json::to_vec_pretty(value).map_err(|source| StateError::Json {
        path: path.into(),
        source,
    })?;
    fs::write(&tmp, raw).map_err(|e| io("write", e))?;
    fs::rename(&tmp, path).map_err(|e| io("rename", e))
}
