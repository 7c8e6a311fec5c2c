//! File-system operations inside the destination directory that never resolve a symlink.
//!
//! Every path is walked one component at a time with `openat(dirfd, comp, O_DIRECTORY |
//! O_NOFOLLOW)`, starting from an fd of the destination, and every entry is created, replaced or
//! removed relative to its parent's fd (`mkdirat`, `openat(O_CREAT | O_EXCL | O_NOFOLLOW)`,
//! `symlinkat`, `linkat`, `mknodat`, `unlinkat`). A symlink met on the way is reported, never
//! followed, so nothing the layer contains can make us write outside the destination.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstatat, mkdirat, mknodat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};

/// Flags for opening a directory component without following a symlink.
const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_RDONLY)
    .union(OFlag::O_CLOEXEC);

/// Mode of directories the layer needs but has no entry for (like `tar` and containerd do).
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// A failed system call: what we were doing, and the error number.
#[derive(Debug, Clone, Copy)]
pub(super) struct OpError {
    pub(super) op: &'static str,
    pub(super) errno: Errno,
}

/// Tags a `nix` error with the operation, for `map_err`.
pub(super) fn op(op: &'static str) -> impl FnOnce(Errno) -> OpError {
    move |errno| OpError { op, errno }
}

/// Why walking down a path stopped; the index is that of the offending component.
#[derive(Debug)]
pub(super) enum WalkError {
    /// The component is a symlink.
    Symlink(usize),
    /// The component exists but is neither a directory nor a symlink.
    NotDir(usize),
    /// A component does not exist (only when not creating).
    Missing,
    /// A system call failed.
    Os(OpError),
}

/// The destination directory, plus the most recently used parent directory.
///
/// The cache holds the parent of the last entry created (none when that was the root). It cannot
/// go stale: an entry only ever removes or replaces its own path, a child of its parent, which is
/// the cached directory at that moment, never the cached directory itself or one of its
/// ancestors; an entry whose parent differs from the cached one walks afresh.
#[derive(Debug)]
pub(super) struct Tree {
    root: OwnedFd,
    cache: Option<(Vec<OsString>, OwnedFd)>,
}

impl Tree {
    /// Opens the destination directory (which the caller created; its own path may contain
    /// symlinks, as it is not layer data).
    pub(super) fn open(dest: &Path) -> Result<Tree, Errno> {
        let root = nix::fcntl::open(
            dest,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Tree { root, cache: None })
    }

    /// The destination directory itself.
    pub(super) fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The directory at `comps`, creating missing directories on the way (mode 0755, owned by
    /// us). Refuses to go through a symlink or a non-directory.
    pub(super) fn dir(&mut self, comps: &[OsString]) -> Result<BorrowedFd<'_>, WalkError> {
        if comps.is_empty() {
            // The root is the parent now: forget the cached directory, which an entry directly
            // in the root could remove (its path being the cached directory's ancestor).
            self.cache = None;
            return Ok(self.root.as_fd());
        }
        let entry = match self.cache.take() {
            Some((key, fd)) if key.as_slice() == comps => (key, fd),
            _ => (comps.to_vec(), walk(self.root.as_fd(), comps, true)?),
        };
        let slot: &(Vec<OsString>, OwnedFd) = self.cache.insert(entry);
        Ok(slot.1.as_fd())
    }

    /// The existing directory at `comps`, without creating anything or touching the cache.
    pub(super) fn existing_dir(&self, comps: &[OsString]) -> Result<OwnedFd, WalkError> {
        walk(self.root.as_fd(), comps, false)
    }
}

/// Walks `comps` from `root`, one `openat(O_DIRECTORY | O_NOFOLLOW)` at a time.
fn walk(root: BorrowedFd<'_>, comps: &[OsString], create: bool) -> Result<OwnedFd, WalkError> {
    let mut cur: Option<OwnedFd> = None;
    for (i, comp) in comps.iter().enumerate() {
        let dir = match &cur {
            Some(fd) => fd.as_fd(),
            None => root,
        };
        cur = Some(open_dir(dir, comp, create, i)?);
    }
    match cur {
        Some(fd) => Ok(fd),
        None => root
            .try_clone_to_owned()
            .map_err(|e| WalkError::Os(errno_of("duplicate the directory fd", &e))),
    }
}

fn errno_of(op: &'static str, e: &std::io::Error) -> OpError {
    OpError {
        op,
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    }
}

