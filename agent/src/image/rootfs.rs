//! A container's root filesystem: an overlay mount whose lower dirs are its image's unpacked
//! layers (shared, never written) and whose upper and work dirs belong to the container.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::error::{ImageError, Result};

/// mount(2) copies at most one page of options.
const MAX_OPTIONS: usize = 4095;

/// A mounted container rootfs. Not unmounted on drop: the runtime decides when it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    /// The merged view (`<container dir>/rootfs`).
    pub path: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// Mount `lowers` (bottom layer first) with `container_dir/upper` and `container_dir/work` at
/// `container_dir/rootfs`. Mounting an already-mounted rootfs is an error.
pub fn mount_rootfs(lowers: &[PathBuf], container_dir: &Path) -> Result<Rootfs> {
    if lowers.is_empty() {
        return Err(ImageError::Mount(
            "an image without layers has no root filesystem".into(),
        ));
    }
    let rootfs = Rootfs {
        path: container_dir.join("rootfs"),
        upper: container_dir.join("upper"),
        work: container_dir.join("work"),
    };
    for dir in [&rootfs.path, &rootfs.upper, &rootfs.work] {
        fs::create_dir_all(dir).map_err(ImageError::io("create rootfs dir", dir))?;
    }
    if is_mounted(&rootfs.path)? {
        return Err(ImageError::Mount(format!(
            "{} is already mounted",
            rootfs.path.display()
        )));
    }
    let options = overlay_options(lowers, &rootfs.upper, &rootfs.work)?;
    mount(
        Some("overlay"),
        &rootfs.path,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| ImageError::Mount(format!("mount overlay at {}: {e}", rootfs.path.display())))?;
    Ok(rootfs)
}

/// overlayfs options: lowerdir lists the top layer first.
fn overlay_options(lowers: &[PathBuf], upper: &Path, work: &Path) -> Result<String> {
    let text = |p: &Path| -> Result<String> {
        let s = p
            .to_str()
            .ok_or_else(|| ImageError::Mount(format!("{} is not UTF-8", p.display())))?;
        if s.contains([':', ',']) {
            return Err(ImageError::Mount(format!(
                "overlay paths cannot contain ':' or ',': {s}"
            )));
        }
        Ok(s.to_string())
    };
    let lower: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| text(p))
        .collect::<Result<_>>()?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        text(upper)?,
        text(work)?
    );
    if options.len() > MAX_OPTIONS {
        return Err(ImageError::Mount(format!(
            "{} layers do not fit in one overlay mount's options ({} bytes, at most {MAX_OPTIONS}): use a shorter data dir",
            lowers.len(),
            options.len()
        )));
    }
    Ok(options)
}

/// Unmount a rootfs (lazily if it is busy); its upper dir stays until `remove_rootfs`.
pub fn unmount_rootfs(rootfs: &Rootfs) -> Result<()> {
    if !is_mounted(&rootfs.path)? {
        return Ok(());
    }
    match umount2(&rootfs.path, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => umount2(&rootfs.path, MntFlags::MNT_DETACH)
            .map_err(|e| ImageError::Mount(format!("unmount {}: {e}", rootfs.path.display()))),
        Err(e) => Err(ImageError::Mount(format!(
            "unmount {}: {e}",
            rootfs.path.display()
        ))),
    }
}

/// Unmount and delete the container's upper, work and mount point dirs.
pub fn remove_rootfs(rootfs: &Rootfs) -> Result<()> {
    unmount_rootfs(rootfs)?;
    for dir in [&rootfs.path, &rootfs.upper, &rootfs.work] {
        match fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io("remove rootfs dir", dir)(e)),
        }
    }
    Ok(())
}

/// Whether `path` is a mount point in this mount namespace.
pub fn is_mounted(path: &Path) -> Result<bool> {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(mounts()?.iter().any(|m| m.mount_point == path))
}

/// One line of /proc/self/mountinfo, as much as the store needs.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub super_options: String,
}

pub fn mounts() -> Result<Vec<MountInfo>> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(ImageError::io("read", path))?;
    Ok(text.lines().filter_map(parse_mountinfo).collect())
}

fn parse_mountinfo(line: &str) -> Option<MountInfo> {
    // id parent major:minor root mount-point options [optional...] - fstype source super-options
    let (left, right) = line.split_once(" - ")?;
    let mount_point = unescape(left.split(' ').nth(4)?);
    let mut r = right.split(' ');
    let fs_type = r.next()?.to_string();
    let _source = r.next()?;
    let super_options = r.next().unwrap_or("").to_string();
    Some(MountInfo {
        mount_point: PathBuf::from(mount_point),
        fs_type,
        super_options,
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_list_the_top_layer_first_and_refuse_what_overlay_cannot_parse() -> Result<()> {
        let lowers = [PathBuf::from("/d/layers/a"), PathBuf::from("/d/layers/b")];
        assert_eq!(
            overlay_options(&lowers, Path::new("/c/upper"), Path::new("/c/work"))?,
            "lowerdir=/d/layers/b:/d/layers/a,upperdir=/c/upper,workdir=/c/work"
        );
        assert!(
            overlay_options(&[PathBuf::from("/d:x")], Path::new("/u"), Path::new("/w")).is_err()
        );
        let many: Vec<PathBuf> = (0..100)
            .map(|i| PathBuf::from(format!("/var/lib/tug/images/layers/{i:064}")))
            .collect();
        assert!(overlay_options(&many, Path::new("/u"), Path::new("/w")).is_err());
        Ok(())
    }

    #[test]
    fn mountinfo_lines_parse() {
        let line = r"36 35 98:0 / /mnt/with\040space rw,noatime master:1 - overlay overlay rw,lowerdir=/a:/b,upperdir=/u,workdir=/w";
        let m = parse_mountinfo(line);
        assert_eq!(
            m.as_ref().map(|m| m.mount_point.clone()),
            Some(PathBuf::from("/mnt/with space"))
        );
        assert_eq!(m.as_ref().map(|m| m.fs_type.as_str()), Some("overlay"));
        assert!(m.is_some_and(|m| m.super_options.contains("lowerdir=/a:/b")));
    }
}
