//! The process's allocator, chosen by its role at its first allocation and kept for its life:
//! jemalloc for a process that runs a controller (`tug controller`, `tug up`), the system
//! allocator (glibc) for every other role.
//!
//! A controller's heap is hundreds of MB of small objects that live long (the store) or die in
//! bulk (log compaction). At 256 concurrent writers glibc malloc spent about a fifth of the
//! leader's runtime thread on them (free-list unlinking, consolidation); jemalloc's size-class
//! slabs cut the replicas' CPU a write by a tenth and their memory a write by 14% in the
//! controller benchmark. But jemalloc's own start-up touches more memory: a container's
//! monitor (one process per container) took 786 KiB of private memory instead of 290 KiB and
//! `tug runtime run` 12 ms instead of 8, so short-lived commands and the agent's processes
//! keep glibc.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use nix::libc;
use tikv_jemallocator::Jemalloc;

const UNDECIDED: u8 = 0;
const SYSTEM: u8 = 1;
const JEMALLOC: u8 = 2;

static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// Dispatches every allocation to the allocator chosen for this process.
pub struct ByRole;

#[inline]
fn choice() -> u8 {
    match CHOICE.load(Ordering::Relaxed) {
        UNDECIDED => {
            // The first allocation happens on the main thread before `main`, alone; any later
            // caller that got here too would decide the same from the same command line.
            let decided = if runs_a_controller() {
                JEMALLOC
            } else {
                SYSTEM
            };
            CHOICE.store(decided, Ordering::Relaxed);
            decided
        }
        decided => decided,
    }
}

/// Whether the command line (read from /proc without allocating) holds the word `controller`
/// or `up`: `tug [GLOBAL FLAGS] controller ...`, `tug [GLOBAL FLAGS] up ...`. A false match
/// (say, a manifest file named so) only picks the other allocator.
fn runs_a_controller() -> bool {
    let mut buf = [0u8; 4096];
    // SAFETY: a NUL-terminated path; the descriptor is closed before returning, and `read`
    // writes at most `buf.len()` bytes into `buf`.
    let len = unsafe {
        let fd = libc::open(
            c"/proc/self/cmdline".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    is_controller_command_line(buf.get(..len).unwrap_or_default())
}

/// `cmdline`: NUL-separated arguments, the program first.
fn is_controller_command_line(cmdline: &[u8]) -> bool {
    cmdline
        .split(|&b| b == 0)
        .skip(1)
        .any(|arg| arg == b"controller" || arg == b"up")
}

/// The allocator chosen for this process.
#[inline]
fn chosen() -> &'static dyn GlobalAlloc {
    match choice() {
        JEMALLOC => &Jemalloc,
        _ => &System,
    }
}

// SAFETY: every call goes to the one allocator chosen for the process (the choice never
// changes once made), so a block is always freed or resized by the allocator that made it;
// each call passes on its caller's guarantees.
unsafe impl GlobalAlloc for ByRole {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { chosen().alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { chosen().alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { chosen().dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { chosen().realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::is_controller_command_line;

    #[test]
    fn only_a_command_line_that_runs_a_controller_picks_jemalloc() {
        assert!(is_controller_command_line(
            b"tug\0controller\0--id\x001\0--listen\x00127.0.0.1:7000\0"
        ));
        assert!(is_controller_command_line(
            b"/usr/bin/tug\0--data-dir\0/var/lib/tug\0controller\0--id\x002\0"
        ));
        assert!(is_controller_command_line(
            b"tug\0up\0--network-mode\0vxlan\0"
        ));
        assert!(!is_controller_command_line(
            b"tug\0agent\0--controller-addr\0x\0"
        ));
        assert!(!is_controller_command_line(
            b"tug\0--controller\0h:1\0get\0services\0"
        ));
        assert!(!is_controller_command_line(
            b"tug\0__monitor\0/run/tug/c1\0"
        ));
        assert!(
            !is_controller_command_line(b"controller\0"),
            "the program's own name"
        );
        assert!(!is_controller_command_line(b""));
    }
}
