//! Unpacking one image layer (an OCI or Docker layer tar, perhaps gzip or zstd compressed) into a
//! directory that overlayfs can use as a lower dir as it is.
//!
//! - The tar is parsed with the `tar` crate, but every file is created by us, relative to an fd
//!   of its parent directory, and nothing is ever resolved through a symlink (`tree.rs`): entry
//!   names with `..`, absolute names, names whose parent is a symlink in the layer, and hard links
//!   to anything but an earlier non-directory of the same layer are refused, and the unpack stops.
//!   Symlink *targets* are data and may point anywhere.
//! - OCI whiteouts become overlayfs ones: `.wh.NAME` a character device 0/0 `NAME`,
//!   `D/.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on `D`.
//! - Mode bits (with setuid, setgid and sticky), owners, times and `SCHILY.xattr.*` extended
//!   attributes are kept; directory times are set last, once their contents are written.
//! - The diff id (sha256 of the uncompressed tar stream, all of it including the end-of-archive
//!   blocks) is computed while the stream is read.
//!
//! The caller unpacks into a fresh, empty directory and renames it into place once this returns
//! `Ok`; on error the directory holds a partial layer and must be deleted.

mod decompress;
mod meta;
mod safe_path;
mod tree;

#[cfg(test)]
mod tests;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::{SFlag, futimens, makedev};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};

use decompress::{Decoder, HashingReader};
use meta::{Meta, apply_at_meta, apply_fd_meta, read_meta, read_pax, set_opaque};
use safe_path::{LayerPath, Role, shown_prefix};
use tree::{OpError, Tree, WalkError, Whiteout};

/// Copy buffer for file contents.
const COPY_BUFFER: usize = 128 * 1024;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer from its descriptor's media type (OCI and Docker, including
    /// the "nondistributable"/"foreign" variants).
    pub fn from_media_type(mt: &str) -> Result<Compression, UnpackError> {
        match mt.trim() {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
            other => Err(UnpackError::UnsupportedMediaType {
                media_type: other.to_owned(),
            }),
        }
    }
}

/// What unpacking a layer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    /// `sha256:<hex>` of the uncompressed tar stream: the layer's diff id.
    pub diff_id: String,
    /// Tar entries read (whiteouts and skipped entries included; PAX and GNU long-name headers
    /// are part of their entry, not counted).
    pub entries: u64,
    /// Length of the uncompressed tar stream, in bytes.
    pub bytes: u64,
}

/// Why a layer could not be unpacked. Each names the entry (its path as written in the tar) and
/// what is wrong with it in one sentence.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(
        "layer media type {media_type:?} is not supported: expected an OCI layer (tar, tar+gzip \
         or tar+zstd) or a Docker rootfs diff (tar.gzip)"
    )]
    UnsupportedMediaType { media_type: String },
    #[error("cannot open the unpack destination {}: {source}", path.display())]
    Destination { path: PathBuf, source: io::Error },
    #[error("the layer stream could not be read or decompressed ({at}): {source}")]
    Stream { at: String, source: io::Error },
    #[error("the layer is not a valid tar archive ({at}): {source}")]
    Tar { at: String, source: io::Error },
    #[error("layer entry {path:?} is refused because its path {reason}")]
    UnsafePath { path: String, reason: &'static str },
    #[error(
        "layer entry {path:?} is refused because {parent:?} is a symlink in the layer, and \
         writing through a symlink could escape the layer"
    )]
    ThroughSymlink { path: String, parent: String },
    #[error("layer entry {path:?} cannot be created because {parent:?} is not a directory")]
    ParentNotDirectory { path: String, parent: String },
    #[error("layer entry {path:?} is a hard link to {target:?}, which {reason}")]
    BadHardLink {
        path: String,
        target: String,
        reason: String,
    },
    #[error("layer entry {path:?} has tar entry type {kind}, which a layer cannot contain")]
    UnsupportedEntry { path: String, kind: String },
    #[error("layer entry {path:?} has an invalid {field}: {detail}")]
    BadHeader {
        path: String,
        field: &'static str,
        detail: String,
    },
    #[error("layer entry {path:?} could not be unpacked: {op} failed: {source}")]
    Io {
        path: String,
        op: &'static str,
        source: io::Error,
    },
    #[error(
        "layer entry {path:?} could not be unpacked: setting extended attribute {name:?} \
         failed: {source}"
    )]
    Xattr {
        path: String,
        name: String,
        source: io::Error,
    },
}

