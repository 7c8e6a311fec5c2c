//! Tests of the layer unpacker. They need root (device nodes, chown, `trusted.*` xattrs), as CI
//! has; they never skip.

use std::collections::BTreeSet;
use std::error::Error;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::{Compression, UnpackError, UnpackStats, chain_ids, unpack_layer};

type TestResult = Result<(), Box<dyn Error>>;

const MTIME: u64 = 1_600_000_000;

/// A tar built in memory, with raw (unchecked) names so that malicious layers can be written.
struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Layer {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    /// Appends an entry named `name` (raw bytes, at most 100), linking to `link`, after `tweak`
    /// has adjusted its header (owner 0:0 and mtime [`MTIME`] unless changed).
    fn entry(
        &mut self,
        kind: EntryType,
        name: &str,
        link: &str,
        mode: u32,
        data: &[u8],
        tweak: impl FnOnce(&mut Header) -> io::Result<()>,
    ) -> io::Result<&mut Layer> {
        let mut header = gnu_header(kind, mode, data.len() as u64);
        set_raw(&mut header.as_old_mut().name, name.as_bytes())?;
        set_raw(&mut header.as_old_mut().linkname, link.as_bytes())?;
        tweak(&mut header)?;
        header.set_cksum();
        self.builder.append(&header, data)?;
        Ok(self)
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<&mut Layer> {
        self.entry(EntryType::Regular, name, "", mode, data, |_| Ok(()))
    }

    fn dir(&mut self, name: &str, mode: u32) -> io::Result<&mut Layer> {
        self.entry(EntryType::Directory, name, "", mode, b"", |_| Ok(()))
    }

    fn symlink(&mut self, name: &str, target: &str) -> io::Result<&mut Layer> {
        self.entry(EntryType::Symlink, name, target, 0o777, b"", |_| Ok(()))
    }

    fn hard_link(&mut self, name: &str, target: &str) -> io::Result<&mut Layer> {
        self.entry(EntryType::Link, name, target, 0o644, b"", |_| Ok(()))
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) -> io::Result<&mut Layer> {
        self.builder
            .append_pax_extensions(records.iter().copied())?;
        Ok(self)
    }

    fn finish(self) -> io::Result<Vec<u8>> {
        self.builder.into_inner()
    }
}

/// A GNU header owned by 0:0 with mtime [`MTIME`], without a name.
fn gnu_header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    header.set_size(size);
    header
}

fn set_raw(field: &mut [u8; 100], value: &[u8]) -> io::Result<()> {
    let slot = field
        .get_mut(..value.len())
        .ok_or_else(|| io::Error::other(format!("test name too long: {value:?}")))?;
    slot.copy_from_slice(value);
    Ok(())
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data)?;
    encoder.finish()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// A temporary directory holding the destination `d1/d2/dest` and, beside it, `outside/file`
/// that no layer may touch.
struct Sandbox {
    _tmp: tempfile::TempDir,
    top: PathBuf,
    dest: PathBuf,
    outside: PathBuf,
}

impl Sandbox {
    fn new() -> io::Result<Sandbox> {
        let tmp = tempfile::tempdir()?;
        let top = tmp.path().to_path_buf();
        let dest = top.join("d1/d2/dest");
        fs::create_dir_all(&dest)?;
        let outside = top.join("outside");
        fs::create_dir(&outside)?;
        fs::write(outside.join("file"), b"secret")?;
        Ok(Sandbox {
            _tmp: tmp,
            top,
            dest,
            outside,
        })
    }

    fn unpack(&self, tar: &[u8]) -> Result<UnpackStats, UnpackError> {
        unpack_layer(tar, Compression::None, &self.dest)
    }

    /// Everything in the sandbox except inside `dest`: path, type, size, opaque xattr.
    fn outside_dest(&self) -> Result<BTreeSet<String>, Box<dyn Error>> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![self.top.clone()];
        while let Some(dir) = todo.pop() {
            for child in fs::read_dir(&dir)? {
                let path = child?.path();
                if path == self.dest {
                    continue;
                }
                let meta = fs::symlink_metadata(&path)?;
                let opaque = xattr::get(&path, "trusted.overlay.opaque")?;
                seen.insert(format!(
                    "{} {:?} {} {:?}",
                    path.strip_prefix(&self.top)?.display(),
                    meta.file_type(),
                    meta.len(),
                    opaque
                ));
                if meta.is_dir() {
                    todo.push(path);
                }
            }
        }
        Ok(seen)
    }
}

