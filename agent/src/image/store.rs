//! The image store: pull (resolve, fetch, verify, unpack), list, inspect, remove. Layout on disk:
//! see `layout.rs`.

use std::fs;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_spec::image::ImageConfiguration;

use super::credentials::{CredentialStore, Credentials};
use super::digest::Digest;
use super::error::{ImageError, Result};
use super::fetch::{BlobSpec, ensure_blob, registry_error};
use super::layout::Layout;
use super::manifest::{self, ACCEPT, Descriptor, Document};
use super::platform::Platform;
use super::progress::{Progress, PullEvent};
use super::record::{self, ImageRecord, LayerRecord};
use super::reference::ImageRef;
use super::unpack::{Compression, chain_ids, unpack_layer};

#[derive(Debug)]
pub struct StoreConfig {
    /// Usually `DATA/images`.
    pub root: PathBuf,
    /// `host[:port]` of registries spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    pub credentials: CredentialStore,
    /// Layers downloaded and unpacked at the same time.
    pub parallel_layers: usize,
    /// After a pull, sync the new layers on a background thread (see `durability`). For
    /// long-running processes (the agent); a short-lived one would only wait for it at exit,
    /// so without it new layers stay marked and are re-unpacked after a reboot.
    pub sync_in_background: bool,
}

impl StoreConfig {
    pub fn new(root: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            root: root.into(),
            insecure_registries: Vec::new(),
            credentials: CredentialStore::empty(),
            parallel_layers: 4,
            sync_in_background: false,
        }
    }
}

pub struct ImageStore {
    layout: Layout,
    client: oci_client::Client,
    credentials: CredentialStore,
    parallel_layers: usize,
    sync_in_background: bool,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.layout.root())
            .finish()
    }
}

