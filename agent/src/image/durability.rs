//! Blobs and unpacked layers are made durable without making pulls wait for the disk.
//!
//! On ext4 (ordered mode) any fsync commits the journal and first writes out the data of every
//! file touched since the last commit: a pull that fsyncs waits for the whole filesystem's dirty
//! data, other processes' included. But unflushed data is lost only when the machine goes down
//! (a crash of tug leaves it in the page cache), and that always means a reboot. So a new blob or
//! layer gets a marker (`unsynced/blob-<hex>`, `unsynced/layer-<chain>`) before it is renamed
//! into place; a background syncfs (in long-running processes) removes the markers it covered;
//! and when the store opens, a marker older than the current boot means the machine went down
//! before its content reached the disk: that blob or layer is deleted, to be downloaded or
//! unpacked again when next needed.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::digest::Digest;
use super::error::{ImageError, Result};
use super::layout::Layout;

/// What a marker stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Layer,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Blob => "blob-",
            Kind::Layer => "layer-",
        }
    }
}

fn marker(layout: &Layout, kind: Kind, digest: &Digest) -> PathBuf {
    layout
        .unsynced_dir()
        .join(format!("{}{}", kind.prefix(), digest.hex()))
}

/// Record that a blob or layer is not known to be on disk yet (before it is renamed in).
pub fn mark_unsynced(layout: &Layout, kind: Kind, digest: &Digest) -> Result<()> {
    let path = marker(layout, kind, digest);
    fs::write(&path, b"").map_err(ImageError::io("write marker", &path))
}

/// Sync the store's filesystem on a thread of its own, then remove the markers that existed
/// before the sync started (they are covered by it).
pub fn sync_in_background(layout: &Layout) {
    let markers = unsynced_markers(layout);
    if markers.is_empty() {
        return;
    }
    let dir = layout.unsynced_dir();
    let spawned = std::thread::Builder::new().name("tug-image-sync".into()).spawn(move || {
        let synced = match fs::File::open(&dir) {
            Ok(d) => nix::unistd::syncfs(&d).map_err(std::io::Error::from),
            Err(e) => Err(e),
        };
        match synced {
            Ok(()) => {
                for m in markers {
                    let _ = fs::remove_file(m);
                }
            }
            Err(e) => tracing::warn!(error = %e, "background sync of unpacked layers failed; they stay marked"),
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the background sync of unpacked layers");
    }
}

fn unsynced_markers(layout: &Layout) -> Vec<PathBuf> {
    fs::read_dir(layout.unsynced_dir())
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// At open: blobs and layers whose marker predates this boot may be incomplete on disk: remove
/// them.
pub fn drop_unsynced_from_before_boot(layout: &Layout) -> Result<()> {
    let markers = unsynced_markers(layout);
    if markers.is_empty() {
        return Ok(());
    }
    let boot = boot_time()?;
    for m in markers {
        let made = fs::metadata(&m)
            .and_then(|md| md.modified())
            .unwrap_or(UNIX_EPOCH);
        if made >= boot {
            continue;
        }
        let name = m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let removed = if let Some(hex) = name.strip_prefix(Kind::Layer.prefix()) {
            let layer = layout.layers_dir().join(hex);
            tracing::warn!(layer = %layer.display(), "layer unpacked before the last reboot was never synced: removing it");
            fs::remove_dir_all(&layer).map_err(|e| (layer, e))
        } else if let Some(hex) = name.strip_prefix(Kind::Blob.prefix()) {
            let blob = layout.blobs_dir().join(hex);
            tracing::warn!(blob = %blob.display(), "blob stored before the last reboot was never synced: removing it");
            fs::remove_file(&blob).map_err(|e| (blob, e))
        } else {
            Ok(())
        };
        match removed {
            Ok(()) => {}
            Err((_, e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err((path, e)) => return Err(ImageError::io("remove unsynced content", path)(e)),
        }
        fs::remove_file(&m).map_err(ImageError::io("remove marker", &m))?;
    }
    Ok(())
}

/// When this boot started (`btime` in /proc/stat).
fn boot_time() -> Result<SystemTime> {
    let path = std::path::Path::new("/proc/stat");
    let text = fs::read_to_string(path).map_err(ImageError::io("read", path))?;
    let secs = text
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| ImageError::Mount("no btime in /proc/stat".into()))?;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_marked_before_boot_is_dropped_and_fresh_content_kept() -> Result<()> {
        let dir = tempfile::tempdir().map_err(ImageError::io("tempdir", "/tmp"))?;
        let layout = Layout::create(dir.path())?;
        let (old, new) = (Digest::of(b"old"), Digest::of(b"new"));
        for d in [&old, &new] {
            fs::create_dir_all(layout.layer(d))
                .map_err(ImageError::io("mkdir", layout.layer(d)))?;
            mark_unsynced(&layout, Kind::Layer, d)?;
            fs::write(layout.blob(d), b"x").map_err(ImageError::io("write", layout.blob(d)))?;
            mark_unsynced(&layout, Kind::Blob, d)?;
        }
        // Pretend the old markers were written before this boot.
        let before_boot = boot_time()? - Duration::from_secs(60);
        for kind in [Kind::Layer, Kind::Blob] {
            let path = marker(&layout, kind, &old);
            let f = fs::File::options()
                .write(true)
                .open(&path)
                .map_err(ImageError::io("open", &path))?;
            f.set_modified(before_boot)
                .map_err(ImageError::io("touch", &path))?;
        }
        drop_unsynced_from_before_boot(&layout)?;
        assert!(!layout.layer(&old).exists() && !layout.blob(&old).exists());
        assert!(
            !marker(&layout, Kind::Layer, &old).exists()
                && !marker(&layout, Kind::Blob, &old).exists()
        );
        assert!(layout.layer(&new).exists() && layout.blob(&new).exists());
        assert!(
            marker(&layout, Kind::Layer, &new).exists()
                && marker(&layout, Kind::Blob, &new).exists()
        );
        Ok(())
    }
}
