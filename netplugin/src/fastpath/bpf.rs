//! The `bpf(2)` commands the fast path needs: create maps and change their entries, and load
//! programs (with the verifier's log on failure). Attaching is tc's business ([`super::tc`]).
//!
//! Each command's `union bpf_attr` is laid out by byte offset from `include/uapi/linux/bpf.h`;
//! the kernel zero-checks the bytes after the fields a command uses, so the whole buffer starts
//! zeroed.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

use super::asm::Insn;

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_PROG_LOAD: u32 = 5;

/// `BPF_MAP_TYPE_HASH`.
pub(crate) const MAP_HASH: u32 = 1;
/// `BPF_MAP_TYPE_ARRAY`.
pub(crate) const MAP_ARRAY: u32 = 2;
/// `BPF_PROG_TYPE_SCHED_CLS`: tc classifier programs.
const PROG_SCHED_CLS: u32 = 3;

/// The size of `union bpf_attr` the commands here fill (the kernel accepts any size up to its
/// own, with the rest zero).
const ATTR_SIZE: usize = 128;
/// The verifier log kept when a load fails.
const LOG_SIZE: usize = 64 * 1024;
/// The kernel's limit on object names, including the terminating zero.
pub(crate) const NAME_LEN: usize = 16;

/// A `union bpf_attr` being filled.
struct Attr([u8; ATTR_SIZE]);

impl Attr {
    fn new() -> Attr {
        Attr([0; ATTR_SIZE])
    }

    fn u32(&mut self, off: usize, value: u32) -> &mut Attr {
        self.0[off..off + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn u64(&mut self, off: usize, value: u64) -> &mut Attr {
        self.0[off..off + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn ptr<T>(&mut self, off: usize, ptr: *const T) -> &mut Attr {
        self.u64(off, ptr as usize as u64)
    }

    fn name(&mut self, off: usize, name: &str) -> &mut Attr {
        let bytes = name.as_bytes();
        let len = bytes.len().min(NAME_LEN - 1);
        self.0[off..off + len].copy_from_slice(&bytes[..len]);
        self
    }

    /// Run command `cmd`; a non-negative result is returned.
    fn call(&mut self, cmd: u32) -> io::Result<i64> {
        // SAFETY: `bpf(2)` reads and writes at most `ATTR_SIZE` bytes of the buffer, which lives
        // for the call. Every pointer this module stores into it points at memory that outlives
        // the call and is as large as the kernel will access: a length stored beside it (log,
        // instructions), a NUL-terminated string (license), or a map key or value
        // whose size `Map::check` compared with the map's.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                libc::c_long::from(cmd),
                self.0.as_mut_ptr(),
                ATTR_SIZE as libc::c_long,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn call_fd(&mut self, cmd: u32) -> io::Result<OwnedFd> {
        let fd = RawFd::try_from(self.call(cmd)?)
            .map_err(|_| io::Error::other("bpf(2) returned an out-of-range descriptor"))?;
        // SAFETY: the command returns a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// A map and the sizes of its keys and values, which every access is checked against (the
/// kernel reads and writes that many bytes behind the pointers it is given).
#[derive(Debug)]
pub(crate) struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl Map {
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn check(&self, key: &[u8], value: Option<usize>) -> io::Result<()> {
        if key.len() != self.key_size || value.is_some_and(|v| v != self.value_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "key or value size does not match the map",
            ));
        }
        Ok(())
    }
}

/// Create a map.
pub(crate) fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<Map> {
    let fd = Attr::new()
        .u32(0, map_type)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max_entries)
        .name(28, name)
        .call_fd(BPF_MAP_CREATE)?;
    Ok(Map {
        fd,
        key_size: key_size as usize,
        value_size: value_size as usize,
    })
}

/// Set `key` to `value` (both exactly the map's sizes).
pub(crate) fn map_update(map: &Map, key: &[u8], value: &[u8]) -> io::Result<()> {
    map.check(key, Some(value.len()))?;
    Attr::new()
        .u32(0, fd_u32(&map.fd))
        .ptr(8, key.as_ptr())
        .ptr(16, value.as_ptr())
        .call(BPF_MAP_UPDATE_ELEM)
        .map(drop)
}

/// Remove `key`; whether it was there.
pub(crate) fn map_delete(map: &Map, key: &[u8]) -> io::Result<bool> {
    map.check(key, None)?;
    match Attr::new()
        .u32(0, fd_u32(&map.fd))
        .ptr(8, key.as_ptr())
        .call(BPF_MAP_DELETE_ELEM)
    {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Read `key` into `value`; whether it was there.
pub(crate) fn map_lookup(map: &Map, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    map.check(key, Some(value.len()))?;
    match Attr::new()
        .u32(0, fd_u32(&map.fd))
        .ptr(8, key.as_ptr())
        .ptr(16, value.as_mut_ptr())
        .call(BPF_MAP_LOOKUP_ELEM)
    {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every key of a map whose keys are `N` bytes.
pub(crate) fn map_keys<const N: usize>(map: &Map) -> io::Result<Vec<[u8; N]>> {
    map.check(&[0u8; N], None)?;
    let mut keys: Vec<[u8; N]> = Vec::new();
    let mut next = [0u8; N];
    loop {
        let mut attr = Attr::new();
        attr.u32(0, fd_u32(&map.fd)).ptr(16, next.as_mut_ptr());
        if let Some(last) = keys.last() {
            attr.ptr(8, last.as_ptr());
        }
        match attr.call(BPF_MAP_GET_NEXT_KEY) {
            Ok(_) => keys.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
    }
}

/// A program the verifier refused (with its log) or that could not be loaded at all.
#[derive(Debug)]
pub(crate) struct LoadError {
    pub(crate) source: io::Error,
    /// The end of the verifier's log (empty when the kernel wrote none).
    pub(crate) log: String,
}

/// Load a tc classifier program.
pub(crate) fn prog_load(name: &str, insns: &[Insn], license: &CStr) -> Result<OwnedFd, LoadError> {
    let code: Vec<u8> = insns.iter().flat_map(|i| i.to_bytes()).collect();
    let count = u32::try_from(insns.len()).map_err(|_| LoadError {
        source: io::Error::other("the program is too long"),
        log: String::new(),
    })?;
    let load = |log: Option<&mut Vec<u8>>| {
        let mut attr = Attr::new();
        attr.u32(0, PROG_SCHED_CLS)
            .u32(4, count)
            .ptr(8, code.as_ptr())
            .ptr(16, license.as_ptr())
            .name(48, name);
        if let Some(buf) = log {
            attr.u32(24, 1)
                .u32(28, LOG_SIZE as u32)
                .ptr(32, buf.as_mut_ptr());
        }
        attr.call_fd(BPF_PROG_LOAD)
    };
    match load(None) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            // Load again with the log on, to say why.
            let mut buf = vec![0u8; LOG_SIZE];
            let source = match load(Some(&mut buf)) {
                Ok(fd) => return Ok(fd),
                Err(e) => e,
            };
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            let text = String::from_utf8_lossy(&buf[..end]);
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            let log = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
            Err(LoadError {
                source: if log.is_empty() { first } else { source },
                log,
            })
        }
    }
}

fn fd_u32(fd: &OwnedFd) -> u32 {
    // Descriptors are never negative.
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}
