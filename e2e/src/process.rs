//! Processes the test bed starts: owned by PID, stopped by PID (SIGTERM, grace, SIGKILL) when
//! dropped, and killed by the kernel if the test process dies first.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{IoContext, Result};
use crate::exec::describe;

/// How long `stop` waits after SIGTERM before it sends SIGKILL, when dropped.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// A child process that is stopped, by its PID only, when this guard goes away.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    what: String,
    status: Option<ExitStatus>,
}

/// Start `cmd` as a child that the kernel kills (SIGKILL) if the thread that started it dies,
/// so a test killed by a signal leaves no server behind. Start it from the test's own thread,
/// not from a short-lived helper thread.
pub fn spawn(cmd: &mut Command) -> Result<ChildGuard> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let what = describe(cmd);
    let child = cmd.spawn().ctx(|| format!("cannot start `{what}`"))?;
    tracing::debug!(pid = child.id(), %what, "started");
    Ok(ChildGuard {
        child,
        what,
        status: None,
    })
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdout, if it was piped (once).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The exit status if the process has ended (it is reaped then), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .ctx(|| format!("wait for `{}`", self.what))?;
        }
        Ok(self.status)
    }

    /// SIGKILL at once (a crash, `kill -9`), and reap it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.kill_and_reap()
    }

    /// SIGKILL and wait for the exit. ESRCH only means it is already gone; it is still our
    /// unreaped child, so the PID cannot have been reused.
    fn kill_and_reap(&mut self) -> Result<ExitStatus> {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let status = self
            .child
            .wait()
            .ctx(|| format!("wait for `{}`", self.what))?;
        self.status = Some(status);
        Ok(status)
    }

    /// SIGTERM, then up to `grace` for it to exit, then SIGKILL; returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        // ESRCH only means it is already gone; it is still our unreaped child, so the PID
        // cannot have been reused.
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(pid = pid.as_raw(), what = %self.what, "no exit after SIGTERM, sending SIGKILL");
        self.kill_and_reap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(err) = self.stop(DEFAULT_GRACE) {
            tracing::warn!(what = %self.what, %err, "could not stop child");
        }
    }
}