impl UnpackError {
    fn os(path: &str, e: OpError) -> UnpackError {
        UnpackError::Io {
            path: path.to_owned(),
            op: e.op,
            source: e.errno.into(),
        }
    }

    fn header(path: &str, field: &'static str, detail: impl ToString) -> UnpackError {
        UnpackError::BadHeader {
            path: path.to_owned(),
            field,
            detail: detail.to_string(),
        }
    }

    /// A walk to an entry's parent directory failed.
    fn walk(path: &str, comps: &[OsString], e: WalkError) -> UnpackError {
        let path = path.to_owned();
        match e {
            WalkError::Symlink(i) => UnpackError::ThroughSymlink {
                path,
                parent: shown_prefix(comps, i + 1),
            },
            WalkError::NotDir(i) => UnpackError::ParentNotDirectory {
                path,
                parent: shown_prefix(comps, i + 1),
            },
            WalkError::Missing => UnpackError::Io {
                path,
                op: "open parent directory",
                source: Errno::ENOENT.into(),
            },
            WalkError::Os(e) => UnpackError::Io {
                path,
                op: e.op,
                source: e.errno.into(),
            },
        }
    }
}

/// Unpacks the layer blob `compressed` into `dest`, an existing empty directory, and returns its
/// diff id and sizes. On error `dest` holds part of the layer and must be discarded.
pub fn unpack_layer<R: Read>(
    compressed: R,
    compression: Compression,
    dest: &Path,
) -> Result<UnpackStats, UnpackError> {
    let tree = Tree::open(dest).map_err(|errno| UnpackError::Destination {
        path: dest.to_path_buf(),
        source: errno.into(),
    })?;
    let mut stream = HashingReader::new(Decoder::new(compressed, compression));
    let mut unpacker = Unpacker {
        tree,
        dest: dest.to_path_buf(),
        dir_times: Vec::new(),
        buf: vec![0; COPY_BUFFER],
        entries: 0,
    };
    if let Err(err) = unpacker.unpack_entries(&mut stream) {
        // The tar crate passes the decompressor's errors through as its own: say which it was.
        return Err(match err {
            UnpackError::Tar { at, source } if stream.inner_failed => {
                UnpackError::Stream { at, source }
            }
            other => other,
        });
    }
    stream.drain().map_err(|source| UnpackError::Stream {
        at: "after the end of the tar archive".to_owned(),
        source,
    })?;
    unpacker.set_dir_times()?;
    let (diff_id, bytes) = stream.finish();
    Ok(UnpackStats {
        diff_id,
        entries: unpacker.entries,
        bytes,
    })
}

/// The OCI chain ids of a stack of layers, bottom first: `chain(L0) = diff(L0)`,
/// `chain(Ln) = sha256(chain(Ln-1) + " " + diff(Ln))`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => {
                let digest = Sha256::digest(format!("{parent} {diff_id}").as_bytes());
                format!("sha256:{}", hex::encode(digest))
            }
        };
        chain.push(next);
    }
    chain
}

/// What to create for a plain entry.
enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Node(SFlag),
}

struct Unpacker {
    tree: Tree,
    dest: PathBuf,
    /// Directory times, set at the end so that writing their contents does not change them.
    dir_times: Vec<(LayerPath, TimeSpec, TimeSpec)>,
    buf: Vec<u8>,
    entries: u64,
}

