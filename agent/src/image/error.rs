//! Everything that can go wrong with images, each a sentence naming the image or blob.

use std::path::PathBuf;

use super::credentials::CredentialsError;
use super::digest::DigestError;
use super::platform::PlatformError;
use super::reference::ReferenceError;
use super::unpack::UnpackError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("{reference}: {message}")]
    Registry {
        reference: String,
        message: String,
        transient: bool,
    },
    #[error("{reference}: no image for {wanted} in its index; it has {available}")]
    NoPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("{reference}: unsupported manifest: {reason}")]
    Manifest { reference: String, reason: String },
    #[error("{what} {digest}: content has digest {actual}: corrupted or tampered with, discarded")]
    DigestMismatch {
        what: &'static str,
        digest: String,
        actual: String,
    },
    #[error("{what} {digest}: expected {expected} bytes, got {actual}{more}", more = if *.actual > *.expected { " or more" } else { "" })]
    SizeMismatch {
        what: &'static str,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "layer {digest}: unpacked content has diff id {actual}, the image config says {expected}"
    )]
    DiffIdMismatch {
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("layer {digest}: {source}")]
    Unpack { digest: String, source: UnpackError },
    #[error("image {0} is not in the store (pull it first)")]
    NotFound(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Mount(String),
    #[error("internal task failed: {0}")]
    Task(String),
}

impl ImageError {
    /// Worth retrying: the registry or the network failed, not the content.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ImageError::Registry {
                transient: true,
                ..
            }
        ) || matches!(self, ImageError::SizeMismatch { actual, expected, .. } if actual < expected)
    }

    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { what, path, source }
    }
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// One line from an error and all its causes: "a: b: c".
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
