//! The container's filesystem view, set up inside its mount namespace before it execs: the spec's
//! mounts (proc, /dev, devpts, shm, mqueue, sysfs, volumes) at paths resolved inside the root
//! (a symlink in the image cannot send a mount outside it), the minimal device nodes, then
//! `pivot_root`, then masked and read-only paths.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::unistd::{chdir, pivot_root};
use oci_spec::runtime::{Mount, Spec};

/// Errors say which path and which step.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {reason}")]
pub struct MountError {
    pub what: &'static str,
    pub path: String,
    pub reason: String,
}

fn err(what: &'static str, path: impl AsRef<Path>, reason: impl ToString) -> MountError {
    MountError {
        what,
        path: path.as_ref().display().to_string(),
        reason: reason.to_string(),
    }
}

/// Device files bind-mounted from the host (no mknod needed, works the same everywhere).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// mount(2) flags and the filesystem-specific data from OCI mount options.
pub fn parse_options(options: &[String]) -> (MsFlags, MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "private" => propagation |= MsFlags::MS_PRIVATE,
            "rprivate" => propagation |= MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            "slave" => propagation |= MsFlags::MS_SLAVE,
            "rslave" => propagation |= MsFlags::MS_SLAVE | MsFlags::MS_REC,
            "shared" => propagation |= MsFlags::MS_SHARED,
            "rshared" => propagation |= MsFlags::MS_SHARED | MsFlags::MS_REC,
            "suid" | "dev" | "exec" | "atime" | "async" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, propagation, data.join(","))
}

/// `rootfs` + `path`, resolving symlinks as if `rootfs` were `/` (like filepath-securejoin):
/// the result is always inside `rootfs`.
pub fn resolve_in_root(rootfs: &Path, path: &Path) -> Result<PathBuf, MountError> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = path
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.components().next() {
            Some(Component::RootDir) | Some(Component::CurDir) | None => continue,
            Some(Component::ParentDir) => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = resolved.join(&part);
        let full = rootfs.join(&candidate);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(err("resolve", path, "too many levels of symbolic links"));
                }
                let target = fs::read_link(&full).map_err(|e| err("read link", &full, e))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                pending.extend(
                    target
                        .components()
                        .rev()
                        .map(|c| PathBuf::from(c.as_os_str())),
                );
            }
            _ => resolved = candidate,
        }
    }
    Ok(rootfs.join(resolved))
}

/// Create what a mount at `dest` needs: a directory, or an empty file for a file bind mount.
fn ensure_target(dest: &Path, file: bool) -> Result<(), MountError> {
    if dest.exists() {
        return Ok(());
    }
    if file {
        if let Some(p) = dest.parent() {
            fs::create_dir_all(p).map_err(|e| err("create", p, e))?;
        }
        fs::write(dest, b"").map_err(|e| err("create", dest, e))
    } else {
        fs::create_dir_all(dest).map_err(|e| err("create", dest, e))
    }
}

/// What a `cgroup` mount shows: the container's own cgroup, as cgroup2 or as one directory per
/// v1 hierarchy (`name` under /sys/fs/cgroup, the container's directory in it).
#[derive(Debug, Clone, Default)]
pub enum CgroupView {
    #[default]
    V2,
    V1(Vec<(String, PathBuf)>),
}

/// A `cgroup` mount: cgroup2 on a v2 host; on v1 a tmpfs holding a read-only bind of the
/// container's directory of every hierarchy (a new v1 mount is refused in a cgroup namespace).
fn mount_cgroup(dest: &Path, flags: MsFlags, view: &CgroupView) -> Result<(), MountError> {
    let base = flags & (MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    match view {
        CgroupView::V2 => mount(Some("cgroup2"), dest, Some("cgroup2"), flags, None::<&str>)
            .map_err(|e| err("mount cgroup2 at", dest, e)),
        CgroupView::V1(dirs) => {
            mount(Some("tmpfs"), dest, Some("tmpfs"), base, Some("mode=755"))
                .map_err(|e| err("mount tmpfs at", dest, e))?;
            for (name, host_dir) in dirs {
                let target = dest.join(name);
                ensure_target(&target, false)?;
                mount(
                    Some(host_dir.as_path()),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| err("bind cgroup", &target, e))?;
                mount(
                    None::<&str>,
                    &target,
                    None::<&str>,
                    base | MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .map_err(|e| err("make read-only", &target, e))?;
            }
            if flags.contains(MsFlags::MS_RDONLY) {
                mount(
                    None::<&str>,
                    dest,
                    None::<&str>,
                    base | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    Some("mode=755"),
                )
                .map_err(|e| err("make read-only", dest, e))?;
            }
            Ok(())
        }
    }
}

fn mount_one(rootfs: &Path, m: &Mount, cgroups: &CgroupView) -> Result<(), MountError> {
    let options = m.options().clone().unwrap_or_default();
    let (flags, propagation, data) = parse_options(&options);
    let typ = m.typ().clone().unwrap_or_else(|| "none".into());
    let dest = resolve_in_root(rootfs, m.destination())?;
    if typ == "cgroup" || typ == "cgroup2" {
        ensure_target(&dest, false)?;
        return mount_cgroup(&dest, flags, cgroups);
    }
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(&typ));
    let is_bind = flags.contains(MsFlags::MS_BIND) || typ == "bind";
    let file_bind = is_bind && source.metadata().map(|md| !md.is_dir()).unwrap_or(false);
    ensure_target(&dest, file_bind)?;
    let data = (!data.is_empty()).then_some(data.as_str());
    if is_bind {
        mount(
            Some(&source),
            &dest,
            None::<&str>,
            flags | MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            err(
                "bind-mount onto",
                m.destination(),
                format!("{} ({e})", source.display()),
            )
        })?;
        // Bind mounts ignore most flags until remounted.
        let extra = flags
            & (MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                extra | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None::<&str>,
            )
            .map_err(|e| err("remount", m.destination(), e))?;
        }
    } else {
        mount(Some(&source), &dest, Some(typ.as_str()), flags, data)
            .map_err(|e| err("mount", m.destination(), format!("{typ}: {e}")))?;
    }
    if !propagation.is_empty() {
        mount(None::<&str>, &dest, None::<&str>, propagation, None::<&str>)
            .map_err(|e| err("set propagation of", m.destination(), e))?;
    }
    Ok(())
}

