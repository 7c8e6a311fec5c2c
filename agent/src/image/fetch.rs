//! Getting one blob into the store: streamed to `ingest/<hex>` while its sha256 is computed, size
//! and digest checked, fsynced, then renamed into `blobs/`. A failed download keeps the bytes it
//! got and resumes from there (re-hashing them first); content that fails verification is
//! deleted, never stored.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, LayerDescriptor};
use sha2::{Digest as _, Sha256};

use super::digest::Digest;
use super::durability::Kind;
use super::error::{ImageError, Result, chain};
use super::layout::Layout;
use super::progress::{Progress, PullEvent};
use super::reference::ImageRef;

const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// One blob to fetch.
#[derive(Debug, Clone)]
pub struct BlobSpec {
    pub digest: Digest,
    pub size: u64,
    pub urls: Option<Vec<String>>,
    pub what: &'static str,
}

/// Make sure `blob` is in the store, downloading it if needed. Returns true if it was fetched.
pub async fn ensure_blob(
    client: &oci_client::Client,
    layout: &Layout,
    image: &ImageRef,
    blob: &BlobSpec,
    progress: &Progress<'_>,
) -> Result<bool> {
    let dest = layout.blob(&blob.digest);
    if dest.exists() {
        progress.emit(PullEvent::BlobExists {
            digest: blob.digest.clone(),
            size: blob.size,
        });
        return Ok(false);
    }
    let _lock = layout.lock(format!("blob-{}", blob.digest.hex())).await?;
    if dest.exists() {
        // Someone else fetched it while we waited.
        progress.emit(PullEvent::BlobExists {
            digest: blob.digest.clone(),
            size: blob.size,
        });
        return Ok(false);
    }
    let partial = layout.ingest(&blob.digest);
    let mut resumed = partial.exists();
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        match download(client, image, blob, &partial, progress).await {
            Ok(()) => break,
            // Bytes kept from an earlier attempt were bad (they are deleted now): start over.
            Err(err @ ImageError::DigestMismatch { .. }) if resumed => {
                tracing::warn!(digest = %blob.digest, error = %err, "resumed download failed verification, starting over");
                resumed = false;
            }
            Err(err) if err.is_transient() && attempt < ATTEMPTS => {
                tracing::warn!(digest = %blob.digest, attempt, error = %err, "blob download failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(err) => return Err(err),
        }
    }
    super::durability::mark_unsynced(layout, Kind::Blob, &blob.digest)?;
    fs::rename(&partial, &dest).map_err(ImageError::io("store blob", &dest))?;
    progress.emit(PullEvent::BlobDone {
        digest: blob.digest.clone(),
        size: blob.size,
    });
    Ok(true)
}

/// One attempt: resume from what `partial` holds, stream the rest, verify.
async fn download(
    client: &oci_client::Client,
    image: &ImageRef,
    blob: &BlobSpec,
    partial: &Path,
    progress: &Progress<'_>,
) -> Result<()> {
    let (mut hasher, mut have) = rehash_partial(partial, blob.size)?;
    if have < blob.size || blob.size == 0 {
        let desc = LayerDescriptor {
            digest: &blob.digest.to_string(),
            urls: &blob.urls,
        };
        // Always a ranged request: a 206 answer resumes, a 200 starts over. oci-client does not
        // hash ranged answers, so each byte is hashed once, here.
        let response = client
            .pull_blob_stream_partial(image.oci(), &desc, have, None)
            .await
            .map_err(|e| registry_error(image, &e))?;
        let mut stream = match response {
            BlobResponse::Partial(s) => s,
            BlobResponse::Full(s) => {
                hasher = Sha256::new();
                have = 0;
                s
            }
        };
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(have == 0)
            .append(have > 0)
            .open(partial)
            .map_err(ImageError::io("open download", partial))?;
        progress.emit(PullEvent::BlobProgress {
            digest: blob.digest.clone(),
            done: have,
            total: blob.size,
        });
        while let Some(chunk) = stream.stream.next().await {
            let chunk = chunk.map_err(|e| ImageError::Registry {
                reference: image.to_string(),
                message: format!(
                    "download of {} broke off after {have} bytes: {}",
                    blob.digest,
                    chain(&e)
                ),
                transient: true,
            })?;
            have += chunk.len() as u64;
            if have > blob.size {
                drop(file);
                let _ = fs::remove_file(partial);
                return Err(ImageError::SizeMismatch {
                    what: blob.what,
                    digest: blob.digest.to_string(),
                    expected: blob.size,
                    actual: have,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .map_err(ImageError::io("write download", partial))?;
            progress.emit(PullEvent::BlobProgress {
                digest: blob.digest.clone(),
                done: have,
                total: blob.size,
            });
        }
        // Not fsynced: verified below, and durable by the `durability` rules once renamed.
        drop(file);
    }
    if have != blob.size {
        // Short: the registry hung up. What we have is kept for the next attempt.
        return Err(ImageError::SizeMismatch {
            what: blob.what,
            digest: blob.digest.to_string(),
            expected: blob.size,
            actual: have,
        });
    }
    let actual = Digest::from_hasher(hasher);
    if actual != blob.digest {
        let _ = fs::remove_file(partial);
        return Err(ImageError::DigestMismatch {
            what: blob.what,
            digest: blob.digest.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// The hash state and length of an earlier attempt's bytes (nothing if there are none or too
/// many).
fn rehash_partial(partial: &Path, size: u64) -> Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let mut file = match File::open(partial) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(e) => return Err(ImageError::io("open download", partial)(e)),
    };
    let len = file
        .metadata()
        .map_err(ImageError::io("stat download", partial))?
        .len();
    if len > size {
        drop(file);
        fs::remove_file(partial).map_err(ImageError::io("remove download", partial))?;
        return Ok((hasher, 0));
    }
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(ImageError::io("read download", partial))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok((hasher, len))
}

/// A registry or network failure as one sentence; transient unless the registry said no.
pub fn registry_error(
    image: &ImageRef,
    err: &oci_client::errors::OciDistributionError,
) -> ImageError {
    use oci_client::errors::OciDistributionError as E;
    let (message, transient) = match err {
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => (
            format!(
                "registry {} refused the credentials: {}",
                image.registry(),
                chain(err)
            ),
            false,
        ),
        E::ImageManifestNotFoundError(_) => {
            (format!("not found in registry {}", image.registry()), false)
        }
        E::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                use oci_client::errors::OciErrorCode as C;
                matches!(e.code, C::ManifestUnknown | C::NameUnknown | C::BlobUnknown)
            }) =>
        {
            (format!("not found in registry {}", image.registry()), false)
        }
        E::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect();
            (
                format!(
                    "registry {} answered {}",
                    image.registry(),
                    codes.join("; ")
                ),
                false,
            )
        }
        E::ServerError { code, .. } => (
            format!("registry {} failed: {}", image.registry(), chain(err)),
            *code >= 500,
        ),
        E::RequestError(_) | E::IoError(_) => (
            format!("cannot reach registry {}: {}", image.registry(), chain(err)),
            true,
        ),
        other => (chain(other), false),
    };
    ImageError::Registry {
        reference: image.to_string(),
        message,
        transient,
    }
}
