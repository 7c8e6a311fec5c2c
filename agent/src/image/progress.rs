//! What a pull reports as it goes, for progress displays and tests.

use super::digest::Digest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The manifest was found: `layers` compressed blobs of `size` bytes in all.
    Resolved {
        reference: String,
        digest: Digest,
        layers: usize,
        size: u64,
    },
    /// Already in the store, not downloaded.
    BlobExists { digest: Digest, size: u64 },
    BlobProgress {
        digest: Digest,
        done: u64,
        total: u64,
    },
    /// Downloaded and verified.
    BlobDone { digest: Digest, size: u64 },
    /// A layer was unpacked (not reported for layers already unpacked).
    LayerUnpacked { digest: Digest, chain_id: Digest },
}

/// A sink for events; cheap to call.
pub struct Progress<'a>(pub &'a (dyn Fn(PullEvent) + Sync));

impl Progress<'_> {
    pub fn emit(&self, event: PullEvent) {
        (self.0)(event)
    }
}

impl std::fmt::Debug for Progress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}