/// Everything before pivot_root: private propagation, the rootfs as a mount, the spec's mounts,
/// device nodes and /dev links.
pub fn prepare_rootfs(spec: &Spec, rootfs: &Path, cgroups: &CgroupView) -> Result<(), MountError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err("make private", "/", e))?;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err("bind-mount", rootfs, e))?;
    for m in spec.mounts().iter().flatten() {
        mount_one(rootfs, m, cgroups)?;
    }
    let dev = resolve_in_root(rootfs, Path::new("/dev"))?;
    for name in DEVICES {
        let target = dev.join(name);
        if fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        ensure_target(&target, true)?;
        mount(
            Some(&Path::new("/dev").join(name)),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| err("bind-mount device", &target, e))?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let path = dev.join(link);
        if fs::symlink_metadata(&path).is_err() {
            symlink(to, &path).map_err(|e| err("link", &path, e))?;
        }
    }
    Ok(())
}

/// Make `rootfs` the root: `pivot_root(".", ".")` and lazily unmount the old root (runc's way,
/// no temporary directory needed).
pub fn pivot_into(rootfs: &Path) -> Result<(), MountError> {
    chdir(rootfs).map_err(|e| err("chdir", rootfs, e))?;
    pivot_root(".", ".").map_err(|e| err("pivot_root", rootfs, e))?;
    // The old root is stacked on top of the new one: make it private, then detach it.
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err("make slave", "old root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("unmount", "old root", e))?;
    chdir("/").map_err(|e| err("chdir", "/", e))
}

/// After pivot_root: hide masked paths (a dir gets an empty read-only tmpfs, a file /dev/null)
/// and make read-only paths read-only. Paths that do not exist are skipped.
pub fn protect_paths(spec: &Spec) -> Result<(), MountError> {
    let linux = spec.linux().clone().unwrap_or_default();
    for p in linux.masked_paths().iter().flatten() {
        let path = Path::new(p);
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            ),
            Ok(_) => mount(
                Some("/dev/null"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
            Err(_) => continue,
        }
        .map_err(|e| err("mask", path, e))?;
    }
    for p in linux.readonly_paths().iter().flatten() {
        let path = Path::new(p);
        if fs::symlink_metadata(path).is_err() {
            continue;
        }
        mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| err("bind", path, e))?;
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC;
        mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
            .map_err(|e| err("make read-only", path, e))?;
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| err("make read-only", "/", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (f, p, d) = parse_options(&o(&["nosuid", "strictatime", "mode=755", "size=65536k"]));
        assert!(f.contains(MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME) && p.is_empty());
        assert_eq!(d, "mode=755,size=65536k");
        let (f, p, d) = parse_options(&o(&["rbind", "rprivate", "ro"]));
        assert!(f.contains(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY));
        assert_eq!(p, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert!(d.is_empty());
    }

    #[test]
    fn symlinks_resolve_inside_the_root() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let r = root.path();
        fs::create_dir_all(r.join("real/dir"))?;
        symlink("/real", r.join("abs"))?;
        symlink("../../../../etc", r.join("escape"))?;
        symlink("loop", r.join("loop"))?;
        assert_eq!(
            resolve_in_root(r, Path::new("/abs/dir"))?,
            r.join("real/dir")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/escape/passwd"))?,
            r.join("etc/passwd")
        );
        assert_eq!(resolve_in_root(r, Path::new("/../../x"))?, r.join("x"));
        assert!(resolve_in_root(r, Path::new("/loop/x")).is_err());
        Ok(())
    }
}
