//! What the store remembers about each pulled image: one JSON file per name under `refs/`.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::error::{ImageError, Result};
use super::layout::Layout;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub diff_id: String,
    pub chain_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `registry/repository`.
    pub name: String,
    pub tag: Option<String>,
    /// The digest the user pinned, or the index's digest when the name pointed at an index.
    pub index_digest: Option<String>,
    /// The platform-specific manifest that was pulled.
    pub manifest_digest: String,
    pub config_digest: String,
    pub platform: String,
    pub layers: Vec<LayerRecord>,
    /// Unix seconds.
    pub pulled_at: u64,
}

impl ImageRecord {
    /// `name:tag`, or `name@digest` when pulled by digest only.
    pub fn key(&self) -> String {
        match &self.tag {
            Some(tag) => format!("{}:{tag}", self.name),
            None => format!(
                "{}@{}",
                self.name,
                self.index_digest
                    .as_deref()
                    .unwrap_or(&self.manifest_digest)
            ),
        }
    }

    /// Compressed size of its layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// Every blob it needs: manifest, index, config and layers.
    pub fn blobs(&self) -> Vec<String> {
        let mut all = vec![self.manifest_digest.clone(), self.config_digest.clone()];
        all.extend(self.index_digest.clone());
        all.extend(self.layers.iter().map(|l| l.digest.clone()));
        all
    }
}

fn path_for(layout: &Layout, key: &str) -> PathBuf {
    layout
        .refs_dir()
        .join(format!("{}.json", Digest::of(key.as_bytes()).hex()))
}

pub fn write(layout: &Layout, record: &ImageRecord) -> Result<()> {
    let path = path_for(layout, &record.key());
    // One temporary file per writer: two pulls of the same image may finish at once.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "json.{}.{}.tmp",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let json = serde_json::to_vec_pretty(record).map_err(|source| ImageError::Json {
        what: "image record".into(),
        source,
    })?;
    // Atomic, not fsynced: a record lost in a crash only means pulling again, which finds its
    // blobs and layers in place (see `durability`).
    fs::write(&tmp, json).map_err(ImageError::io("write image record", &tmp))?;
    fs::rename(&tmp, &path).map_err(ImageError::io("store image record", &path))
}

pub fn read(layout: &Layout, key: &str) -> Result<Option<ImageRecord>> {
    let path = path_for(layout, key);
    match fs::read(&path) {
        Ok(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|source| ImageError::Json {
                what: format!("image record {}", path.display()),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ImageError::io("read image record", &path)(e)),
    }
}

pub fn remove(layout: &Layout, key: &str) -> Result<bool> {
    let path = path_for(layout, key);
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ImageError::io("remove image record", &path)(e)),
    }
}

pub fn list(layout: &Layout) -> Result<Vec<ImageRecord>> {
    let dir = layout.refs_dir();
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).map_err(ImageError::io("list image records", &dir))? {
        let entry = entry.map_err(ImageError::io("list image records", &dir))?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let raw = fs::read(&path).map_err(ImageError::io("read image record", &path))?;
            let record: ImageRecord =
                serde_json::from_slice(&raw).map_err(|source| ImageError::Json {
                    what: format!("image record {}", path.display()),
                    source,
                })?;
            out.push(record);
        }
    }
    out.sort_by_key(|r| r.key());
    Ok(out)
}
