//! Unpacked layers are made durable without making pulls wait for the disk.
//!
//! Forcing every unpacked file to disk (fsync each, or syncfs) would make a pull wait for the
//! whole filesystem's dirty data, including other processes' writes. But unflushed data is lost
//! only when the machine goes down (a crash of tug leaves it in the page cache), and that always
//! means a reboot. So a new layer gets a marker `unsynced/<chain>` before it is renamed into
//! place; a background syncfs removes the markers it covered; and when the store opens, a marker
//! older than the current boot means the machine went down before its layer reached the disk:
//! that layer is deleted and unpacked again from its verified blob when next needed.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::digest::Digest;
use super::error::{ImageError, Result};
use super::layout::Layout;

fn marker(layout: &Layout, chain_id: &Digest) -> PathBuf {
    layout.unsynced_dir().join(chain_id.hex())
}

/// Record that `chain_id`'s layer is not known to be on disk yet (before it is renamed in).
pub fn mark_unsynced(layout: &Layout, chain_id: &Digest) -> Result<()> {
    let path = marker(layout, chain_id);
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

/// At open: layers whose marker predates this boot may be incomplete on disk; remove them.
pub fn drop_layers_from_before_boot(layout: &Layout) -> Result<()> {
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
        let layer = layout.layers_dir().join(name);
        tracing::warn!(layer = %layer.display(), "layer unpacked before the last reboot was never synced: removing it");
        match fs::remove_dir_all(&layer) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io("remove unsynced layer", &layer)(e)),
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
    fn layers_marked_before_boot_are_dropped_and_fresh_ones_kept() -> Result<()> {
        let dir = tempfile::tempdir().map_err(ImageError::io("tempdir", "/tmp"))?;
        let layout = Layout::create(dir.path())?;
        let (old, new) = (Digest::of(b"old"), Digest::of(b"new"));
        for d in [&old, &new] {
            fs::create_dir_all(layout.layer(d))
                .map_err(ImageError::io("mkdir", layout.layer(d)))?;
            mark_unsynced(&layout, d)?;
        }
        // Pretend the old marker was written before this boot.
        let before_boot = boot_time()? - Duration::from_secs(60);
        let f = fs::File::options()
            .write(true)
            .open(marker(&layout, &old))
            .map_err(ImageError::io("open", "marker"))?;
        f.set_modified(before_boot)
            .map_err(ImageError::io("touch", "marker"))?;
        drop_layers_from_before_boot(&layout)?;
        assert!(!layout.layer(&old).exists() && !marker(&layout, &old).exists());
        assert!(layout.layer(&new).exists() && marker(&layout, &new).exists());
        Ok(())
    }
}
