//! The container's network namespace is created empty; this brings its loopback up and hands the
//! namespace to the network plugin (a hook command) before the container's process starts.

use std::path::Path;
use std::process::Command;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Set `lo` up in the calling thread's network namespace (SIOCSIFFLAGS on a datagram socket).
pub fn loopback_up() -> Result<(), String> {
    use nix::libc;
    // SAFETY: a plain socket and two ioctls on a zeroed ifreq naming "lo"; the descriptor is
    // closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let result = if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            Err(format!(
                "read lo flags: {}",
                std::io::Error::last_os_error()
            ))
        } else {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) < 0 {
                Err(format!("set lo up: {}", std::io::Error::last_os_error()))
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        result
    }
}

/// Keep `pid`'s network namespace at `path` (a bind mount over an empty file).
pub fn pin(pid: i32, path: &Path) -> Result<(), String> {
    std::fs::write(path, b"").map_err(|e| format!("create {}: {e}", path.display()))?;
    let source = format!("/proc/{pid}/ns/net");
    mount(
        Some(source.as_str()),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("bind {source} to {}: {e}", path.display()))
}

/// Release a pinned namespace (nothing to do if it is not pinned).
pub fn unpin(path: &Path) {
    let _ = umount2(path, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

/// Run the hook (`/bin/sh -c HOOK`) with TUG_CONTAINER_ID, TUG_NETNS and TUG_PID set.
pub fn run_hook(hook: &str, id: &str, netns: &Path, pid: i32) -> Result<(), String> {
    let out = Command::new("/bin/sh")
        .args(["-c", hook])
        .env("TUG_CONTAINER_ID", id)
        .env("TUG_NETNS", netns)
        .env("TUG_PID", pid.to_string())
        .output()
        .map_err(|e| format!("run the network hook: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "the network hook failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
