//! The metadata of an entry (owner, mode, times, extended attributes): reading it from the tar
//! header and PAX records, and applying it without following symlinks.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{FchmodatFlags, Mode, UtimensatFlags, fchmod, fchmodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchown, fchownat};
use xattr::FileExt;

use super::UnpackError;
use super::tree::OpError;

/// The xattr overlayfs reads to treat a directory as opaque.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// PAX record prefix carrying an extended attribute (as written by GNU tar, Docker, BuildKit).
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// Ownership, permissions, times and extended attributes of one entry.
#[derive(Debug)]
pub(super) struct Meta {
    pub(super) mode: Mode,
    pub(super) uid: Uid,
    pub(super) gid: Gid,
    pub(super) atime: TimeSpec,
    pub(super) mtime: TimeSpec,
    pub(super) xattrs: Vec<(OsString, Vec<u8>)>,
}

/// What the PAX records of an entry add to its header (`path`, `linkpath`, `size`, `uid` and
/// `gid` are applied by the `tar` crate itself).
#[derive(Debug, Default)]
pub(super) struct Pax {
    xattrs: Vec<(OsString, Vec<u8>)>,
    mtime: Option<(i64, i64)>,
    atime: Option<(i64, i64)>,
}

/// Where to set extended attributes: an open file, or a path (symlinks, device nodes, fifos,
/// which cannot be opened safely) whose parents were just checked to be real directories.
enum XattrTarget<'a> {
    Fd(&'a File),
    Path(&'a Path),
}

/// Reads the PAX records of an entry that we apply ourselves.
pub(super) fn read_pax<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    shown: &str,
) -> Result<Pax, UnpackError> {
    let mut pax = Pax::default();
    let records = entry.pax_extensions().map_err(|source| UnpackError::Tar {
        at: format!("in the PAX header of entry {shown:?}"),
        source,
    })?;
    let Some(records) = records else {
        return Ok(pax);
    };
    for record in records {
        let record = record.map_err(|e| UnpackError::header(shown, "PAX record", e))?;
        let key = record.key_bytes();
        if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
            if name.is_empty() {
                return Err(UnpackError::header(
                    shown,
                    "PAX record",
                    "an xattr record has no name",
                ));
            }
            if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
                // These would change how overlayfs reads this layer (whiteouts, redirects).
                tracing::warn!(
                    entry = %shown,
                    xattr = %String::from_utf8_lossy(name),
                    "ignoring an overlayfs-private extended attribute carried by the layer"
                );
                continue;
            }
            pax.xattrs.push((
                OsStr::from_bytes(name).to_owned(),
                record.value_bytes().to_vec(),
            ));
        } else if key == b"mtime" || key == b"atime" {
            let value = record.value_bytes();
            let time = parse_pax_time(value).ok_or_else(|| {
                UnpackError::header(
                    shown,
                    "PAX time",
                    format!(
                        "{:?} is not a decimal number of seconds",
                        String::from_utf8_lossy(value)
                    ),
                )
            })?;
            if key == b"mtime" {
                pax.mtime = Some(time);
            } else {
                pax.atime = Some(time);
            }
        }
    }
    Ok(pax)
}

/// Parses a PAX time (`-?\d+(\.\d+)?` seconds) into seconds and nanoseconds (`0..1e9`).
fn parse_pax_time(value: &[u8]) -> Option<(i64, i64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let frac = frac.get(..frac.len().min(9))?;
    let mut nanos: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..9 {
        nanos *= 10;
    }
    Some(match (negative, nanos) {
        (false, _) => (secs, nanos),
        (true, 0) => (-secs, 0),
        (true, _) => (-secs - 1, 1_000_000_000 - nanos),
    })
}

