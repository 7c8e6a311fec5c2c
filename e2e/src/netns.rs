//! Named network namespaces owned by this test process: `tug-e2e-<pid>-<seq>-<role>` under
//! `/run/netns`, deleted (with any process still inside) when dropped, and swept up later if the
//! process that made them died before it could.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Error, IoContext, Result};
use crate::exec::{self, require};

/// Every namespace the test bed creates starts with this.
pub const PREFIX: &str = "tug-e2e-";
const NETNS_DIR: &str = "/run/netns";

static SEQ: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new, empty network namespace (loopback up). `role` is a short tag for humans.
    pub fn create(role: &str) -> Result<Netns> {
        sweep_stale();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{seq}-{role}", std::process::id());
        exec::run(Command::new(require("ip")?).args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that names this namespace (`/run/netns/NAME`).
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip -n NAME args...`, checked.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        exec::run(
            Command::new(require("ip")?)
                .arg("-n")
                .arg(&self.name)
                .args(args),
        )
    }

    /// A command that runs `program` inside this namespace (through `ip netns exec`, which execs
    /// in place, so the child's PID is the program's PID).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A command that runs `program` in this network namespace only: unlike `ip netns exec`, it
    /// keeps the caller's mounts (`ip netns exec` remounts `/sys`, which hides the cgroup
    /// hierarchies a container runtime needs).
    pub fn enter_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let path = self.path();
        let file = File::open(&path).ctx(|| format!("open {}", path.display()))?;
        let mut cmd = Command::new(program);
        // SAFETY: setns(2) on an fd opened before the fork is async-signal-safe; the child
        // touches no other memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        Ok(cmd)
    }

    /// Run `f` on a thread that has entered this namespace: sockets it opens live here, so the
    /// test process can talk to servers inside hosts without touching its own namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        let file = File::open(&path).ctx(|| format!("open {}", path.display()))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .ctx(|| format!("enter network namespace {}", self.name))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Net(format!("thread inside {} panicked", self.name))))
        })
    }

    /// PIDs of every process whose network namespace this is.
    pub fn pids(&self) -> Result<Vec<i32>> {
        pids_in(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = remove(&self.name) {
            tracing::warn!(netns = %self.name, %err, "cleanup failed");
        }
    }
}

fn pids_in(name: &str) -> Result<Vec<i32>> {
    let out = exec::run(Command::new(require("ip")?).args(["netns", "pids", name]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Kill what still runs inside (only processes started in a namespace this test bed created),
/// then delete the namespace.
fn remove(name: &str) -> Result<()> {
    for pid in pids_in(name).unwrap_or_default() {
        tracing::debug!(netns = name, pid, "killing leftover process");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    exec::run(Command::new(require("ip")?).args(["netns", "delete", name]))?;
    Ok(())
}

/// Delete namespaces left by test processes that no longer exist (killed before cleanup ran).
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = owner_pid(&name) else {
            continue;
        };
        if owner != std::process::id() && !Path::new(&format!("/proc/{owner}")).exists() {
            tracing::info!(netns = %name, "removing namespace of a dead test process");
            if let Err(err) = remove(&name) {
                tracing::warn!(netns = %name, %err, "could not remove stale namespace");
            }
        }
    }
}

fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_is_read_from_our_names_only() {
        assert_eq!(owner_pid("tug-e2e-4242-7-h0"), Some(4242));
        assert_eq!(owner_pid("tug-e2e-x-7-h0"), None);
        assert_eq!(owner_pid("cni-1234"), None);
    }
}
