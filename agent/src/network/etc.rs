//! Writing a container's `/etc/hosts` and `/etc/resolv.conf` into its rootfs without ever
//! following a symlink of the image out of it: `/etc` is opened with `RESOLVE_IN_ROOT`, and the
//! file is replaced (unlinked, then created exclusively without following links), so an image
//! whose `/etc/hosts` is a symlink cannot make the agent write anywhere else.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Replace `/etc/NAME` inside `rootfs` with `text` (mode 0644).
pub(crate) fn write_etc_file(rootfs: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let root = File::open(rootfs)?;
    let etc = match open_in_root(&root, "etc") {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => {
            mkdirat(root.as_fd(), "etc", Mode::from_bits_truncate(0o755))?;
            open_in_root(&root, "etc")?
        }
        Err(e) => return Err(e.into()),
    };
    match unlinkat(etc.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let fd = openat(
        etc.as_fd(),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    let mut file = File::from(fd);
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn open_in_root(root: &File, rel: &str) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(root.as_fd(), rel, how)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stay_inside_the_rootfs() -> Result<(), Box<dyn std::error::Error>> {
        let outside = tempfile::tempdir()?;
        let rootfs = tempfile::tempdir()?;
        // An image whose /etc points at the host's (here: another directory) and whose hosts
        // file is a symlink out.
        std::fs::write(outside.path().join("hosts"), "host file")?;
        std::os::unix::fs::symlink(outside.path(), rootfs.path().join("etc"))?;
        // Refused (inside the rootfs that link leads nowhere), and nothing outside changes.
        assert!(write_etc_file(rootfs.path(), "hosts", "10.88.0.2 web\n").is_err());
        assert_eq!(
            std::fs::read_to_string(outside.path().join("hosts"))?,
            "host file"
        );

        let rootfs2 = tempfile::tempdir()?;
        std::fs::create_dir(rootfs2.path().join("etc"))?;
        std::os::unix::fs::symlink(
            outside.path().join("hosts"),
            rootfs2.path().join("etc/hosts"),
        )?;
        write_etc_file(rootfs2.path(), "hosts", "10.88.0.3 web\n")?;
        assert_eq!(
            std::fs::read_to_string(outside.path().join("hosts"))?,
            "host file"
        );
        assert_eq!(
            std::fs::read_to_string(rootfs2.path().join("etc/hosts"))?,
            "10.88.0.3 web\n"
        );

        let empty = tempfile::tempdir()?;
        write_etc_file(empty.path(), "resolv.conf", "nameserver 10.88.0.1\n")?;
        assert_eq!(
            std::fs::read_to_string(empty.path().join("etc/resolv.conf"))?,
            "nameserver 10.88.0.1\n"
        );
        Ok(())
    }
}
