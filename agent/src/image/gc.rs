//! `prune`: delete blobs and unpacked layers that no image record references and no mounted
//! rootfs uses. Pulls hold the store lock shared, prune holds it exclusive, so a pull in
//! progress never loses what it just fetched.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use super::error::{ImageError, Result};
use super::layout::Layout;
use super::record;
use super::rootfs::mounts;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneStats {
    pub blobs: usize,
    pub layers: usize,
    pub bytes: u64,
}

/// Remove what nothing needs. `keep_chain_ids` are layers in use by containers that may not be
/// mounted right now (stopped, about to restart).
pub fn prune(layout: &Layout, keep_chain_ids: &HashSet<String>) -> Result<PruneStats> {
    let _lock = layout.lock_blocking_mode("store", true)?;
    let records = record::list(layout)?;
    let blobs: HashSet<String> = records
        .iter()
        .flat_map(|r| r.blobs())
        .filter_map(|d| d.strip_prefix("sha256:").map(str::to_string))
        .collect();
    let mut layers: HashSet<String> = records
        .iter()
        .flat_map(|r| r.layers.iter().map(|l| l.chain_id.clone()))
        .chain(keep_chain_ids.iter().cloned())
        .filter_map(|d| d.strip_prefix("sha256:").map(str::to_string))
        .collect();
    // Whatever an overlay mounted in this namespace uses stays, recorded or not.
    let layers_dir = layout.layers_dir();
    let prefix = format!("{}/", layers_dir.display());
    for m in mounts()?.into_iter().filter(|m| m.fs_type == "overlay") {
        for opt in m.super_options.split(',') {
            if let Some(lower) = opt.strip_prefix("lowerdir=") {
                layers.extend(
                    lower
                        .split(':')
                        .filter_map(|p| p.strip_prefix(&prefix))
                        .map(str::to_string),
                );
            }
        }
    }

    let mut stats = PruneStats::default();
    for (hex, path) in entries(&layout.blobs_dir())? {
        if !blobs.contains(&hex) {
            stats.bytes += fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&path).map_err(ImageError::io("remove blob", &path))?;
            stats.blobs += 1;
        }
    }
    for (hex, path) in entries(&layers_dir)? {
        if !layers.contains(&hex) {
            if path.is_dir() {
                fs::remove_dir_all(&path).map_err(ImageError::io("remove layer", &path))?;
                stats.layers += 1;
            } else {
                let _ = fs::remove_file(&path);
            }
        }
    }
    // No pull runs now: partial downloads, half-unpacked layers and lock files can go too.
    for dir in [layout.ingest_dir(), layout.tmp_dir()] {
        for (_, path) in entries(&dir)? {
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
    // Markers of what is gone.
    for (name, path) in entries(&layout.unsynced_dir())? {
        let target = match (name.strip_prefix("layer-"), name.strip_prefix("blob-")) {
            (Some(hex), _) => layout.layers_dir().join(hex),
            (_, Some(hex)) => layout.blobs_dir().join(hex),
            _ => path.clone(),
        };
        if !target.exists() {
            let _ = fs::remove_file(&path);
        }
    }
    for (name, path) in entries(&layout.locks_dir())? {
        if name != "store" {
            let _ = fs::remove_file(&path);
        }
    }
    Ok(stats)
}

fn entries(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(ImageError::io("list", dir))? {
        let e = e.map_err(ImageError::io("list", dir))?;
        out.push((e.file_name().to_string_lossy().into_owned(), e.path()));
    }
    Ok(out)
}
