//! Running a command in a task's container from the (multi-threaded) agent, with its output
//! captured: for the Agent API's Exec and for exec health probes.
//!
//! `runtime::exec::exec` must run in a single-threaded process and uses the caller's stdio. So
//! the agent forks: the child has one thread (the forking one), points its stdin at /dev/null
//! and its stdout/stderr at pipes, calls `exec::exec`, and `_exit`s with its status. Nothing in
//! the child takes a lock another thread of the agent could have held at the fork: file I/O,
//! serde and glibc's malloc (which is reset in the child) only; its one diagnostic goes to fd 2
//! with write(2).

use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe2};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::runtime::container::Runtime;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ExecError {
    #[error("start the command: {0}")]
    Spawn(String),
    #[error("wait for the command: {0}")]
    Wait(String),
}

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// How long output is still read after the command's exit: a daemon it started may hold the
/// pipes open forever.
const DRAIN: Duration = Duration::from_millis(200);

struct Child {
    pid: Pid,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

fn spawn(
    rt: &Runtime,
    id: &str,
    command: &[String],
    env: &[(String, String)],
) -> Result<Child, ExecError> {
    let err = |what: &str, e: nix::Error| ExecError::Spawn(format!("{what}: {e}"));
    let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| err("pipe", e))?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| err("pipe", e))?;
    let null = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| err("open /dev/null", e))?;
    // SAFETY: the child only does what the module doc lists, then _exits.
    match unsafe { fork() }.map_err(|e| err("fork", e))? {
        ForkResult::Child => {
            let ok = nix::unistd::dup2_stdin(&null).is_ok()
                && nix::unistd::dup2_stdout(&out_w).is_ok()
                && nix::unistd::dup2_stderr(&err_w).is_ok();
            let code = if !ok {
                126
            } else {
                match crate::runtime::exec::exec(rt, id, command, env) {
                    Ok(code) => code,
                    Err(e) => {
                        let _ = nix::unistd::write(std::io::stderr(), format!("{e}\n").as_bytes());
                        126
                    }
                }
            };
            // SAFETY: ends the child without running the agent's exit handlers.
            unsafe { nix::libc::_exit(code) }
        }
        ForkResult::Parent { child } => Ok(Child {
            pid: child,
            stdout: out_r,
            stderr: err_r,
        }),
    }
}

fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 255,
    }
}

/// Every descendant of `pid` (children first listed after their parent), from /proc.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"));
        for t in tasks.into_iter().flatten().flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                queue.push(c);
            }
        }
    }
    out
}

/// Kill the command and everything it started (the forked child, exec's own fork, the
/// command in the container).
fn kill_tree(pid: Pid) {
    for p in descendants(pid.as_raw()).into_iter().rev() {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let _ = kill(pid, Signal::SIGKILL);
}

async fn read_some(rx: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> std::io::Result<usize> {
    match rx {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Run `command` in container `id`; output goes to `output` (if given) as it comes. With a
/// `timeout`, the command is killed when it runs longer (the result is then 137). Returns the
/// exit status (128 + signal for a signal).
pub(crate) async fn run(
    rt: Runtime,
    id: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Option<Duration>,
    output: Option<mpsc::Sender<(Stream, Vec<u8>)>>,
) -> Result<i32, ExecError> {
    let child = tokio::task::spawn_blocking(move || spawn(&rt, &id, &command, &env))
        .await
        .map_err(|e| ExecError::Spawn(e.to_string()))??;
    let pid = child.pid;
    let receiver = |fd: OwnedFd| pipe::Receiver::from_owned_fd(fd).ok();
    let (mut stdout, mut stderr) = (receiver(child.stdout), receiver(child.stderr));
    let mut waiter = tokio::task::spawn_blocking(move || waitpid(pid, None));
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let (mut out_buf, mut err_buf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let mut status: Option<i32> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut killed = false;
    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        tokio::select! {
            r = read_some(&mut stdout, &mut out_buf) => match r {
                Ok(n) if n > 0 => {
                    if let Some(tx) = &output { let _ = tx.send((Stream::Stdout, out_buf[..n].to_vec())).await; }
                }
                _ => stdout = None,
            },
            r = read_some(&mut stderr, &mut err_buf) => match r {
                Ok(n) if n > 0 => {
                    if let Some(tx) = &output { let _ = tx.send((Stream::Stderr, err_buf[..n].to_vec())).await; }
                }
                _ => stderr = None,
            },
            w = &mut waiter, if status.is_none() => {
                let w = w.map_err(|e| ExecError::Wait(e.to_string()))?;
                status = Some(exit_code(w.map_err(|e| ExecError::Wait(e.to_string()))?));
                drain_until = Some(tokio::time::Instant::now() + DRAIN);
            }
            () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() && !killed && status.is_none() => {
                killed = true;
                tokio::task::spawn_blocking(move || kill_tree(pid));
            }
            () = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => break,
        }
    }
    Ok(status.unwrap_or(255))
}
