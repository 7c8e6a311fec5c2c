//! Noticing a container's exit without polling: its monitor writes the final state, then exits;
//! a pidfd of the monitor becomes readable at that moment, and tokio waits on it like on a
//! socket. (A monitor that died without writing the exit is reported as an exit with 255.)

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::ctx::blocking;
use crate::runtime::container::{ContainerError, Runtime};
use crate::runtime::state::{State, Status};

/// A pidfd for `pid`, or None if the process is gone.
fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: a plain syscall; on success it returns a new descriptor we own.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor returned by the kernel.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The state as a stopped container whose exit went unrecorded.
fn unrecorded(mut s: State) -> State {
    s.status = Status::Stopped;
    s.exit_code = Some(255);
    s.signal = None;
    s.finished_at = Some(crate::runtime::state::now());
    s
}

/// Wait until container `id` has stopped; its final state.
pub(crate) async fn wait_exit(rt: Runtime, id: String) -> State {
    let mut monitor_gone = false;
    loop {
        let (r, i) = (rt.clone(), id.clone());
        let state = match blocking(move || r.state(&i)).await {
            Ok(Ok(s)) => s,
            // Deleted under us (or unreadable): it is not running any more.
            Ok(Err(ContainerError::NotFound(_))) | Ok(Err(_)) | Err(_) => {
                return unrecorded(State::created(id.clone(), 0));
            }
        };
        if state.status == Status::Stopped {
            return state;
        }
        if monitor_gone {
            return unrecorded(state);
        }
        // SAFETY: the OwnedFd is open and owned by the AsyncFd for all of its life.
        let registered = pidfd(state.monitor_pid)
            .map(|fd| unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) });
        match registered {
            Some(Ok(fd)) => {
                // Readable once the monitor has exited (after writing the final state).
                let _ = fd.readable().await;
                monitor_gone = true;
            }
            Some(Err(_)) => tokio::time::sleep(Duration::from_secs(1)).await,
            None => {
                // Gone already: give a racing final write a moment, then look once more.
                tokio::time::sleep(Duration::from_millis(100)).await;
                monitor_gone = true;
            }
        }
    }
}