impl ImageStore {
    pub fn open(config: StoreConfig) -> Result<ImageStore> {
        // reqwest's rustls needs a process-wide crypto provider; an earlier install is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let layout = Layout::create(&config.root)?;
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(config.insecure_registries),
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        });
        super::durability::drop_unsynced_from_before_boot(&layout)?;
        Ok(ImageStore {
            layout,
            client,
            credentials: config.credentials,
            parallel_layers: config.parallel_layers.max(1),
            sync_in_background: config.sync_in_background,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Pull `reference` for `platform`: afterwards every blob is verified in the store and every
    /// layer unpacked. Work already done (by an earlier or a concurrent pull) is not repeated.
    pub async fn pull(
        &self,
        reference: &ImageRef,
        platform: &Platform,
        progress: &Progress<'_>,
    ) -> Result<ImageRecord> {
        // Shared with other pulls, exclusive with prune.
        let _store = self.layout.lock_mode("store".into(), false).await?;
        let auth = match self.credentials.for_registry(reference.registry())? {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => RegistryAuth::Basic(username, password),
        };
        let top = self
            .fetch_document(reference, &auth, reference.digest())
            .await?;
        let (index_digest, manifest_digest, manifest) = match top.1 {
            Document::Manifest(m) => (None, top.0, m),
            Document::Index(entries) => {
                let entry = choose(reference, &entries, platform)?;
                let pinned = reference.with_digest(&entry.digest);
                let (digest, doc) = self
                    .fetch_document(&pinned, &auth, Some(&entry.digest))
                    .await?;
                match doc {
                    Document::Manifest(m) => (Some(top.0), digest, m),
                    Document::Index(_) => {
                        return Err(ImageError::Manifest {
                            reference: reference.to_string(),
                            reason: "an index inside an index".into(),
                        });
                    }
                }
            }
        };

        let config_digest = Digest::parse(&manifest.config.digest)?;
        let config_blob = BlobSpec {
            digest: config_digest.clone(),
            size: manifest.config.size,
            urls: None,
            what: "config",
        };
        ensure_blob(
            &self.client,
            &self.layout,
            reference,
            &config_blob,
            progress,
        )
        .await?;
        let config = self.read_config(&config_digest)?;
        check_platform(reference, &config, platform)?;
        let diff_ids: Vec<String> = config.rootfs().diff_ids().to_vec();
        if diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Manifest {
                reference: reference.to_string(),
                reason: format!(
                    "{} layers but the config lists {} diff ids",
                    manifest.layers.len(),
                    diff_ids.len()
                ),
            });
        }
        let chains = chain_ids(&diff_ids);
        progress.emit(PullEvent::Resolved {
            reference: reference.to_string(),
            digest: manifest_digest.clone(),
            layers: manifest.layers.len(),
            size: manifest.layers.iter().map(|l| l.size).sum(),
        });

        // Two phases, like containerd: every blob downloaded, verified and fsynced first, then
        // the unpacking. Interleaved, each blob's fsync would (on ext4's ordered mode) also have
        // to write out whatever the layers unpacked so far left dirty.
        let fetches = manifest
            .layers
            .iter()
            .map(|desc| self.fetch_layer(reference, desc, progress));
        futures_util::stream::iter(fetches)
            .buffer_unordered(self.parallel_layers)
            .try_collect::<Vec<()>>()
            .await?;
        let jobs = manifest
            .layers
            .iter()
            .zip(&diff_ids)
            .zip(&chains)
            .map(|((desc, diff), chain)| self.unpack_layer_record(desc, diff, chain, progress));
        let layers: Vec<LayerRecord> = futures_util::stream::iter(jobs)
            .buffered(self.parallel_layers)
            .try_collect()
            .await?;

        let record = ImageRecord {
            name: reference.name(),
            tag: reference.tag().map(str::to_string),
            index_digest: index_digest.map(|d| d.to_string()),
            manifest_digest: manifest_digest.to_string(),
            config_digest: config_digest.to_string(),
            platform: platform_of(&config),
            layers,
            pulled_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        record::write(&self.layout, &record)?;
        if self.sync_in_background {
            super::durability::sync_in_background(&self.layout);
        }
        Ok(record)
    }

    /// Fetch a manifest or index, check it against `expected` (if pinned), keep it as a blob.
    async fn fetch_document(
        &self,
        reference: &ImageRef,
        auth: &RegistryAuth,
        expected: Option<&str>,
    ) -> Result<(Digest, Document)> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference.oci(), auth, ACCEPT)
            .await
            .map_err(|e| registry_error(reference, &e))?;
        let digest = Digest::of(&bytes);
        if let Some(expected) = expected {
            let expected = Digest::parse(expected)?;
            if digest != expected {
                return Err(ImageError::DigestMismatch {
                    what: "manifest",
                    digest: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let doc = manifest::parse(&bytes).map_err(|reason| ImageError::Manifest {
            reference: reference.to_string(),
            reason,
        })?;
        self.put_blob(&digest, &bytes)?;
        Ok((digest, doc))
    }

    /// Store small verified content (manifests) as a blob.
    fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let dest = self.layout.blob(digest);
        if dest.exists() {
            return Ok(());
        }
        let tmp = self
            .layout
            .ingest_dir()
            .join(format!("{}.{}", digest.hex(), std::process::id()));
        fs::write(&tmp, bytes).map_err(ImageError::io("write blob", &tmp))?;
        super::durability::mark_unsynced(&self.layout, super::durability::Kind::Blob, digest)?;
        fs::rename(&tmp, &dest).map_err(ImageError::io("store blob", &dest))
    }

    /// Phase 1 of a layer: its blob verified in the store (its media type checked first, so an
    /// unsupported layer fails the pull before anything is downloaded).
    async fn fetch_layer(
        &self,
        reference: &ImageRef,
        desc: &Descriptor,
        progress: &Progress<'_>,
    ) -> Result<()> {
        let digest = Digest::parse(&desc.digest)?;
        Compression::from_media_type(&desc.media_type).map_err(|source| ImageError::Unpack {
            digest: digest.to_string(),
            source,
        })?;
        let blob = BlobSpec {
            digest,
            size: desc.size,
            urls: desc.urls.clone(),
            what: "layer",
        };
        ensure_blob(&self.client, &self.layout, reference, &blob, progress)
            .await
            .map(drop)
    }

    /// Phase 2 of a layer: unpacked under its chain id (once).
    async fn unpack_layer_record(
        &self,
        desc: &Descriptor,
        diff_id: &str,
        chain_id: &str,
        progress: &Progress<'_>,
    ) -> Result<LayerRecord> {
        let digest = Digest::parse(&desc.digest)?;
        let compression = Compression::from_media_type(&desc.media_type).map_err(|source| {
            ImageError::Unpack {
                digest: digest.to_string(),
                source,
            }
        })?;
        let diff = Digest::parse(diff_id)?;
        let chain = Digest::parse(chain_id)?;
        if self.unpack(&digest, compression, &diff, &chain).await? {
            progress.emit(PullEvent::LayerUnpacked {
                digest: digest.clone(),
                chain_id: chain.clone(),
            });
        }
        Ok(LayerRecord {
            digest: digest.to_string(),
            media_type: desc.media_type.clone(),
            size: desc.size,
            diff_id: diff.to_string(),
            chain_id: chain.to_string(),
        })
    }

    /// Unpack a verified layer blob into `layers/<chain id>` unless it is there; true if it did.
    /// The layer is not synced here (see `durability`): it carries an "unsynced" marker until a
    /// background sync, and is dropped at the next start if the machine went down before that.
    async fn unpack(
        &self,
        digest: &Digest,
        compression: Compression,
        diff_id: &Digest,
        chain_id: &Digest,
    ) -> Result<bool> {
        let dest = self.layout.layer(chain_id);
        if dest.exists() {
            return Ok(false);
        }
        let _lock = self
            .layout
            .lock(format!("layer-{}", chain_id.hex()))
            .await?;
        if dest.exists() {
            return Ok(false);
        }
        let blob = self.layout.blob(digest);
        let tmp = TempLayer(self.layout.tmp_dir().join(format!(
            "{}.{}",
            chain_id.hex(),
            std::process::id()
        )));
        let _ = fs::remove_dir_all(&tmp.0);
        fs::create_dir(&tmp.0).map_err(ImageError::io("create layer dir", &tmp.0))?;
        let (target, digest_s) = (tmp.0.clone(), digest.to_string());
        let stats = tokio::task::spawn_blocking(move || -> Result<_> {
            let file = fs::File::open(&blob).map_err(ImageError::io("open layer blob", &blob))?;
            unpack_layer(
                std::io::BufReader::with_capacity(256 * 1024, file),
                compression,
                &target,
            )
            .map_err(|source| ImageError::Unpack {
                digest: digest_s,
                source,
            })
        })
        .await
        .map_err(|e| ImageError::Task(e.to_string()))??;
        if stats.diff_id != diff_id.to_string() {
            return Err(ImageError::DiffIdMismatch {
                digest: digest.to_string(),
                expected: diff_id.to_string(),
                actual: stats.diff_id,
            });
        }
        super::durability::mark_unsynced(&self.layout, super::durability::Kind::Layer, chain_id)?;
        fs::rename(&tmp.0, &dest).map_err(ImageError::io("store layer", &dest))?;
        tmp.keep();
        Ok(true)
    }

    fn read_config(&self, digest: &Digest) -> Result<ImageConfiguration> {
        let path = self.layout.blob(digest);
        let raw = fs::read(&path).map_err(ImageError::io("read image config", &path))?;
        serde_json::from_slice(&raw).map_err(|source| ImageError::Json {
            what: format!("image config {digest}"),
            source,
        })
    }

    /// The record of a pulled image (by `name:tag`, or `name@digest`).
    pub fn get(&self, reference: &ImageRef) -> Result<ImageRecord> {
        let key = key_of(reference);
        if let Some(r) = record::read(&self.layout, &key)? {
            return Ok(r);
        }
        // A digest may name the platform manifest of an image pulled by tag.
        if let Some(digest) = reference.digest() {
            let name = reference.name();
            for r in record::list(&self.layout)? {
                if r.name == name
                    && (r.manifest_digest == digest || r.index_digest.as_deref() == Some(digest))
                {
                    return Ok(r);
                }
            }
        }
        Err(ImageError::NotFound(reference.to_string()))
    }

    /// Delete blobs and layers nothing references (see `gc`).
    pub fn prune(
        &self,
        keep_chain_ids: &std::collections::HashSet<String>,
    ) -> Result<super::gc::PruneStats> {
        super::gc::prune(&self.layout, keep_chain_ids)
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        record::list(&self.layout)
    }

    /// Forget a pulled name; its blobs and layers go at the next prune if nothing else uses them.
    pub fn remove(&self, reference: &ImageRef) -> Result<ImageRecord> {
        let r = self.get(reference)?;
        record::remove(&self.layout, &r.key())?;
        Ok(r)
    }

    /// The image's config (env, entrypoint, cmd, user, working dir, ports...).
    pub fn config(&self, record: &ImageRecord) -> Result<ImageConfiguration> {
        self.read_config(&Digest::parse(&record.config_digest)?)
    }

    /// Unpacked layer dirs, bottom first.
    pub fn layer_dirs(&self, record: &ImageRecord) -> Result<Vec<PathBuf>> {
        record
            .layers
            .iter()
            .map(|l| {
                let dir = self.layout.layer(&Digest::parse(&l.chain_id)?);
                if dir.is_dir() {
                    Ok(dir)
                } else {
                    Err(ImageError::NotFound(format!(
                        "{} (layer {} missing: pull it again)",
                        record.key(),
                        l.digest
                    )))
                }
            })
            .collect()
    }
}

/// A layer being unpacked: removed if the unpack fails, kept once renamed into place.
struct TempLayer(PathBuf);

impl TempLayer {
    fn keep(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for TempLayer {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn key_of(reference: &ImageRef) -> String {
    match (reference.tag(), reference.digest()) {
        (Some(tag), _) => format!("{}:{tag}", reference.name()),
        (None, Some(d)) => format!("{}@{d}", reference.name()),
        (None, None) => format!("{}:latest", reference.name()),
    }
}

/// The index entry for `platform`: an exact variant match first, else any compatible one.
fn choose<'a>(
    reference: &ImageRef,
    entries: &'a [manifest::IndexEntry],
    platform: &Platform,
) -> Result<&'a manifest::IndexEntry> {
    let candidates: Vec<&manifest::IndexEntry> = entries
        .iter()
        .filter(|e| e.platform().is_some_and(|p| platform.matches(&p)))
        .collect();
    let exact = candidates
        .iter()
        .find(|e| e.platform().is_some_and(|p| p.variant == platform.variant));
    if let Some(e) = exact.or(candidates.first()) {
        return Ok(e);
    }
    let available: Vec<String> = entries
        .iter()
        .map(|e| {
            e.platform()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "(no platform)".into())
        })
        .collect();
    Err(ImageError::NoPlatform {
        reference: reference.to_string(),
        wanted: platform.to_string(),
        available: available.join(", "),
    })
}

fn platform_of(config: &ImageConfiguration) -> String {
    let mut p = format!("{}/{}", config.os(), config.architecture());
    if let Some(v) = config.variant() {
        p.push('/');
        p.push_str(v);
    }
    p
}

/// A single-platform image must be for the platform asked for.
fn check_platform(
    reference: &ImageRef,
    config: &ImageConfiguration,
    wanted: &Platform,
) -> Result<()> {
    let have = Platform::new(
        &config.os().to_string(),
        &config.architecture().to_string(),
        config.variant().as_deref(),
    );
    if have.architecture.is_empty() || wanted.matches(&have) || have.matches(wanted) {
        Ok(())
    } else {
        Err(ImageError::NoPlatform {
            reference: reference.to_string(),
            wanted: wanted.to_string(),
            available: have.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(platform: &str) -> manifest::IndexEntry {
        let p = Platform::parse(platform).ok();
        manifest::IndexEntry {
            media_type: None,
            digest: format!("sha256:{platform}"),
            size: 1,
            platform: p.map(|p| manifest::IndexPlatform {
                architecture: p.architecture,
                os: p.os,
                variant: p.variant,
            }),
        }
    }

    #[test]
    fn choose_prefers_exact_variant_and_names_what_exists() -> Result<()> {
        let r = ImageRef::parse("example.com/app:1")?;
        let entries = [
            entry("linux/amd64"),
            entry("linux/arm/v6"),
            entry("linux/arm/v7"),
            entry("linux/arm64/v8"),
        ];
        assert_eq!(
            choose(&r, &entries, &Platform::parse("linux/arm/v7")?)?.digest,
            "sha256:linux/arm/v7"
        );
        assert_eq!(
            choose(&r, &entries, &Platform::parse("linux/arm64")?)?.digest,
            "sha256:linux/arm64/v8"
        );
        assert_eq!(
            choose(&r, &entries, &Platform::parse("linux/amd64")?)?.digest,
            "sha256:linux/amd64"
        );
        match choose(&r, &entries, &Platform::parse("linux/s390x")?) {
            Err(e) => assert_eq!(
                e.to_string(),
                "example.com/app:1: no image for linux/s390x in its index; it has linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64/v8"
            ),
            Ok(e) => panic!("chose {e:?}"),
        }
        Ok(())
    }
}