/// The entry's metadata from its header and PAX records.
pub(super) fn read_meta(header: &tar::Header, pax: Pax, shown: &str) -> Result<Meta, UnpackError> {
    let mode = header
        .mode()
        .map_err(|e| UnpackError::header(shown, "mode", e))?;
    let id = |value: io::Result<u64>, field| {
        let value = value.map_err(|e| UnpackError::header(shown, field, e))?;
        u32::try_from(value).map_err(|_| {
            UnpackError::header(shown, field, format!("{value} does not fit in 32 bits"))
        })
    };
    let uid = id(header.uid(), "uid")?;
    let gid = id(header.gid(), "gid")?;
    let mtime = match pax.mtime {
        Some(time) => time,
        None => {
            let secs = header
                .mtime()
                .map_err(|e| UnpackError::header(shown, "mtime", e))?;
            let secs = i64::try_from(secs)
                .map_err(|_| UnpackError::header(shown, "mtime", format!("{secs} is too large")))?;
            (secs, 0)
        }
    };
    let atime = pax.atime.unwrap_or(mtime);
    Ok(Meta {
        mode: Mode::from_bits_truncate(mode & 0o7777),
        uid: Uid::from_raw(uid),
        gid: Gid::from_raw(gid),
        atime: TimeSpec::new(atime.0, atime.1),
        mtime: TimeSpec::new(mtime.0, mtime.1),
        xattrs: pax.xattrs,
    })
}

/// Owner, mode and xattrs through an open fd (regular files, directories). The owner goes first:
/// `chown` clears setuid/setgid bits.
pub(super) fn apply_fd_meta(file: &File, meta: &Meta, shown: &str) -> Result<(), UnpackError> {
    let os = |op| move |errno| UnpackError::os(shown, OpError { op, errno });
    fchown(file, Some(meta.uid), Some(meta.gid)).map_err(os("chown"))?;
    fchmod(file, meta.mode).map_err(os("chmod"))?;
    set_xattrs(XattrTarget::Fd(file), &meta.xattrs, shown)
}

/// Owner, mode (unless a symlink), xattrs and times of `name` in `dir`, never following it.
pub(super) fn apply_at_meta(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    full: &Path,
    meta: &Meta,
    chmod: bool,
    shown: &str,
) -> Result<(), UnpackError> {
    let os = |op| move |errno| UnpackError::os(shown, OpError { op, errno });
    fchownat(
        dir,
        name,
        Some(meta.uid),
        Some(meta.gid),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(os("chown"))?;
    if chmod {
        // Linux cannot chmod without following; `name` is the device node or fifo we have just
        // created in a directory only we write to, not a symlink.
        fchmodat(dir, name, meta.mode, FchmodatFlags::FollowSymlink).map_err(os("chmod"))?;
    }
    set_xattrs(XattrTarget::Path(full), &meta.xattrs, shown)?;
    utimensat(
        dir,
        name,
        &meta.atime,
        &meta.mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(os("set times"))
}

/// Sets the entry's extended attributes. Failures on `security.*` (SELinux labels and the like
/// that this host may refuse) and on file systems without xattr support are warnings; any other
/// failure is an error.
fn set_xattrs(
    target: XattrTarget<'_>,
    xattrs: &[(OsString, Vec<u8>)],
    shown: &str,
) -> Result<(), UnpackError> {
    for (name, value) in xattrs {
        let result = match target {
            XattrTarget::Fd(file) => file.set_xattr(name, value),
            XattrTarget::Path(path) => xattr::set(path, name, value),
        };
        let Err(source) = result else { continue };
        let shown_name = name.to_string_lossy();
        if shown_name.starts_with("security.")
            || source.raw_os_error() == Some(Errno::EOPNOTSUPP as i32)
        {
            tracing::warn!(
                entry = %shown,
                xattr = %shown_name,
                error = %source,
                "could not set an extended attribute; continuing without it"
            );
            continue;
        }
        return Err(UnpackError::Xattr {
            path: shown.to_owned(),
            name: shown_name.into_owned(),
            source,
        });
    }
    Ok(())
}

/// Marks a directory opaque for overlayfs.
pub(super) fn set_opaque(dir: &File, shown: &str) -> Result<(), UnpackError> {
    dir.set_xattr(OPAQUE_XATTR, b"y")
        .map_err(|source| UnpackError::Xattr {
            path: shown.to_owned(),
            name: OPAQUE_XATTR.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::parse_pax_time;

    #[test]
    fn pax_times_are_parsed_to_seconds_and_nanoseconds() {
        assert_eq!(parse_pax_time(b"1600000000"), Some((1_600_000_000, 0)));
        assert_eq!(
            parse_pax_time(b"1600000000.5"),
            Some((1_600_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"0.000000001"), Some((0, 1)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"-3"), Some((-3, 0)));
        for bad in [
            &b""[..],
            b".5",
            b"1e9",
            b"12a",
            b"1.2.3",
            b"--1",
            b"99999999999999999999",
        ] {
            assert_eq!(
                parse_pax_time(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
