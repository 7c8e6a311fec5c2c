//! The leader's log syncs, one at a time on tokio's blocking pool, while its Raft loop goes on
//! proposing and replicating (raft-rs's asynchronous append, `advance_append_async` /
//! `on_persist_ready`; raft thesis §10.2.1).
//!
//! Each Ready's entries are written to the log file in place, in Ready order; only the
//! fdatasync is deferred. A sync covers every write made before it started, so the Readies
//! written while one runs share the next (group commit): at most one runs, and one waits.

use super::storage::{PendingSync, RunningSync, StorageError};

/// What a Ready left to make durable.
pub(super) enum LogWrite {
    /// Entries written, not synced yet.
    Unsynced(PendingSync),
    /// Entries written and synced on the spot (a rotation to a new segment syncs the old one),
    /// and with them everything written before.
    Synced,
    /// No entries.
    Nothing,
}

/// Syncs of the leader's log not yet finished, by the number of the last Ready each covers.
#[derive(Default)]
pub(super) struct LeaderSyncs {
    running: Option<(u64, RunningSync)>,
    /// The newest Ready since the running sync started, with the sync that makes it and
    /// the Readies before it durable, if one is still needed.
    waiting: Option<(u64, Option<PendingSync>)>,
}

impl LeaderSyncs {
    /// No sync running (nor, therefore, waiting): every write is durable.
    pub fn is_idle(&self) -> bool {
        self.running.is_none()
    }

    /// Ready `number` is written: sync it now, or after the running sync. One with nothing
    /// left to sync counts as done once the running sync is (Readies become durable in
    /// order); while idle, the caller advances such a Ready as persisted instead.
    pub fn submit(&mut self, number: u64, written: LogWrite) {
        if self.running.is_none() {
            if let LogWrite::Unsynced(sync) = written {
                self.start(number, sync);
            }
            return;
        }
        let sync = match written {
            // A newer write's sync covers the older writes too: the same file, or one the
            // rotation to a new segment synced.
            LogWrite::Unsynced(sync) => Some(sync),
            LogWrite::Synced => None,
            LogWrite::Nothing => self.waiting.take().and_then(|(_, sync)| sync),
        };
        self.waiting = Some((number, sync));
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
        let mut number = *number;
        self.running = None;
        match self.waiting.take() {
            Some((next, Some(sync))) => self.start(next, sync),
            Some((next, None)) => number = next,
            None => {}
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

    use super::{LeaderSyncs, LogWrite};
    use crate::raft::storage::{DiskStorage, PendingSync, StorageOptions};

    fn written(sync: Option<PendingSync>) -> LogWrite {
        sync.map_or(LogWrite::Nothing, LogWrite::Unsynced)
    }

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
            syncs.submit(
                number,
                written(storage.persist_unsynced(&[entry(index)], None)?),
            );
        }
        assert!(!syncs.is_idle());
        assert_eq!(syncs.finished().await?, 1);
        assert!(
            !syncs.is_idle(),
            "the waiting sync starts when the running one ends"
        );
        assert_eq!(syncs.finished().await?, 3);
        assert!(syncs.is_idle());

        // A Ready synced on the spot, behind a running sync, is done with it, and so is the
        // Ready written before it.
        syncs.submit(4, written(storage.persist_unsynced(&[entry(4)], None)?));
        syncs.submit(5, written(storage.persist_unsynced(&[entry(5)], None)?));
        syncs.submit(6, LogWrite::Synced);
        assert_eq!(syncs.finished().await?, 6);
        assert!(syncs.is_idle());

        // A Ready without entries waits for the sync of the Ready before it.
        syncs.submit(7, written(storage.persist_unsynced(&[entry(6)], None)?));
        syncs.submit(8, written(storage.persist_unsynced(&[entry(7)], None)?));
        syncs.submit(9, LogWrite::Nothing);
        assert_eq!(syncs.finished().await?, 7);
        assert!(!syncs.is_idle(), "Ready 8's sync still has to run");
        assert_eq!(syncs.drain().await?, Some(9));
        assert!(syncs.is_idle());

        // While idle, a Ready with nothing to sync starts nothing.
        syncs.submit(10, LogWrite::Nothing);
        assert!(syncs.is_idle());
        drop(storage);

        let reopened = DiskStorage::open(dir.path(), &StorageOptions::default())?;
        assert_eq!(reopened.last_index()?, 7);
        Ok(())
    }
}