/// Opens the directory `name` in `dir`, creating it first if asked and missing.
fn open_dir(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    create: bool,
    index: usize,
) -> Result<OwnedFd, WalkError> {
    match openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => return Ok(fd),
        Err(Errno::ENOENT) if create => {}
        Err(Errno::ENOENT) => return Err(WalkError::Missing),
        Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(classify(dir, name, index)),
        Err(errno) => {
            return Err(WalkError::Os(OpError {
                op: "open directory",
                errno,
            }));
        }
    }
    let mode = Mode::from_bits_truncate(IMPLICIT_DIR_MODE);
    match mkdirat(dir, name, mode) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(errno) => {
            return Err(WalkError::Os(OpError {
                op: "create directory",
                errno,
            }));
        }
    }
    let fd = match openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(classify(dir, name, index)),
        Err(errno) => {
            return Err(WalkError::Os(OpError {
                op: "open directory",
                errno,
            }));
        }
    };
    // mkdirat's mode went through the umask; set the intended one.
    fchmod(&fd, mode).map_err(|errno| WalkError::Os(OpError { op: "chmod", errno }))?;
    Ok(fd)
}

/// Tells why `name` in `dir` could not be opened as a directory.
fn classify(dir: BorrowedFd<'_>, name: &OsStr, index: usize) -> WalkError {
    match lstat_at(dir, name) {
        Ok(Some(st)) if is_kind(&st, SFlag::S_IFLNK) => WalkError::Symlink(index),
        Ok(Some(_)) => WalkError::NotDir(index),
        Ok(None) => WalkError::Missing,
        Err(e) => WalkError::Os(e),
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` if it does not exist.
pub(super) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<FileStat>, OpError> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(errno) => Err(OpError { op: "stat", errno }),
    }
}

/// Whether a stat result is of the given file type.
pub(super) fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind
}

/// Whether a stat result is an overlayfs whiteout (a character device 0/0).
fn is_whiteout_device(st: &FileStat) -> bool {
    is_kind(st, SFlag::S_IFCHR) && st.st_rdev == 0
}

/// Removes `name` from `dir`, with everything below it if it is a directory; no-op if missing.
pub(super) fn remove(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), OpError> {
    match lstat_at(dir, name)? {
        None => Ok(()),
        Some(st) if is_kind(&st, SFlag::S_IFDIR) => remove_dir_all(dir, name),
        Some(_) => unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(op("remove")),
    }
}

/// Removes the directory `name` in `dir` and its contents, without following symlinks. The
/// recursion depth is bounded by [`super::safe_path::MAX_PATH_BYTES`].
fn remove_dir_all(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), OpError> {
    let fd = openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(op("open directory"))?;
    let children: Vec<(OsString, bool)> = {
        let listing = fd
            .try_clone()
            .map_err(|e| errno_of("duplicate the directory fd", &e))?;
        let mut listing = nix::dir::Dir::from_fd(listing).map_err(op("list directory"))?;
        let mut children = Vec::new();
        for child in listing.iter() {
            let child = child.map_err(op("list directory"))?;
            let child_name = child.file_name().to_bytes();
            if child_name == b"." || child_name == b".." {
                continue;
            }
            let is_dir = child.file_type().map(|t| t == nix::dir::Type::Directory);
            children.push((
                OsStr::from_bytes(child_name).to_os_string(),
                is_dir.unwrap_or(false),
            ));
        }
        children
    };
    for (child, is_dir) in children {
        if is_dir {
            remove_dir_all(fd.as_fd(), &child)?;
        } else {
            // d_type may be unknown on some file systems: `remove` stats when in doubt.
            remove(fd.as_fd(), &child)?;
        }
    }
    unlinkat(dir, name, UnlinkatFlags::RemoveDir).map_err(op("remove directory"))
}

/// Creates the regular file `name` in `dir` (mode 0600 until the caller sets the real one),
/// replacing whatever an earlier entry put there. Never opens through a symlink.
pub(super) fn create_file(dir: BorrowedFd<'_>, name: &OsStr) -> Result<File, OpError> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mode = Mode::from_bits_truncate(0o600);
    let fd = match openat(dir, name, flags, mode) {
        Err(Errno::EEXIST) => {
            remove(dir, name)?;
            openat(dir, name, flags, mode)
        }
        other => other,
    }
    .map_err(op("create file"))?;
    Ok(File::from(fd))
}

/// Creates the directory `name` in `dir`, or reuses the directory an earlier entry made (a
/// directory over a directory merges); anything else there is replaced. Returns the open
/// directory and whether it replaced an overlayfs whiteout device of this same layer.
pub(super) fn create_dir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(File, bool), OpError> {
    let mode = Mode::from_bits_truncate(0o700);
    let mut replaced_whiteout = false;
    match mkdirat(dir, name, mode) {
        Ok(()) => {}
        Err(Errno::EEXIST) => match lstat_at(dir, name)? {
            Some(st) if is_kind(&st, SFlag::S_IFDIR) => {}
            existing => {
                replaced_whiteout = existing.as_ref().is_some_and(is_whiteout_device);
                remove(dir, name)?;
                mkdirat(dir, name, mode).map_err(op("create directory"))?;
            }
        },
        Err(errno) => {
            return Err(OpError {
                op: "create directory",
                errno,
            });
        }
    }
    let fd = openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(op("open directory"))?;
    Ok((File::from(fd), replaced_whiteout))
}

/// Opens the existing directory `name` in `dir`, without following a symlink.
pub(super) fn open_child_dir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<File, OpError> {
    let fd = openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(op("open directory"))?;
    Ok(File::from(fd))
}

/// Creates the symlink `name -> target` in `dir`, replacing whatever was there.
pub(super) fn create_symlink(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    target: &OsStr,
) -> Result<(), OpError> {
    match symlinkat(target, dir, name) {
        Err(Errno::EEXIST) => {
            remove(dir, name)?;
            symlinkat(target, dir, name)
        }
        other => other,
    }
    .map_err(op("create symlink"))
}

/// Creates the device node or fifo `name` in `dir` (mode 0600 until the caller sets the real
/// one), replacing whatever was there. `EPERM` is passed through untagged for the caller to judge.
pub(super) fn create_node(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    kind: SFlag,
    dev: u64,
) -> Result<(), OpError> {
    let mode = Mode::from_bits_truncate(0o600);
    match mknodat(dir, name, kind, mode, dev) {
        Err(Errno::EEXIST) => {
            remove(dir, name)?;
            mknodat(dir, name, kind, mode, dev)
        }
        other => other,
    }
    .map_err(op("create device node or fifo"))
}

/// Hard-links `target_name` in `target_dir` as `name` in `dir`, replacing whatever was at `name`
/// unless it already is the same file. Never follows a symlink (`linkat` without
/// `AT_SYMLINK_FOLLOW` links a symlink itself).
pub(super) fn create_hard_link(
    target_dir: BorrowedFd<'_>,
    target_name: &OsStr,
    target: &FileStat,
    dir: BorrowedFd<'_>,
    name: &OsStr,
) -> Result<(), OpError> {
    if let Some(existing) = lstat_at(dir, name)? {
        if existing.st_dev == target.st_dev && existing.st_ino == target.st_ino {
            return Ok(());
        }
        remove(dir, name)?;
    }
    linkat(target_dir, target_name, dir, name, AtFlags::empty()).map_err(op("create hard link"))
}

/// What a whiteout did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Whiteout {
    /// Created the character device 0/0.
    Created,
    /// This layer already has a directory of that name: the caller marks it opaque (the layer's
    /// own directory survives, the lower layers' contents of it do not).
    ExistingDir,
    /// This layer already has a non-directory of that name, which hides the lower layers' one by
    /// itself: nothing to do.
    ExistingOther,
}

/// Turns the OCI whiteout of `name` in `dir` into overlayfs's form: a character device 0/0,
/// owned by root.
///
/// OCI says a whiteout only deletes from the lower layers, never an entry of its own layer, so an
/// entry this layer already has under that name is kept.
pub(super) fn create_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Whiteout, OpError> {
    match lstat_at(dir, name)? {
        Some(st) if is_kind(&st, SFlag::S_IFDIR) => return Ok(Whiteout::ExistingDir),
        Some(_) => return Ok(Whiteout::ExistingOther),
        None => {}
    }
    mknodat(dir, name, SFlag::S_IFCHR, Mode::empty(), 0).map_err(op("create whiteout device"))?;
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(0)),
        Some(Gid::from_raw(0)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(op("chown whiteout device"))?;
    Ok(Whiteout::Created)
}
