//! Turning the name of a tar entry into a checked path inside the layer, and recognising the OCI
//! whiteout names.
//!
//! A [`LayerPath`] is a list of plain components: never empty, `.` or `..`, never containing `/`
//! or NUL. It is only ever resolved one component at a time relative to a directory fd (see
//! `tree.rs`), so a checked path cannot leave the layer by itself; symlinks are the tree's job.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// Longest entry or hard link name accepted, in bytes (Linux's `PATH_MAX`). Longer names cannot
/// be used by ordinary programs inside a container and only make the unpacker walk deep trees.
pub(super) const MAX_PATH_BYTES: usize = 4096;

/// Prefix of an OCI whiteout name: `.wh.NAME` deletes `NAME` of the lower layers.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix of whiteout "meta" names (the opaque marker and aufs' own bookkeeping).
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
/// The opaque marker: `D/.wh..wh..opq` hides everything the lower layers have in `D`.
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

/// A checked path inside a layer; no components means the layer's root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LayerPath {
    comps: Vec<OsString>,
}

impl LayerPath {
    /// The layer's root directory.
    pub(super) fn root() -> LayerPath {
        LayerPath { comps: Vec::new() }
    }

    /// All components, from the layer root down.
    pub(super) fn components(&self) -> &[OsString] {
        &self.comps
    }

    /// The parent's components and the last component, or `None` for the root.
    pub(super) fn split_last(&self) -> Option<(&[OsString], &OsStr)> {
        self.comps
            .split_last()
            .map(|(last, parent)| (parent, last.as_os_str()))
    }

    /// The path relative to the layer root, for joining onto the destination directory.
    pub(super) fn to_relative(&self) -> PathBuf {
        self.comps.iter().collect()
    }
}

/// Shows the first `len` components joined by `/`, for error messages.
pub(super) fn shown_prefix(comps: &[OsString], len: usize) -> String {
    let mut out = String::new();
    for (i, comp) in comps.iter().take(len).enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(&comp.to_string_lossy());
    }
    out
}

/// Checks the raw name of a tar entry (or a hard link's target) and splits it into components.
///
/// Empty components (`a//b`, a trailing `/`) and `.` components (a leading `./`) are dropped, so
/// `.` and `./` become the layer root. The reason for a refusal completes the sentence "the path
/// ...".
pub(super) fn parse(raw: &[u8]) -> Result<LayerPath, &'static str> {
    if raw.is_empty() {
        return Err("is empty");
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err("is longer than 4096 bytes");
    }
    if raw.contains(&0) {
        return Err("contains a NUL byte");
    }
    if raw.first() == Some(&b'/') {
        return Err("is absolute");
    }
    let mut comps = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("contains a `..` component"),
            _ => comps.push(OsString::from_vec(comp.to_vec())),
        }
    }
    Ok(LayerPath { comps })
}

/// What an entry means beyond "create this path", judged by its name alone.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Role<'a> {
    /// An ordinary entry.
    Plain,
    /// `D/.wh..wh..opq`: the parent directory `D` is opaque.
    Opaque,
    /// `D/.wh.NAME`: `NAME` in `D` is deleted; holds `NAME`.
    Whiteout(&'a OsStr),
    /// Other `.wh..wh.*` names, or anything below such a directory: aufs bookkeeping that a
    /// layer does not need (for example `.wh..wh.plnk`). Skipped.
    AufsMeta,
}

/// Classifies a checked path by its whiteout names. A whiteout name in the middle of a path (a
/// directory called `.wh.x`) cannot be represented and is refused, as are whiteouts that name
/// nothing, `.` or `..`; the reason completes the sentence "the path ...".
pub(super) fn role(path: &LayerPath) -> Result<Role<'_>, &'static str> {
    let Some((parents, last)) = path.split_last() else {
        return Ok(Role::Plain);
    };
    for comp in parents {
        let comp = comp.as_bytes();
        if comp.starts_with(WHITEOUT_META_PREFIX) {
            return Ok(Role::AufsMeta);
        }
        if comp.starts_with(WHITEOUT_PREFIX) {
            return Err("uses a whiteout name (`.wh.`) as a directory");
        }
    }
    let last = last.as_bytes();
    if last == WHITEOUT_OPAQUE {
        return Ok(Role::Opaque);
    }
    if last.starts_with(WHITEOUT_META_PREFIX) {
        return Ok(Role::AufsMeta);
    }
    match last.strip_prefix(WHITEOUT_PREFIX) {
        None => Ok(Role::Plain),
        Some(b"") => Err("is a whiteout (`.wh.`) that names no file"),
        Some(b"." | b"..") => Err("is a whiteout (`.wh.`) of `.` or `..`"),
        Some(name) => Ok(Role::Whiteout(OsStr::from_bytes(name))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(raw: &str) -> Result<Vec<String>, &'static str> {
        parse(raw.as_bytes()).map(|p| {
            p.components()
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn plain_paths_are_split_and_normalised() -> Result<(), &'static str> {
        assert_eq!(comps("a/b/c")?, ["a", "b", "c"]);
        assert_eq!(comps("./a/b/")?, ["a", "b"]);
        assert_eq!(comps("a//./b")?, ["a", "b"]);
        assert_eq!(comps("...")?, ["..."]);
        assert_eq!(comps("a/..b")?, ["a", "..b"]);
        assert!(comps(".")?.is_empty());
        assert!(comps("./")?.is_empty());
        Ok(())
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/..",
            "..",
            "./../x",
            "//x",
        ] {
            assert!(comps(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(b"a\0b").is_err());
        assert!(parse(&vec![b'a'; MAX_PATH_BYTES + 1]).is_err());
    }

    #[test]
    fn whiteouts_are_recognised() -> Result<(), &'static str> {
        let role_of = |raw: &str| -> Result<String, &'static str> {
            let path = parse(raw.as_bytes())?;
            Ok(format!("{:?}", role(&path)?))
        };
        assert_eq!(role_of("a/b")?, "Plain");
        assert_eq!(role_of(".")?, "Plain");
        assert_eq!(role_of("a/.wh.b")?, r#"Whiteout("b")"#);
        assert_eq!(role_of(".wh..b")?, r#"Whiteout(".b")"#);
        assert_eq!(role_of("a/.wh..wh..opq")?, "Opaque");
        assert_eq!(role_of(".wh..wh.plnk/123.456")?, "AufsMeta");
        assert_eq!(role_of(".wh..wh.aufs")?, "AufsMeta");
        for bad in [".wh.", "a/.wh..", "a/.wh...", ".wh.x/y"] {
            assert!(role_of(bad).is_err(), "{bad:?} was accepted");
        }
        Ok(())
    }
}
