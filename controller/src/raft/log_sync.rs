//! The leader's log syncs, one at a time on tokio's blocking pool, while its Raft loop goes on
//! proposing and replicating (raft-rs's asynchronous append, `advance_append_async` /
//! `on_persist_ready`; raft thesis §10.2.1).
//!
//! Each Ready's entries are written to the log file in place, in Ready order; only the
//! fdatasync is deferred. A sync covers every write made before it started, so the Readies
//! written while one runs share the next (group commit): at most one runs, and one waits.

use super::storage::{PendingSync, RunningSync, StorageError};

/// Syncs of the leader's log not yet finished, by the number of the last Ready each covers.
#[derive(Default)]
pub(super) struct LeaderSyncs {
    running: Option<(u64, RunningSync)>,
    /// The newest Ready written since the running sync started, with its sync.
    waiting: Option<(u64, PendingSync)>,
}

impl LeaderSyncs {
    /// No sync running (nor, therefore, waiting): every write is durable.
    pub fn is_idle(&self) -> bool {
        self.running.is_none()
    }

    /// Ready `number`'s entries are written: sync them now, or after the running sync.
    pub fn submit(&mut self, number: u64, sync: PendingSync) {
        if self.running.is_some() {
            // A newer sync covers the older writes too (the same file, or one the rotation
            // to a new segment already synced).
            self.waiting = Some((number, sync));
        } else {
            self.start(number, sync);
        }
    }

    fn start(&mut self, number: u64, sync: PendingSync) {
        self.running = Some((number, sync.spawn()));
    }

    /// Waits for the running sync and returns the number of the last Ready it made durable,
    /// starting the waiting one; never resolves while idle. Cancel-safe: nothing changes until
    /// the sync has finished.
    pub async fn finished(&mut self) -> Result<u64, StorageError> {
        let Some((number, running)) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let synced = running.wait().await;
        let number = *number;
        self.running = None;
        if let Some((next, sync)) = self.waiting.take() {
            self.start(next, sync);
        }
        synced.map(|()| number)
    }

    /// Waits until every write is durable; the number of the last Ready synced, if any was.
    pub async fn drain(&mut self) -> Result<Option<u64>, StorageError> {
        let mut last = None;
        while !self.is_idle() {
            last = Some(self.finished().await?);
        }
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use raft::Storage;
    use raft::eraftpb::Entry;

    use super::LeaderSyncs;
    use crate::raft::storage::{DiskStorage, StorageOptions};

    fn entry(index: u64) -> Entry {
        Entry {
            index,
            term: 1,
            data: vec![b'x'; 16].into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn syncs_run_one_at_a_time_and_the_newest_waiting_one_covers_the_rest()
    -> Result<(), Box<dyn Error>> {
        let dir = tempfile::tempdir()?;
        let mut storage = DiskStorage::open(dir.path(), &StorageOptions::default())?;
        let mut syncs = LeaderSyncs::default();
        assert!(syncs.is_idle());
        assert_eq!(syncs.drain().await?, None);

        // Ready 1 starts a sync; 2 and 3 are written while it runs, and 3's sync covers both.
        for (number, index) in [(1, 1), (2, 2), (3, 3)] {
            let sync = storage.persist_unsynced(&[entry(index)], None)?;
            syncs.submit(number, sync.ok_or("an append needs a sync")?);
        }
        assert!(!syncs.is_idle());
        assert_eq!(syncs.finished().await?, 1);
        assert!(
            !syncs.is_idle(),
            "the waiting sync starts when the running one ends"
        );
        assert_eq!(syncs.finished().await?, 3);
        assert!(syncs.is_idle());

        let sync = storage.persist_unsynced(&[entry(4)], None)?;
        syncs.submit(4, sync.ok_or("an append needs a sync")?);
        assert_eq!(syncs.drain().await?, Some(4));
        assert!(syncs.is_idle());
        drop(storage);

        let reopened = DiskStorage::open(dir.path(), &StorageOptions::default())?;
        assert_eq!(reopened.last_index()?, 4);
        Ok(())
    }
}
