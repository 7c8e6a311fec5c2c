//! `user[:group]` resolved the way Docker does: numbers are taken as they are; names are looked up
//! in the container's own /etc/passwd and /etc/group. The files are opened with
//! `RESOLVE_IN_ROOT`, so a symlink in the image cannot make us read a file of the host.

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("unknown user {0:?}: not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("unknown group {0:?}: not in the image's /etc/group")]
    UnknownGroup(String),
    #[error("cannot read {file} in the container's root filesystem: {source}")]
    Read {
        file: &'static str,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub home: Option<String>,
}

/// Resolve `spec` ("", "name", "uid", "name:group", "uid:gid") against `rootfs`.
pub fn resolve(rootfs: &Path, spec: &str) -> Result<ResolvedUser, UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let passwd = read_in_root(rootfs, "etc/passwd")?;
    let groups = read_in_root(rootfs, "etc/group")?;
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == user || (user.parse::<u32>().is_ok() && f[2] == user)));
    let (uid, mut gid, home, name) = match (&entry, user.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse()
                .map_err(|_| UserError::UnknownUser(user.into()))?,
            f[3].parse()
                .map_err(|_| UserError::UnknownUser(user.into()))?,
            Some(f[5].to_string()),
            Some(f[0].to_string()),
        ),
        (None, Ok(uid)) => (uid, uid, None, None),
        (None, Err(_)) => return Err(UserError::UnknownUser(user.into())),
    };
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| UserError::UnknownGroup(g.into()))?,
        };
    }
    // Supplementary groups: every group that lists the user by name.
    let mut additional_gids: Vec<u32> = match &name {
        Some(n) => groups
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m == n))
            .filter_map(|f| f[2].parse().ok())
            .filter(|g| *g != gid)
            .collect(),
        None => Vec::new(),
    };
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

/// The file's text, or "" if the image has none.
fn read_in_root(rootfs: &Path, rel: &'static str) -> Result<String, UserError> {
    let err = |source| UserError::Read { file: rel, source };
    let root = File::open(rootfs).map_err(err)?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(&root, rel, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(String::new()),
        Err(e) => return Err(err(e.into())),
    };
    // SAFETY: openat2 returned a fresh descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(err)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("etc"))?;
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000::/home/web:/bin/sh\n",
        )?;
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nweb:x:1000:\nlog:x:4:web,root\ndocker:x:999:web\n",
        )?;
        Ok(dir)
    }

    #[test]
    fn names_numbers_and_groups() -> Result<(), Box<dyn std::error::Error>> {
        let r = rootfs()?;
        assert_eq!(
            resolve(r.path(), "")?,
            ResolvedUser {
                uid: 0,
                gid: 0,
                additional_gids: vec![4],
                home: Some("/root".into())
            }
        );
        let web = resolve(r.path(), "web")?;
        assert_eq!(
            (web.uid, web.gid, web.additional_gids),
            (1000, 1000, vec![4, 999])
        );
        assert_eq!(resolve(r.path(), "web:log")?.gid, 4);
        assert_eq!(resolve(r.path(), "1000:5")?.gid, 5);
        assert_eq!(
            resolve(r.path(), "4242")?,
            ResolvedUser {
                uid: 4242,
                gid: 4242,
                additional_gids: vec![],
                home: None
            }
        );
        assert!(matches!(
            resolve(r.path(), "nobody"),
            Err(UserError::UnknownUser(_))
        ));
        assert!(matches!(
            resolve(r.path(), "web:nogroup"),
            Err(UserError::UnknownGroup(_))
        ));
        Ok(())
    }

    #[test]
    fn a_symlink_cannot_point_at_the_hosts_files() -> Result<(), Box<dyn std::error::Error>> {
        let r = tempfile::tempdir()?;
        std::fs::create_dir_all(r.path().join("etc"))?;
        // Followed on the host this would read the host's passwd; inside the root it names
        // <rootfs>/etc/shadow-copy, which does not exist.
        std::os::unix::fs::symlink(
            "../../../../etc/passwd-not-here/../passwd",
            r.path().join("etc/passwd"),
        )?;
        std::os::unix::fs::symlink("/../../etc/gshadow-not-in-root", r.path().join("etc/group"))?;
        assert!(
            resolve(r.path(), "root").is_err(),
            "read a file outside the rootfs"
        );
        assert_eq!(resolve(r.path(), "0:0")?.uid, 0, "numbers need no files");
        Ok(())
    }
}