impl Unpacker {
    fn unpack_entries<R: Read>(&mut self, stream: R) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(stream);
        let entries = archive.entries().map_err(|source| UnpackError::Tar {
            at: "at its start".to_owned(),
            source,
        })?;
        let mut last: Option<String> = None;
        for entry in entries {
            let mut entry = entry.map_err(|source| UnpackError::Tar {
                at: match &last {
                    None => "at the first entry".to_owned(),
                    Some(path) => format!("after entry {path:?}"),
                },
                source,
            })?;
            if let Some(shown) = self.entry(&mut entry)? {
                last = Some(shown);
            }
        }
        Ok(())
    }

    /// Unpacks one entry; returns its name, or `None` for entries that are not files (global
    /// PAX headers).
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<Option<String>, UnpackError> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(None);
        }
        self.entries += 1;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let pax = read_pax(entry, &shown)?;
        let meta = read_meta(entry.header(), pax, &shown)?;
        let unsafe_path = |reason| UnpackError::UnsafePath {
            path: shown.clone(),
            reason,
        };
        let path = safe_path::parse(&raw).map_err(unsafe_path)?;
        match safe_path::role(&path).map_err(unsafe_path)? {
            Role::AufsMeta => tracing::debug!(entry = %shown, "skipping aufs metadata entry"),
            Role::Opaque => self.opaque(&path, &shown)?,
            Role::Whiteout(name) => self.whiteout(&path, name, &shown)?,
            Role::Plain => {
                let kind = if kind.is_dir() || (kind.is_file() && raw.ends_with(b"/")) {
                    // Old (v7) tars mark directories only by the trailing slash.
                    Kind::Dir
                } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
                    Kind::File
                } else if kind.is_symlink() {
                    Kind::Symlink
                } else if kind.is_hard_link() {
                    Kind::HardLink
                } else if kind.is_character_special() {
                    Kind::Node(SFlag::S_IFCHR)
                } else if kind.is_block_special() {
                    Kind::Node(SFlag::S_IFBLK)
                } else if kind.is_fifo() {
                    Kind::Node(SFlag::S_IFIFO)
                } else {
                    return Err(UnpackError::UnsupportedEntry {
                        path: shown,
                        kind: format!("{:?}", char::from(kind.as_byte())),
                    });
                };
                self.plain(entry, kind, &path, &meta, &shown)?;
            }
        }
        Ok(Some(shown))
    }

    fn plain<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        kind: Kind,
        path: &LayerPath,
        meta: &Meta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let Some((parent, name)) = path.split_last() else {
            return match kind {
                Kind::Dir => self.root_dir(meta, shown),
                _ => Err(UnpackError::UnsafePath {
                    path: shown.to_owned(),
                    reason: "names the layer root, which only a directory entry may do",
                }),
            };
        };
        match kind {
            Kind::File => {
                let size = entry.size();
                let dir = self
                    .tree
                    .dir(parent)
                    .map_err(|e| UnpackError::walk(shown, parent, e))?;
                let mut file =
                    tree::create_file(dir, name).map_err(|e| UnpackError::os(shown, e))?;
                copy_data(entry, size, &mut file, &mut self.buf, shown)?;
                apply_fd_meta(&file, meta, shown)?;
                futimens(&file, &meta.atime, &meta.mtime).map_err(|errno| {
                    UnpackError::os(
                        shown,
                        OpError {
                            op: "set times",
                            errno,
                        },
                    )
                })
            }
            Kind::Dir => {
                let dir = self
                    .tree
                    .dir(parent)
                    .map_err(|e| UnpackError::walk(shown, parent, e))?;
                let (new_dir, replaced_whiteout) =
                    tree::create_dir(dir, name).map_err(|e| UnpackError::os(shown, e))?;
                apply_fd_meta(&new_dir, meta, shown)?;
                if replaced_whiteout {
                    // `.wh.NAME` came before the directory NAME in the same layer: the lower
                    // layers' NAME is deleted, this layer's directory stays.
                    set_opaque(&new_dir, shown)?;
                }
                self.dir_times.push((path.clone(), meta.atime, meta.mtime));
                Ok(())
            }
            Kind::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if target.is_empty() {
                    return Err(UnpackError::header(shown, "symlink target", "it is empty"));
                }
                if target.contains(&0) {
                    return Err(UnpackError::header(
                        shown,
                        "symlink target",
                        "it contains a NUL byte",
                    ));
                }
                let dir = self
                    .tree
                    .dir(parent)
                    .map_err(|e| UnpackError::walk(shown, parent, e))?;
                tree::create_symlink(dir, name, OsStr::from_bytes(&target))
                    .map_err(|e| UnpackError::os(shown, e))?;
                let full = self.dest.join(path.to_relative());
                apply_at_meta(dir, name, &full, meta, false, shown)
            }
            Kind::HardLink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.hard_link(parent, name, &target, shown)
            }
            Kind::Node(kind) => {
                let dev = if kind == SFlag::S_IFIFO {
                    // A fifo has no device number; tars often leave the fields empty.
                    0
                } else {
                    let header = entry.header();
                    let number = |n: io::Result<Option<u32>>, field| {
                        n.map(Option::unwrap_or_default)
                            .map_err(|e| UnpackError::header(shown, field, e))
                    };
                    let major = number(header.device_major(), "device major number")?;
                    let minor = number(header.device_minor(), "device minor number")?;
                    makedev(major.into(), minor.into())
                };
                let dir = self
                    .tree
                    .dir(parent)
                    .map_err(|e| UnpackError::walk(shown, parent, e))?;
                match tree::create_node(dir, name, kind, dev) {
                    Ok(()) => {}
                    Err(OpError {
                        errno: Errno::EPERM,
                        ..
                    }) => {
                        tracing::warn!(
                            entry = %shown,
                            "skipping a device node this host does not allow us to create"
                        );
                        return Ok(());
                    }
                    Err(e) => return Err(UnpackError::os(shown, e)),
                }
                let full = self.dest.join(path.to_relative());
                apply_at_meta(dir, name, &full, meta, true, shown)
            }
        }
    }

    /// `.` or `./`: the layer's root directory gets the entry's metadata.
    fn root_dir(&mut self, meta: &Meta, shown: &str) -> Result<(), UnpackError> {
        let root = dup(self.tree.root(), shown)?;
        apply_fd_meta(&root, meta, shown)?;
        self.dir_times
            .push((LayerPath::root(), meta.atime, meta.mtime));
        Ok(())
    }

    fn hard_link(
        &mut self,
        parent: &[OsString],
        name: &OsStr,
        raw_target: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        let shown_target = String::from_utf8_lossy(raw_target).into_owned();
        let bad = |reason: String| UnpackError::BadHardLink {
            path: shown.to_owned(),
            target: shown_target.clone(),
            reason,
        };
        let target = safe_path::parse(raw_target)
            .map_err(|reason| bad(format!("is not a safe path inside the layer: it {reason}")))?;
        let Some((target_parent, target_name)) = target.split_last() else {
            return Err(bad("is the layer root".to_owned()));
        };
        let target_dir = self.tree.existing_dir(target_parent).map_err(|e| match e {
            WalkError::Symlink(i) => bad(format!(
                "goes through {:?}, a symlink in the layer",
                shown_prefix(target_parent, i + 1)
            )),
            WalkError::NotDir(i) => bad(format!(
                "goes through {:?}, which is not a directory",
                shown_prefix(target_parent, i + 1)
            )),
            WalkError::Missing => bad("does not exist earlier in this layer".to_owned()),
            WalkError::Os(e) => UnpackError::os(shown, e),
        })?;
        let target_stat = tree::lstat_at(target_dir.as_fd(), target_name)
            .map_err(|e| UnpackError::os(shown, e))?
            .ok_or_else(|| bad("does not exist earlier in this layer".to_owned()))?;
        if tree::is_kind(&target_stat, SFlag::S_IFDIR) {
            return Err(bad("is a directory".to_owned()));
        }
        let dir = self
            .tree
            .dir(parent)
            .map_err(|e| UnpackError::walk(shown, parent, e))?;
        tree::create_hard_link(target_dir.as_fd(), target_name, &target_stat, dir, name)
            .map_err(|e| UnpackError::os(shown, e))
    }

    /// `D/.wh..wh..opq`: marks `D` (created if the layer has no entry for it yet) opaque.
    fn opaque(&mut self, path: &LayerPath, shown: &str) -> Result<(), UnpackError> {
        let parent = path
            .split_last()
            .map(|(parent, _)| parent)
            .unwrap_or_default();
        let dir = self
            .tree
            .dir(parent)
            .map_err(|e| UnpackError::walk(shown, parent, e))?;
        set_opaque(&dup(dir, shown)?, shown)
    }

    /// `D/.wh.NAME`: a character device 0/0 `D/NAME`.
    fn whiteout(&mut self, path: &LayerPath, name: &OsStr, shown: &str) -> Result<(), UnpackError> {
        let parent = path
            .split_last()
            .map(|(parent, _)| parent)
            .unwrap_or_default();
        let dir = self
            .tree
            .dir(parent)
            .map_err(|e| UnpackError::walk(shown, parent, e))?;
        match tree::create_whiteout(dir, name).map_err(|e| UnpackError::os(shown, e))? {
            Whiteout::Created | Whiteout::ExistingOther => Ok(()),
            Whiteout::ExistingDir => {
                let existing =
                    tree::open_child_dir(dir, name).map_err(|e| UnpackError::os(shown, e))?;
                set_opaque(&existing, shown)
            }
        }
    }

    /// Sets the recorded directory times, now that nothing more is written into them. A
    /// directory a later entry replaced is skipped.
    fn set_dir_times(&self) -> Result<(), UnpackError> {
        for (path, atime, mtime) in &self.dir_times {
            let shown = shown_prefix(path.components(), path.components().len());
            let dir = match self.tree.existing_dir(path.components()) {
                Ok(dir) => dir,
                Err(WalkError::Os(e)) => return Err(UnpackError::os(&shown, e)),
                Err(_) => continue,
            };
            futimens(&dir, atime, mtime).map_err(|errno| {
                UnpackError::os(
                    &shown,
                    OpError {
                        op: "set directory times",
                        errno,
                    },
                )
            })?;
        }
        Ok(())
    }
}

/// A `File` for an fd we only borrow (for the fd-based xattr calls).
fn dup(fd: BorrowedFd<'_>, shown: &str) -> Result<File, UnpackError> {
    fd.try_clone_to_owned()
        .map(File::from)
        .map_err(|source| UnpackError::Io {
            path: shown.to_owned(),
            op: "duplicate the directory fd",
            source,
        })
}

/// Copies an entry's data into its file, checking the whole of it arrived.
fn copy_data(
    entry: &mut impl Read,
    size: u64,
    file: &mut File,
    buf: &mut [u8],
    shown: &str,
) -> Result<(), UnpackError> {
    let at = || format!("in the data of entry {shown:?}");
    let mut copied: u64 = 0;
    loop {
        let n = match entry.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(UnpackError::Tar { at: at(), source }),
        };
        let data = buf.get(..n).unwrap_or_default();
        file.write_all(data).map_err(|source| UnpackError::Io {
            path: shown.to_owned(),
            op: "write file data",
            source,
        })?;
        copied += data.len() as u64;
    }
    if copied != size {
        return Err(UnpackError::Tar {
            at: at(),
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the archive ends after {copied} of the entry's {size} bytes"),
            ),
        });
    }
    Ok(())
}
