//! Where the image store keeps things under its root (`DATA/images`):
//!
//! ```text
//! blobs/sha256/<hex>   verified blobs: manifests, indexes, configs, compressed layers
//! ingest/<hex>         downloads in progress (kept for resuming; verified before use)
//! layers/<chain hex>/  each layer unpacked once, usable as an overlayfs lower dir
//! refs/<hex>.json      one record per pulled name (registry/repository:tag or @digest)
//! locks/<key>          flock files: one pull of a blob or layer at a time, across processes
//! tmp/                 layers being unpacked
//! unsynced/<chain hex> layers not yet known to be on disk (see `durability`)
//! ```

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::digest::Digest;
use super::error::{ImageError, Result};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// An exclusive lock on a key, released when dropped.
#[derive(Debug)]
pub struct KeyLock {
    _lock: Flock<File>,
}

impl Layout {
    pub fn create(root: &Path) -> Result<Layout> {
        let layout = Layout {
            root: root.to_path_buf(),
        };
        for dir in [
            layout.blobs_dir(),
            layout.ingest_dir(),
            layout.layers_dir(),
            layout.refs_dir(),
            layout.locks_dir(),
            layout.tmp_dir(),
            layout.unsynced_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(ImageError::io("create directory", &dir))?;
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    pub fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    pub fn ingest(&self, digest: &Digest) -> PathBuf {
        self.ingest_dir().join(digest.hex())
    }

    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    pub fn layer(&self, chain_id: &Digest) -> PathBuf {
        self.layers_dir().join(chain_id.hex())
    }

    pub fn refs_dir(&self) -> PathBuf {
        self.root.join("refs")
    }

    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    pub fn unsynced_dir(&self) -> PathBuf {
        self.root.join("unsynced")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Take the lock named `key` (blocking: call from a blocking context).
    pub fn lock_blocking(&self, key: &str) -> Result<KeyLock> {
        self.lock_blocking_mode(key, true)
    }

    /// Take the lock named `key`, exclusive or shared (blocking).
    pub fn lock_blocking_mode(&self, key: &str, exclusive: bool) -> Result<KeyLock> {
        let path = self.locks_dir().join(key);
        let file = File::create(&path).map_err(ImageError::io("create lock", &path))?;
        let mode = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        let lock = Flock::lock(file, mode).map_err(|(_, errno)| ImageError::Io {
            what: "lock",
            path,
            source: errno.into(),
        })?;
        Ok(KeyLock { _lock: lock })
    }

    /// Take the lock named `key` without blocking the async runtime.
    pub async fn lock(&self, key: String) -> Result<KeyLock> {
        self.lock_mode(key, true).await
    }

    /// Exclusive or shared, without blocking the async runtime.
    pub async fn lock_mode(&self, key: String, exclusive: bool) -> Result<KeyLock> {
        let layout = self.clone();
        tokio::task::spawn_blocking(move || layout.lock_blocking_mode(&key, exclusive))
            .await
            .map_err(|e| ImageError::Task(e.to_string()))?
    }
}