/// A sorted description of every file under `root` (root included): what a layer unpacked to.
fn listing(root: &Path) -> Result<Vec<String>, Box<dyn Error>> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = fs::symlink_metadata(&path)?;
        let link = if meta.file_type().is_symlink() {
            fs::read_link(&path)?.display().to_string()
        } else {
            String::new()
        };
        let mut xattrs = Vec::new();
        for name in xattr::list(&path)? {
            let value = xattr::get(&path, &name)?.unwrap_or_default();
            xattrs.push(format!(
                "{}={}",
                name.to_string_lossy(),
                String::from_utf8_lossy(&value)
            ));
        }
        xattrs.sort();
        out.push(format!(
            "{:?} mode={:o} uid={} gid={} mtime={}.{:09} size={} rdev={} nlink={} link={link:?} \
             xattrs={xattrs:?}",
            path.strip_prefix(root)?,
            meta.mode(),
            meta.uid(),
            meta.gid(),
            meta.mtime(),
            meta.mtime_nsec(),
            if meta.is_file() { meta.len() } else { 0 },
            meta.rdev(),
            meta.nlink(),
        ));
        if meta.is_dir() {
            for child in fs::read_dir(&path)? {
                todo.push(child?.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn normal_layer() -> io::Result<Vec<u8>> {
    let mut layer = Layer::new();
    let uid1000 = |h: &mut Header| {
        h.set_uid(1000);
        h.set_gid(1000);
        Ok(())
    };
    layer
        .dir("./", 0o755)?
        .dir("etc/", 0o755)?
        .pax(&[("SCHILY.xattr.user.tug", b"1")])?
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?
        .pax(&[("mtime", b"1600000123.25")])?
        .file("etc/precise", 0o600, b"")?
        .dir("bin/", 0o755)?
        .entry(
            EntryType::Regular,
            "bin/busybox",
            "",
            0o755,
            b"\x7fELF busybox",
            uid1000,
        )?
        .file("bin/su", 0o4755, b"\x7fELF su")?
        .entry(
            EntryType::Regular,
            "bin/wall",
            "",
            0o2755,
            b"\x7fELF wall",
            uid1000,
        )?
        .symlink("bin/sh", "busybox")?
        .entry(
            EntryType::Symlink,
            "bin/abs",
            "/etc/passwd",
            0o777,
            b"",
            uid1000,
        )?
        .hard_link("bin/ash", "bin/busybox")?
        .dir("run/", 0o1777)?
        .entry(EntryType::Fifo, "run/fifo", "", 0o620, b"", |_| Ok(()))?
        .dir("dev/", 0o755)?
        .entry(EntryType::Char, "dev/null", "", 0o666, b"", |h| {
            h.set_device_major(1)?;
            h.set_device_minor(3)
        })?
        .entry(EntryType::Block, "dev/loop0", "", 0o660, b"", |h| {
            h.set_device_major(7)?;
            h.set_device_minor(0)
        })?
        .dir("home/", 0o755)?
        .entry(EntryType::Directory, "home/user/", "", 0o2750, b"", uid1000)?
        .file("home/user/.profile", 0o644, b"export PS1='$ '\n")?;
    // Names longer than a ustar header holds: GNU long name and PAX path records.
    let long_dir = format!("usr/share/{}", "d".repeat(120));
    layer.dir("usr/", 0o755)?.dir("usr/share/", 0o755)?;
    let mut header = gnu_header(EntryType::Directory, 0o755, 0);
    layer
        .builder
        .append_data(&mut header, format!("{long_dir}/"), io::empty())?;
    let mut header = gnu_header(EntryType::Regular, 0o644, 4);
    layer
        .builder
        .append_data(&mut header, format!("{long_dir}/gnu-long"), &b"long"[..])?;
    let pax_name = format!("{long_dir}/pax-long");
    layer
        .pax(&[("path", pax_name.as_bytes())])?
        .file("placeholder", 0o644, b"pax")?;
    let mut header = gnu_header(EntryType::Symlink, 0o777, 0);
    layer
        .builder
        .append_link(&mut header, "usr/link", format!("{long_dir}/gnu-long"))?;
    layer.finish()
}

#[test]
fn unpacks_a_normal_layer_with_all_metadata() -> TestResult {
    let mut tar = normal_layer()?;
    // Record padding after the end-of-archive blocks, as GNU tar writes: part of the diff id.
    tar.extend_from_slice(&[0; 8192]);
    let sandbox = Sandbox::new()?;
    let stats = sandbox.unpack(&tar)?;
    assert_eq!(stats.diff_id, sha256(&tar));
    assert_eq!(stats.bytes, tar.len() as u64);
    assert_eq!(stats.entries, 25);

    let dest = &sandbox.dest;
    let meta = |p: &str| fs::symlink_metadata(dest.join(p));
    assert_eq!(
        fs::read(dest.join("etc/passwd"))?,
        b"root:x:0:0:root:/root:/bin/sh\n"
    );
    assert_eq!(
        xattr::get(dest.join("etc/passwd"), "user.tug")?,
        Some(b"1".to_vec())
    );
    for (path, mode, uid) in [
        ("", 0o755, 0),
        ("etc", 0o755, 0),
        ("etc/passwd", 0o644, 0),
        ("bin/busybox", 0o755, 1000),
        ("bin/su", 0o4755, 0),
        ("bin/wall", 0o2755, 1000),
        ("run", 0o1777, 0),
        ("run/fifo", 0o620, 0),
        ("dev/null", 0o666, 0),
        ("home/user", 0o2750, 1000),
    ] {
        let m = meta(path)?;
        assert_eq!(m.mode() & 0o7777, mode, "mode of {path:?}");
        assert_eq!((m.uid(), m.gid()), (uid, uid), "owner of {path:?}");
        assert_eq!(
            (m.mtime(), m.mtime_nsec()),
            (MTIME as i64, 0),
            "mtime of {path:?}"
        );
    }
    let precise = meta("etc/precise")?;
    assert_eq!(
        (precise.mtime(), precise.mtime_nsec()),
        (1_600_000_123, 250_000_000)
    );

    let sh = meta("bin/sh")?;
    assert!(sh.file_type().is_symlink());
    assert_eq!(fs::read_link(dest.join("bin/sh"))?, Path::new("busybox"));
    assert_eq!(sh.mtime(), MTIME as i64);
    let abs = meta("bin/abs")?;
    assert_eq!(
        fs::read_link(dest.join("bin/abs"))?,
        Path::new("/etc/passwd")
    );
    assert_eq!((abs.uid(), abs.gid()), (1000, 1000), "lchown of a symlink");

    let ash = meta("bin/ash")?;
    let busybox = meta("bin/busybox")?;
    assert_eq!(ash.ino(), busybox.ino(), "bin/ash is a hard link");
    assert_eq!(busybox.nlink(), 2);

    assert!(meta("run/fifo")?.file_type().is_fifo());
    let null = meta("dev/null")?;
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    let loop0 = meta("dev/loop0")?;
    assert!(loop0.file_type().is_block_device());
    assert_eq!(loop0.rdev(), nix::sys::stat::makedev(7, 0));

    let long_dir = format!("usr/share/{}", "d".repeat(120));
    assert_eq!(
        fs::read(dest.join(format!("{long_dir}/gnu-long")))?,
        b"long"
    );
    assert_eq!(fs::read(dest.join(format!("{long_dir}/pax-long")))?, b"pax");
    assert!(!dest.join("placeholder").exists());
    assert_eq!(
        fs::read_link(dest.join("usr/link"))?,
        Path::new(&format!("{long_dir}/gnu-long"))
    );
    Ok(())
}

#[test]
fn gzip_and_zstd_layers_unpack_the_same_with_the_same_diff_id() -> TestResult {
    let tar = normal_layer()?;
    let mut results = Vec::new();
    for (compression, blob) in [
        (Compression::None, tar.clone()),
        (Compression::Gzip, gzip(&tar)?),
        (Compression::Zstd, zstd(&tar)),
    ] {
        let sandbox = Sandbox::new()?;
        let stats = unpack_layer(&blob[..], compression, &sandbox.dest)?;
        assert_eq!(stats.diff_id, sha256(&tar), "{compression:?}");
        assert_eq!(stats.bytes, tar.len() as u64, "{compression:?}");
        results.push((stats, listing(&sandbox.dest)?));
    }
    for pair in results.windows(2) {
        if let [a, b] = pair {
            assert_eq!(a, b);
        }
    }
    Ok(())
}

#[test]
fn zstd_with_several_frames_and_a_skippable_frame() -> TestResult {
    let tar = normal_layer()?;
    let (head, tail) = tar.split_at(tar.len() / 3);
    let mut blob = Vec::new();
    // A skippable frame (magic 0x184D2A50, length, payload), as some tools add for metadata.
    blob.extend_from_slice(&0x184D_2A50_u32.to_le_bytes());
    blob.extend_from_slice(&5_u32.to_le_bytes());
    blob.extend_from_slice(b"hello");
    blob.extend_from_slice(&zstd(head));
    blob.extend_from_slice(&zstd(tail));
    let sandbox = Sandbox::new()?;
    let stats = unpack_layer(&blob[..], Compression::Zstd, &sandbox.dest)?;
    assert_eq!(stats.diff_id, sha256(&tar));
    assert_eq!(fs::read(sandbox.dest.join("bin/su"))?, b"\x7fELF su");
    Ok(())
}

/// A layer made by GNU tar and compressed by the reference `zstd` CLI (level 19, with content
/// checksum); see `agent/tests/fixtures/README.md`.
#[test]
fn zstd_from_the_reference_encoder() -> TestResult {
    let blob = include_bytes!("../../../tests/fixtures/layer.tar.zst");
    let sandbox = Sandbox::new()?;
    let stats = unpack_layer(&blob[..], Compression::Zstd, &sandbox.dest)?;
    assert_eq!(
        stats.diff_id,
        include_str!("../../../tests/fixtures/layer.tar.sha256").trim()
    );
    assert_eq!(fs::read(sandbox.dest.join("etc/hostname"))?, b"fixture\n");
    assert_eq!(
        fs::read_link(sandbox.dest.join("etc/localtime"))?,
        Path::new("/usr/share/zoneinfo/UTC")
    );
    Ok(())
}

#[test]
fn whiteouts_become_overlayfs_whiteouts() -> TestResult {
    let mut layer = Layer::new();
    layer
        .dir("dir/", 0o755)?
        .file("dir/keep", 0o644, b"keep")?
        .file("dir/.wh..wh..opq", 0o644, b"")?
        .file("dir/after", 0o644, b"after")?
        .file(".wh.gone", 0o644, b"")?
        .file("sub/.wh.x", 0o644, b"")?
        .file("newdir/.wh..wh..opq", 0o644, b"")?
        // A whiteout and an entry of the same name in one layer: the entry stays (the whiteout
        // only deletes from lower layers), a directory becomes opaque.
        .file(".wh.foo", 0o644, b"")?
        .dir("foo/", 0o755)?
        .file("foo/a", 0o644, b"a")?
        .dir("bar/", 0o755)?
        .file(".wh.bar", 0o644, b"")?
        .file("baz", 0o644, b"baz")?
        .file(".wh.baz", 0o644, b"")?
        // aufs bookkeeping is skipped
        .dir(".wh..wh.plnk/", 0o700)?
        .file(".wh..wh.plnk/123.456", 0o644, b"x")?;
    let sandbox = Sandbox::new()?;
    sandbox.unpack(&layer.finish()?)?;
    let dest = &sandbox.dest;
    let opaque = |p: &str| xattr::get(dest.join(p), "trusted.overlay.opaque");

    for path in ["gone", "sub/x"] {
        let meta = fs::symlink_metadata(dest.join(path))?;
        assert!(
            meta.file_type().is_char_device(),
            "{path} is a whiteout device"
        );
        assert_eq!(meta.rdev(), 0);
        assert_eq!((meta.uid(), meta.gid()), (0, 0));
    }
    assert_eq!(opaque("dir")?, Some(b"y".to_vec()));
    assert_eq!(fs::read(dest.join("dir/keep"))?, b"keep");
    assert_eq!(fs::read(dest.join("dir/after"))?, b"after");
    assert_eq!(opaque("newdir")?, Some(b"y".to_vec()));
    assert_eq!(opaque("foo")?, Some(b"y".to_vec()));
    assert_eq!(fs::read(dest.join("foo/a"))?, b"a");
    assert_eq!(opaque("bar")?, Some(b"y".to_vec()));
    assert_eq!(fs::read(dest.join("baz"))?, b"baz");
    assert_eq!(opaque("sub")?, None);
    // Directories the layer has no entry for: 0755 and root's.
    let sub = fs::symlink_metadata(dest.join("sub"))?;
    assert!(sub.is_dir());
    assert_eq!((sub.mode() & 0o7777, sub.uid(), sub.gid()), (0o755, 0, 0));

    let everything = listing(dest)?;
    assert!(
        !everything.iter().any(|line| line.contains(".wh.")),
        "whiteout names left in the layer: {everything:#?}"
    );
    Ok(())
}

#[test]
fn later_entries_replace_earlier_ones() -> TestResult {
    let sandbox = Sandbox::new()?;
    let outside_file = sandbox.outside.join("file");
    let mut layer = Layer::new();
    layer
        .file("a", 0o644, b"first")?
        .file("a", 0o600, b"second")?
        .dir("d/", 0o755)?
        .file("d/one", 0o644, b"1")?
        .dir("d/", 0o700)?
        .file("d/two", 0o644, b"2")?
        .dir("gone/", 0o755)?
        .file("gone/inner/deep", 0o644, b"x")?
        .file("gone", 0o644, b"now a file")?
        .file("became-dir", 0o644, b"")?
        // A v7-style directory: a regular-file entry whose name ends in a slash.
        .file("v7dir/", 0o750, b"")?
        .file("v7dir/x", 0o644, b"x")?
        .dir("became-dir/", 0o755)?
        // A symlink to a file outside, then a file of the same name: the symlink is replaced,
        // never written through.
        .symlink("s", &outside_file.display().to_string())?
        .file("s", 0o644, b"inside")?
        .symlink("t", &outside_file.display().to_string())?
        .dir("t/", 0o755)?;
    sandbox.unpack(&layer.finish()?)?;
    let dest = &sandbox.dest;
    assert_eq!(fs::read(dest.join("a"))?, b"second");
    assert_eq!(fs::symlink_metadata(dest.join("a"))?.mode() & 0o7777, 0o600);
    assert_eq!(fs::read(dest.join("d/one"))?, b"1");
    assert_eq!(fs::read(dest.join("d/two"))?, b"2");
    assert_eq!(fs::symlink_metadata(dest.join("d"))?.mode() & 0o7777, 0o700);
    assert_eq!(fs::read(dest.join("gone"))?, b"now a file");
    assert!(fs::symlink_metadata(dest.join("became-dir"))?.is_dir());
    let v7dir = fs::symlink_metadata(dest.join("v7dir"))?;
    assert!(v7dir.is_dir());
    assert_eq!(v7dir.mode() & 0o7777, 0o750);
    assert_eq!(fs::read(dest.join("v7dir/x"))?, b"x");
    assert_eq!(fs::read(dest.join("s"))?, b"inside");
    assert!(fs::symlink_metadata(dest.join("s"))?.is_file());
    assert!(fs::symlink_metadata(dest.join("t"))?.is_dir());
    assert_eq!(fs::read(&outside_file)?, b"secret");
    assert!(fs::symlink_metadata(&outside_file)?.is_file());
    Ok(())
}

#[test]
fn replacing_an_ancestor_of_the_last_parent_is_seen() -> TestResult {
    // `a` (holding the last entry's parent `a/b`) becomes a file: `a/b/g` must not land in the
    // removed directory.
    let sandbox = Sandbox::new()?;
    let mut layer = Layer::new();
    layer
        .file("a/b/f", 0o644, b"f")?
        .file("a", 0o644, b"a")?
        .file("a/b/g", 0o644, b"g")?;
    let tar = layer.finish()?;
    match sandbox.unpack(&tar) {
        Err(err @ UnpackError::ParentNotDirectory { .. }) => {
            assert!(err.to_string().contains("\"a/b/g\""), "{err}");
        }
        other => panic!("a/b/g after a became a file: {other:?}"),
    }
    // The same with a directory in between that is replaced by a symlink.
    let sandbox = Sandbox::new()?;
    let out = sandbox.outside.display().to_string();
    let mut layer = Layer::new();
    layer
        .file("a/b/f", 0o644, b"f")?
        .symlink("a", &out)?
        .file("a/b/g", 0o644, b"g")?;
    assert_refused(&sandbox, &layer.finish()?, "a/b/g")
}

/// Unpacks `tar` and checks it is refused with an error naming `entry`, and that nothing outside
/// the destination changed.
fn assert_refused(sandbox: &Sandbox, tar: &[u8], entry: &str) -> TestResult {
    let before = sandbox.outside_dest()?;
    let err = match sandbox.unpack(tar) {
        Ok(stats) => return Err(format!("layer with {entry:?} was unpacked: {stats:?}").into()),
        Err(err) => err,
    };
    let message = err.to_string();
    assert!(
        message.contains(&format!("{entry:?}")),
        "{message:?} does not name {entry:?}"
    );
    assert_eq!(
        sandbox.outside_dest()?,
        before,
        "{entry:?} changed files outside dest"
    );
    assert_eq!(fs::read(sandbox.outside.join("file"))?, b"secret");
    Ok(())
}

#[test]
fn malicious_layers_are_refused() -> TestResult {
    type Build = Box<dyn Fn(&mut Layer, &str) -> io::Result<String>>;
    let cases: Vec<(&str, Build)> = vec![
        (
            "dot-dot",
            Box::new(|l, _| l.file("../escape", 0o644, b"x").map(|_| "../escape".into())),
        ),
        (
            "dot-dot in the middle",
            Box::new(|l, _| {
                l.file("a/../../../../escape", 0o644, b"x")
                    .map(|_| "a/../../../../escape".into())
            }),
        ),
        (
            "absolute",
            Box::new(|l, out| {
                let name = format!("{out}/pwned");
                l.file(&name, 0o644, b"x").map(|_| name)
            }),
        ),
        (
            "absolute directory",
            Box::new(|l, out| {
                let name = format!("{out}/newdir/");
                l.dir(&name, 0o755).map(|_| name)
            }),
        ),
        (
            "symlink to an absolute dir, then a file through it",
            Box::new(|l, out| {
                l.symlink("link", out)?.file("link/pwned", 0o644, b"x")?;
                Ok("link/pwned".into())
            }),
        ),
        (
            "symlink up and out, then a file through it",
            Box::new(|l, _| {
                l.symlink("link", "../..")?
                    .file("link/pwned", 0o644, b"x")?;
                Ok("link/pwned".into())
            }),
        ),
        (
            "symlink, then a directory through it",
            Box::new(|l, out| {
                l.symlink("link", out)?.dir("link/sub/", 0o755)?;
                Ok("link/sub/".into())
            }),
        ),
        (
            "symlink, then a device through it",
            Box::new(|l, out| {
                l.symlink("link", out)?.entry(
                    EntryType::Fifo,
                    "link/fifo",
                    "",
                    0o644,
                    b"",
                    |_| Ok(()),
                )?;
                Ok("link/fifo".into())
            }),
        ),
        (
            "symlink chain",
            Box::new(|l, out| {
                l.symlink("a", "b")?
                    .symlink("b", out)?
                    .file("a/x", 0o644, b"x")?;
                Ok("a/x".into())
            }),
        ),
        (
            "symlink deeper in the path",
            Box::new(|l, out| {
                l.dir("d/", 0o755)?
                    .symlink("d/link", out)?
                    .file("d/link/e/x", 0o644, b"x")?;
                Ok("d/link/e/x".into())
            }),
        ),
        (
            "hard link up and out",
            Box::new(|l, _| {
                l.hard_link("h", "../../../outside/file")?;
                Ok("h".into())
            }),
        ),
        (
            "hard link to an absolute path",
            Box::new(|l, out| {
                l.hard_link("h", &format!("{out}/file"))?;
                Ok("h".into())
            }),
        ),
        (
            "hard link through a symlink",
            Box::new(|l, out| {
                l.symlink("link", out)?.hard_link("h", "link/file")?;
                Ok("h".into())
            }),
        ),
        (
            "hard link whose own path goes through a symlink",
            Box::new(|l, out| {
                l.file("f", 0o644, b"f")?
                    .symlink("link", out)?
                    .hard_link("link/h", "f")?;
                Ok("link/h".into())
            }),
        ),
        (
            "whiteout going up",
            Box::new(|l, _| {
                l.file("../.wh.file", 0o644, b"")
                    .map(|_| "../.wh.file".into())
            }),
        ),
        (
            "whiteout of ..",
            Box::new(|l, _| l.file("a/.wh..", 0o644, b"").map(|_| "a/.wh..".into())),
        ),
        (
            "whiteout of .",
            Box::new(|l, _| l.file(".wh..", 0o644, b"").map(|_| ".wh..".into())),
        ),
        (
            "whiteout as a directory",
            Box::new(|l, _| l.file(".wh.../x", 0o644, b"").map(|_| ".wh.../x".into())),
        ),
        (
            "whiteout through a symlink",
            Box::new(|l, out| {
                l.symlink("link", out)?.file("link/.wh.file", 0o644, b"")?;
                Ok("link/.wh.file".into())
            }),
        ),
        (
            "opaque marker through a symlink",
            Box::new(|l, out| {
                l.symlink("link", out)?
                    .file("link/.wh..wh..opq", 0o644, b"")?;
                Ok("link/.wh..wh..opq".into())
            }),
        ),
        (
            "empty name",
            Box::new(|l, _| l.file("", 0o644, b"x").map(|_| String::new())),
        ),
    ];
    for (what, build) in cases {
        let sandbox = Sandbox::new()?;
        let out = sandbox.outside.display().to_string();
        let mut layer = Layer::new();
        let entry = build(&mut layer, &out)?;
        let tar = layer.finish()?;
        if let Err(e) = assert_refused(&sandbox, &tar, &entry) {
            return Err(format!("case {what:?}: {e}").into());
        }
    }
    Ok(())
}

#[test]
fn hard_links_must_name_an_earlier_file_of_the_layer() -> TestResult {
    for (setup, target) in [
        (None, "missing"),
        (Some("dir/"), "dir"),
        (Some("dir/"), "dir/missing"),
        (Some("file"), "file/x"),
        (None, "."),
    ] {
        let sandbox = Sandbox::new()?;
        let mut layer = Layer::new();
        match setup {
            Some(dir) if dir.ends_with('/') => layer.dir(dir, 0o755)?,
            Some(file) => layer.file(file, 0o644, b"")?,
            None => &mut layer,
        };
        layer.hard_link("h", target)?;
        assert_refused(&sandbox, &layer.finish()?, "h")?;
    }
    // A hard link to a symlink links the symlink itself.
    let sandbox = Sandbox::new()?;
    let mut layer = Layer::new();
    layer.symlink("s", "/etc/shadow")?.hard_link("h", "s")?;
    sandbox.unpack(&layer.finish()?)?;
    assert_eq!(
        fs::read_link(sandbox.dest.join("h"))?,
        Path::new("/etc/shadow")
    );
    Ok(())
}

#[test]
fn unsupported_entry_types_and_root_files_are_refused() -> TestResult {
    let sandbox = Sandbox::new()?;
    let mut layer = Layer::new();
    layer.entry(EntryType::new(b'V'), "volume", "", 0o644, b"", |_| Ok(()))?;
    assert_refused(&sandbox, &layer.finish()?, "volume")?;

    let sandbox = Sandbox::new()?;
    let mut layer = Layer::new();
    layer.symlink("./", "/etc")?;
    assert_refused(&sandbox, &layer.finish()?, "./")?;

    let sandbox = Sandbox::new()?;
    let mut layer = Layer::new();
    layer.file(".", 0o644, b"")?;
    assert_refused(&sandbox, &layer.finish()?, ".")?;
    Ok(())
}

#[test]
fn corrupt_and_truncated_streams_are_errors() -> TestResult {
    let tar = normal_layer()?;

    // A gzip stream cut in the middle.
    let gz = gzip(&tar)?;
    let sandbox = Sandbox::new()?;
    let cut = gz.get(..gz.len() / 2).unwrap_or_default();
    match unpack_layer(cut, Compression::Gzip, &sandbox.dest) {
        Err(UnpackError::Stream { .. }) => {}
        other => panic!("truncated gzip: {other:?}"),
    }
    // A gzip stream missing only its trailer (CRC and length).
    let sandbox = Sandbox::new()?;
    let cut = gz.get(..gz.len() - 4).unwrap_or_default();
    assert!(unpack_layer(cut, Compression::Gzip, &sandbox.dest).is_err());
    // Not gzip at all.
    let sandbox = Sandbox::new()?;
    match unpack_layer(&tar[..], Compression::Gzip, &sandbox.dest) {
        Err(UnpackError::Stream { .. }) => {}
        other => panic!("tar read as gzip: {other:?}"),
    }

    // A zstd stream cut in the middle, and a corrupted one.
    let zst = zstd(&tar);
    let sandbox = Sandbox::new()?;
    let cut = zst.get(..zst.len() / 2).unwrap_or_default();
    match unpack_layer(cut, Compression::Zstd, &sandbox.dest) {
        Err(UnpackError::Stream { .. }) => {}
        other => panic!("truncated zstd: {other:?}"),
    }
    let sandbox = Sandbox::new()?;
    match unpack_layer(&b"not zstd at all"[..], Compression::Zstd, &sandbox.dest) {
        Err(UnpackError::Stream { .. }) => {}
        other => panic!("garbage as zstd: {other:?}"),
    }
    let sandbox = Sandbox::new()?;
    match unpack_layer(&b""[..], Compression::Zstd, &sandbox.dest) {
        Err(UnpackError::Stream { .. }) => {}
        other => panic!("empty zstd: {other:?}"),
    }

    // A tar header whose checksum does not match (one byte of the first name changed).
    let mut corrupt = tar.clone();
    if let Some(byte) = corrupt.get_mut(0) {
        *byte ^= 0x20;
    }
    let sandbox = Sandbox::new()?;
    match sandbox.unpack(&corrupt) {
        Err(UnpackError::Tar { .. }) => {}
        other => panic!("corrupt header: {other:?}"),
    }
    // A header that is not a tar header at all, after a good entry.
    let mut layer = Layer::new();
    layer.file("first", 0o644, b"1")?;
    let mut garbage = layer.finish()?;
    garbage.truncate(1024);
    garbage.extend(std::iter::repeat_n(0xa5_u8, 512));
    let sandbox = Sandbox::new()?;
    match sandbox.unpack(&garbage) {
        Err(err @ UnpackError::Tar { .. }) => {
            assert!(err.to_string().contains("after entry \"first\""), "{err}");
        }
        other => panic!("garbage header: {other:?}"),
    }
    // A plain tar cut inside a file's data names that file.
    let mut layer = Layer::new();
    layer.file("big", 0o644, &[7; 5000])?;
    let whole = layer.finish()?;
    let sandbox = Sandbox::new()?;
    match sandbox.unpack(whole.get(..2048).unwrap_or_default()) {
        Err(err @ UnpackError::Tar { .. }) => {
            assert!(err.to_string().contains("\"big\""), "{err}");
        }
        other => panic!("truncated tar: {other:?}"),
    }
    Ok(())
}

#[test]
fn a_missing_destination_is_an_error() {
    let result = unpack_layer(
        &b""[..],
        Compression::None,
        Path::new("/nonexistent/tug/dest"),
    );
    assert!(
        matches!(result, Err(UnpackError::Destination { .. })),
        "{result:?}"
    );
}

#[test]
fn an_empty_tar_stream_is_an_empty_layer() -> TestResult {
    let sandbox = Sandbox::new()?;
    let tar = Layer::new().finish()?;
    let stats = sandbox.unpack(&tar)?;
    assert_eq!(
        stats,
        UnpackStats {
            diff_id: sha256(&tar),
            entries: 0,
            bytes: 1024
        }
    );
    Ok(())
}

#[test]
fn chain_ids_follow_the_oci_definition() {
    let d = |n: u8| sha256(&[n]);
    assert!(chain_ids(&[]).is_empty());
    assert_eq!(chain_ids(&[d(0)]), vec![d(0)]);

    let diff_ids = [d(0), d(1), d(2)];
    let c0 = d(0);
    let c1 = sha256(format!("{c0} {}", d(1)).as_bytes());
    let c2 = sha256(format!("{c1} {}", d(2)).as_bytes());
    assert_eq!(chain_ids(&diff_ids), vec![c0, c1, c2]);
}

#[test]
fn media_types_map_to_compressions() {
    for (media_type, expected) in [
        ("application/vnd.oci.image.layer.v1.tar", Compression::None),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::Zstd,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            Compression::None,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
            Compression::Zstd,
        ),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            Compression::Gzip,
        ),
    ] {
        assert!(
            matches!(Compression::from_media_type(media_type), Ok(c) if c == expected),
            "{media_type}"
        );
    }
    let err = Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+bzip2");
    match err {
        Err(e @ UnpackError::UnsupportedMediaType { .. }) => {
            assert!(e.to_string().contains("tar+bzip2"), "{e}");
        }
        other => panic!("bzip2 accepted: {other:?}"),
    }
}
