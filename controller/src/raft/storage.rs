//! Durable Raft storage in the data dir: the log, the hard and conf state, the latest snapshot.
//!
//! ```text
//! <dir>/log/<seq>.wal   append-only segments of CRC-framed records (see `segment`)
//! <dir>/state           hard state + conf state (+ the index that conf state came from)
//! <dir>/snapshot        the latest state-machine snapshot with its metadata
//! ```
//! `state` and `snapshot` are replaced atomically (temp file, fsync, rename, fsync dir). Log
//! appends are one write and one fdatasync per batch ([`DiskStorage::persist`] is called once per
//! Ready). The hard state's term and vote go to `state` when they change; a commit-only change is
//! a small record in the log that rides along with the next synced batch (raft treats the commit
//! index as recoverable, so it does not need an fsync of its own).
//!
//! The log is held in memory too (it is bounded by snapshotting and compaction), so the
//! [`raft::Storage`] reads never touch the disk. Reads behave like raft-rs's `MemStorage`.

mod files;
mod segment;

pub use segment::{Damage, DamageKind};

use std::cell::Cell;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};

use files::{PersistedState, SNAPSHOT_FILE, STATE_FILE};
use segment::{Record, SegmentLog};

const LOG_DIR: &str = "log";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: protobuf::ProtobufError,
    },
    #[error("entries from index {index} would overwrite the compacted log (first index {first})")]
    OverwriteCompacted { index: u64, first: u64 },
    #[error("entries from index {index} leave a gap after the last index {last}")]
    Gap { index: u64, last: u64 },
    #[error("snapshot at index {index} is out of date (log first index {first})")]
    SnapshotOutOfDate { index: u64, first: u64 },
    #[error("index {index} is outside the log [{first}, {last}]")]
    Unavailable { index: u64, first: u64, last: u64 },
}

impl StorageError {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self + use<> {
        let path = path.to_path_buf();
        move |source| Self::Io { op, path, source }
    }
}

/// The fdatasync of a batch [`DiskStorage::persist_unsynced`] wrote.
#[derive(Debug)]
#[must_use = "the entries are not durable until the sync has run"]
pub struct PendingSync {
    file: Arc<fs::File>,
    dir: Arc<Path>,
}

impl PendingSync {
    /// Syncs on this thread.
    pub fn run(self) -> Result<(), StorageError> {
        self.file
            .sync_data()
            .map_err(|e| log_error("sync the log in", &self.dir, e))
    }

    /// Syncs on tokio's blocking pool, leaving the calling worker free meanwhile.
    pub fn spawn(self) -> RunningSync {
        RunningSync {
            dir: Arc::clone(&self.dir),
            handle: tokio::task::spawn_blocking(move || {
                #[cfg(test)]
                super::sync_gate::wait(&self.dir);
                self.run()
            }),
        }
    }
}

/// A [`PendingSync`] running on tokio's blocking pool.
#[derive(Debug)]
pub struct RunningSync {
    dir: Arc<Path>,
    handle: tokio::task::JoinHandle<Result<(), StorageError>>,
}

impl RunningSync {
    /// Waits for the sync. Cancel-safe: the sync goes on, and a later call waits again.
    pub async fn wait(&mut self) -> Result<(), StorageError> {
        match (&mut self.handle).await {
            Ok(synced) => synced,
            Err(e) => Err(log_error("sync the log in", &self.dir, io::Error::other(e))),
        }
    }
}

/// An I/O error on the log directory, built only when it happens (the log is written on
/// every Ready cycle).
fn log_error(op: &'static str, dir: &Path, source: io::Error) -> StorageError {
    StorageError::Io {
        op,
        path: dir.to_path_buf(),
        source,
    }
}

/// Compacted entries below this many are freed on the spot.
const FREE_ELSEWHERE_FROM: usize = 4096;

/// Frees `entries` on a thread of its own: a snapshot compacts up to hundreds of thousands of
/// entries at once, tens of milliseconds of freeing that would otherwise hold the Raft loop.
/// Best effort: when no thread can be started they are freed here.
fn free_elsewhere(entries: Vec<Entry>) {
    if entries.len() < FREE_ELSEWHERE_FROM {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("tug-log-free".into())
        .spawn(move || drop(entries));
    if let Err(e) = spawned {
        // (A failed spawn drops the closure, and the entries with it, here.)
        tracing::debug!(error = %e, "cannot start a thread to free compacted log entries");
    }
}

/// Tuning for [`DiskStorage::open`].
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// A segment file is closed and a new one started past this size.
    pub segment_bytes: u64,
}

impl Default for StorageOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
        }
    }
}

/// What opening had to repair.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovery {
    /// The torn or damaged record the log was cut at.
    pub damage: Option<Damage>,
    /// The persisted commit index pointed past the surviving log: (persisted, now).
    pub commit_clamped: Option<(u64, u64)>,
}

/// The durable [`raft::Storage`].
pub struct DiskStorage {
    dir: PathBuf,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index of the log entry that produced `conf_state` (or of the snapshot it came from).
    conf_index: u64,
    snapshot: Snapshot,
    /// The log after the snapshot (or after the compaction point), contiguous.
    entries: Vec<Entry>,
    log: SegmentLog,
    recovery: Recovery,
    /// Set when raft asked for a snapshot the stored one cannot serve (see `snapshot`).
    snapshot_wanted: Cell<bool>,
    /// The index of the snapshot in the snapshot file; held while that file is written, which
    /// a [`PendingSnapshot`] may do on another thread.
    snapshot_file: Arc<Mutex<u64>>,
}

/// A snapshot of the state machine, prepared by [`DiskStorage::prepare_snapshot`], to be
/// written on any thread (it takes a while for a large state) and then handed back to
/// [`DiskStorage::snapshot_written`] on the raft loop.
#[derive(Debug)]
pub struct PendingSnapshot {
    snapshot: Snapshot,
    dir: PathBuf,
    file: Arc<Mutex<u64>>,
}

impl PendingSnapshot {
    pub fn index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// Sets the state machine's data.
    pub fn with_data(mut self, data: impl Into<bytes::Bytes>) -> Self {
        self.snapshot.data = data.into();
        self
    }

    /// Writes and syncs the snapshot file, unless it already holds a newer snapshot (one
    /// received from a leader meanwhile). Returns the snapshot for `snapshot_written`.
    pub fn write(self) -> Result<Snapshot, StorageError> {
        write_snapshot_file(&self.dir, &self.snapshot, &self.file, false)?;
        Ok(self.snapshot)
    }
}

/// Writes `snapshot` to a temporary file and syncs it, then (holding `file`, whose value is the
/// index of the snapshot in the file) renames it into place, unless the file holds a newer
/// snapshot and `newest` is false. The slow part runs outside the lock, so the raft loop never
/// waits long for it while a background writer holds it.
fn write_snapshot_file(
    dir: &Path,
    snapshot: &Snapshot,
    file: &Mutex<u64>,
    newest: bool,
) -> Result<(), StorageError> {
    static TEMP: AtomicU64 = AtomicU64::new(0);
    let index = snapshot.get_metadata().index;
    let head = files::snapshot_head(snapshot).map_err(|source| StorageError::Encode {
        what: "a snapshot",
        source,
    })?;
    let tmp = dir.join(format!(
        "{SNAPSHOT_FILE}.{index}.{}.tmp",
        TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    let written = match head {
        Some(head) => files::write_parts_synced(&tmp, &[&head, &snapshot.data]),
        None => Err(std::io::Error::other(format!(
            "a snapshot of {} bytes is larger than the 4 GiB a snapshot file holds",
            snapshot.data.len()
        ))),
    };
    written.map_err(StorageError::io("write", &tmp))?;
    let mut on_disk = file.lock().unwrap_or_else(PoisonError::into_inner);
    if !newest && *on_disk >= index {
        drop(on_disk);
        return fs::remove_file(&tmp).map_err(StorageError::io("remove", &tmp));
    }
    let dest = dir.join(SNAPSHOT_FILE);
    fs::rename(&tmp, &dest)
        .and_then(|()| files::sync_dir(dir))
        .map_err(StorageError::io("write", &dest))?;
    *on_disk = index;
    Ok(())
}

/// The snapshot-file lock of a storage directory, one per directory in this process: the
/// writer of a node that was stopped may still run when a new node opens the same directory.
fn snapshot_file_lock(dir: &Path) -> Arc<Mutex<u64>> {
    static LOCKS: LazyLock<Mutex<HashMap<PathBuf, Weak<Mutex<u64>>>>> =
        LazyLock::new(Mutex::default);
    let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut locks = LOCKS.lock().unwrap_or_else(PoisonError::into_inner);
    locks.retain(|_, lock| lock.strong_count() > 0);
    if let Some(lock) = locks.get(&key).and_then(Weak::upgrade) {
        return lock;
    }
    let lock = Arc::new(Mutex::new(0));
    locks.insert(key, Arc::downgrade(&lock));
    lock
}

impl std::fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStorage")
            .field("dir", &self.dir)
            .field("hard_state", &self.hard_state)
            .field("conf_state", &self.conf_state)
            .field("snapshot_index", &self.snapshot.get_metadata().index)
            .field("first_index", &self.first())
            .field("last_index", &self.last())
            .finish()
    }
}

impl DiskStorage {
    /// Opens (or creates) the storage in `dir`, repairing a torn or damaged log tail.
    pub fn open(dir: &Path, options: &StorageOptions) -> Result<Self, StorageError> {
        fs::create_dir_all(dir).map_err(StorageError::io("create", dir))?;
        // Held while the snapshot file is read: a writer of an earlier node on this directory
        // finishes first, or finds the index it must beat.
        let snapshot_file = snapshot_file_lock(dir);
        let mut on_disk = snapshot_file.lock().unwrap_or_else(PoisonError::into_inner);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        if tmp.exists() {
            fs::remove_file(&tmp).map_err(StorageError::io("remove", &tmp))?;
        }
        let snapshot_tmp = format!("{SNAPSHOT_FILE}.");
        for entry in fs::read_dir(dir).map_err(StorageError::io("read", dir))? {
            let path = entry.map_err(StorageError::io("read", dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with(&snapshot_tmp) && name.ends_with(".tmp") {
                fs::remove_file(&path).map_err(StorageError::io("remove", &path))?;
            }
        }

        let snap_path = dir.join(SNAPSHOT_FILE);
        let snapshot =
            match files::read_optional(&snap_path).map_err(StorageError::io("read", &snap_path))? {
                Some(bytes) => {
                    files::decode_snapshot(&bytes).map_err(|reason| StorageError::Corrupt {
                        path: snap_path.clone(),
                        reason,
                    })?
                }
                None => Snapshot::default(),
            };
        let state_path = dir.join(STATE_FILE);
        let state = match files::read_optional(&state_path)
            .map_err(StorageError::io("read", &state_path))?
        {
            Some(bytes) => files::decode_state(&bytes).map_err(|reason| StorageError::Corrupt {
                path: state_path.clone(),
                reason,
            })?,
            None => PersistedState::default(),
        };

        let log_dir = dir.join(LOG_DIR);
        let opened = SegmentLog::open(&log_dir, options.segment_bytes)
            .map_err(StorageError::io("open the log in", &log_dir))?;
        let mut recovery = Recovery {
            damage: opened.damage,
            commit_clamped: None,
        };
        if let Some(d) = &recovery.damage {
            tracing::warn!(
                kind = ?d.kind,
                segment = %d.segment.display(),
                offset = d.offset,
                reason = %d.reason,
                dropped_bytes = d.dropped_bytes,
                dropped_segments = d.dropped_segments,
                "raft log: torn or corrupt tail truncated; the lost entries will come from peers"
            );
        }

        let snap_meta = snapshot.get_metadata();
        let (entries, logged_commit) = replay(&log_dir, opened.records, snap_meta.index)?;

        let last = entries.last().map_or(snap_meta.index, |e| e.index);
        let mut hard_state = state.hard_state.clone();
        hard_state.term = hard_state.term.max(snap_meta.term);
        let commit = hard_state.commit.max(logged_commit).max(snap_meta.index);
        hard_state.commit = commit.min(last);
        if commit > last {
            recovery.commit_clamped = Some((commit, last));
            tracing::warn!(
                persisted_commit = commit,
                last_index = last,
                "raft log: commit index points past the surviving log; lowered to its end"
            );
        }

        let (conf_state, conf_index) =
            if state.conf_index >= snap_meta.index && state.conf_index <= last {
                (state.conf_state, state.conf_index)
            } else {
                (snap_meta.get_conf_state().clone(), snap_meta.index)
            };

        *on_disk = snapshot.get_metadata().index;
        drop(on_disk);
        Ok(Self {
            dir: dir.to_path_buf(),
            hard_state,
            conf_state,
            conf_index,
            snapshot,
            entries,
            log: opened.log,
            recovery,
            snapshot_wanted: Cell::new(false),
            snapshot_file,
        })
    }

    /// True once the storage holds a configuration (bootstrapped or caught up from a leader).
    pub fn is_initialized(&self) -> bool {
        self.conf_state != ConfState::default() || self.snapshot.get_metadata().index > 0
    }

    /// What [`Self::open`] repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The log index of the entry that produced the current conf state.
    pub fn conf_index(&self) -> u64 {
        self.conf_index
    }

    /// The latest snapshot (metadata and data); empty (index 0) if there is none.
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn segment_count(&self) -> usize {
        self.log.segment_count()
    }

    /// Whether raft asked for a snapshot the stored one could not serve since the last call;
    /// the owner should then take a fresh one.
    pub fn take_snapshot_request(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// Appends entries (replacing any at or after the first one's index) and fsyncs.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.persist(entries, None)
    }

    /// Persists one Ready's log entries and hard state with a single fdatasync.
    pub fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError> {
        match self.persist_unsynced(entries, hard_state)? {
            Some(sync) => sync.run(),
            None => Ok(()),
        }
    }

    /// [`Self::persist`] without the log's fdatasync, which it hands back: the caller runs it
    /// (on a thread that may block) before anything that counts on the entries being durable:
    /// acknowledgements, raft's `advance`. Term and vote changes are still synced here.
    pub fn persist_unsynced(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<Option<PendingSync>, StorageError> {
        if let Some(first) = entries.first() {
            if first.index < self.first() {
                return Err(StorageError::OverwriteCompacted {
                    index: first.index,
                    first: self.first(),
                });
            }
            if first.index > self.last() + 1 {
                return Err(StorageError::Gap {
                    index: first.index,
                    last: self.last(),
                });
            }
            for e in entries {
                self.log
                    .push_entry(e)
                    .map_err(|source| StorageError::Encode {
                        what: "a log entry",
                        source,
                    })?;
            }
        }
        let mut state_changed = false;
        if let Some(hs) = hard_state {
            state_changed = hs.term != self.hard_state.term || hs.vote != self.hard_state.vote;
            if hs.commit != self.hard_state.commit {
                self.log.push_commit(hs.commit);
            }
        }
        // A commit-only change stays pending until the next append writes (and syncs) it.
        let mut sync = None;
        if !entries.is_empty() {
            self.flush_log(false)?;
            sync = Some(PendingSync {
                file: self.log.active_file(),
                dir: Arc::clone(self.log.dir()),
            });
        }

        if let Some(first) = entries.first() {
            let keep = (first.index - self.first()) as usize;
            self.entries.truncate(keep);
            self.entries.extend_from_slice(entries);
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
        if state_changed {
            self.write_state()?;
        }
        if self.log.over_size() {
            let commit = self.hard_state.commit;
            self.log
                .rotate(commit)
                .map_err(StorageError::io("rotate the log in", &self.dir))?;
            // (The rotation synced the old segment, pending batch included.)
            sync = None;
        }
        Ok(sync)
    }

    /// Writes a pending commit-only record (at shutdown: a restart then replays that far).
    pub fn flush_pending(&mut self) -> Result<(), StorageError> {
        self.flush_log(true)
    }

    /// Persists the hard state (term and vote durably; see the module docs for the commit).
    pub fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), StorageError> {
        self.persist(&[], Some(hard_state))
    }

    /// Records a new commit index. It reaches the disk with the next write and is not synced
    /// on its own: after a crash the commit index is relearned from the leader.
    pub fn set_commit(&mut self, commit: u64) {
        if commit != self.hard_state.commit {
            self.hard_state.commit = commit;
            self.log.push_commit(commit);
        }
    }

    /// Persists the conf state produced by the entry at `index`.
    pub fn set_conf_state(
        &mut self,
        conf_state: ConfState,
        index: u64,
    ) -> Result<(), StorageError> {
        self.conf_state = conf_state;
        self.conf_index = index;
        self.write_state()
    }

    /// Replaces the log with a snapshot (received from a leader, or a new cluster's first).
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        let meta = snapshot.get_metadata();
        let index = meta.index;
        if self.first() > index {
            return Err(StorageError::SnapshotOutOfDate {
                index,
                first: self.first(),
            });
        }
        self.write_snapshot(&snapshot)?;
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = index;
        self.conf_state = meta.get_conf_state().clone();
        self.conf_index = index;
        self.snapshot = snapshot;
        self.entries.clear();
        self.write_state()?;
        let commit = self.hard_state.commit;
        self.log
            .rotate(commit)
            .and_then(|()| self.log.remove_inactive())
            .map_err(StorageError::io("reset the log in", &self.dir))?;
        Ok(())
    }

    /// Stores a snapshot of the state machine taken after applying the entry at `index`, whose
    /// configuration then was `conf_state`. Call [`Self::compact`] afterwards to drop the log
    /// it covers.
    pub fn create_snapshot(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> Result<&Snapshot, StorageError> {
        let written = self
            .prepare_snapshot(index, conf_state)?
            .with_data(data)
            .write()?;
        self.snapshot_written(written)?;
        Ok(&self.snapshot)
    }

    /// The first half of [`Self::create_snapshot`]: the snapshot's metadata, to be given its
    /// data ([`PendingSnapshot::with_data`]) and written ([`PendingSnapshot::write`]) on any
    /// thread, then passed to [`Self::snapshot_written`].
    pub fn prepare_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
    ) -> Result<PendingSnapshot, StorageError> {
        let current = self.snapshot.get_metadata().index;
        if index <= current {
            return Err(StorageError::SnapshotOutOfDate {
                index,
                first: current + 1,
            });
        }
        let term = self.entry_term(index)?;
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf_state);
        Ok(PendingSnapshot {
            snapshot,
            dir: self.dir.clone(),
            file: self.snapshot_file.clone(),
        })
    }

    /// Takes a written snapshot as the stored one; false (and nothing changes) if the storage
    /// holds a newer one by now (installed from a leader). Call [`Self::compact`] afterwards.
    pub fn snapshot_written(&mut self, snapshot: Snapshot) -> Result<bool, StorageError> {
        let index = snapshot.get_metadata().index;
        if index <= self.snapshot.get_metadata().index {
            return Ok(false);
        }
        self.snapshot = snapshot;
        // Applied implies committed.
        self.hard_state.commit = self.hard_state.commit.max(index);
        let commit = self.hard_state.commit;
        self.log
            .rotate(commit)
            .map_err(StorageError::io("rotate the log in", &self.dir))?;
        Ok(true)
    }

    /// Discards the entries before `compact_index` (like `MemStorage::compact`), and deletes the
    /// segment files that only held entries the snapshot covers.
    pub fn compact(&mut self, compact_index: u64) -> Result<(), StorageError> {
        if compact_index <= self.first() {
            return Ok(());
        }
        if compact_index > self.last() + 1 {
            return Err(StorageError::Unavailable {
                index: compact_index,
                first: self.first(),
                last: self.last(),
            });
        }
        if let Some(first) = self.entries.first() {
            let n = (compact_index - first.index) as usize;
            let kept = self.entries.split_off(n);
            free_elsewhere(std::mem::replace(&mut self.entries, kept));
        }
        // Entries past the snapshot stay on disk until a snapshot covers them.
        let covered = compact_index.min(self.snapshot.get_metadata().index + 1);
        self.log
            .remove_below(covered)
            .map_err(StorageError::io("remove old segments in", &self.dir))?;
        Ok(())
    }

    fn first(&self) -> u64 {
        self.entries
            .first()
            .map_or(self.snapshot.get_metadata().index + 1, |e| e.index)
    }

    fn last(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot.get_metadata().index, |e| e.index)
    }

    fn entry_term(&self, index: u64) -> Result<u64, StorageError> {
        let meta = self.snapshot.get_metadata();
        if index == meta.index {
            return Ok(meta.term);
        }
        let (first, last) = (self.first(), self.last());
        if index < first || index > last {
            return Err(StorageError::Unavailable { index, first, last });
        }
        Ok(self.entries[(index - first) as usize].term)
    }

    fn flush_log(&mut self, sync: bool) -> Result<(), StorageError> {
        self.log
            .flush(sync)
            .map_err(|e| log_error("write the log in", self.log.dir(), e))
    }

    fn write_state(&mut self) -> Result<(), StorageError> {
        let state = PersistedState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
            conf_index: self.conf_index,
        };
        let bytes = files::encode_state(&state).map_err(|source| StorageError::Encode {
            what: "the hard state",
            source,
        })?;
        files::write_atomic(&self.dir, STATE_FILE, &bytes)
            .map_err(StorageError::io("write", &self.dir.join(STATE_FILE)))
    }

    /// Writes a snapshot received from a leader (always the newest truth).
    fn write_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        write_snapshot_file(&self.dir, snapshot, &self.snapshot_file, true)
    }
}

/// Rebuilds the log from its records in file order: an entry at or below the current end
/// replaces the suffix from its index (the write-side truncation); entries the snapshot covers
/// are dropped at the end. Returns the entries and the highest commit record.
fn replay(
    log_dir: &Path,
    records: Vec<Record>,
    snap_index: u64,
) -> Result<(Vec<Entry>, u64), StorageError> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut commit = 0;
    for record in records {
        let e = match record {
            Record::Commit(c) => {
                commit = commit.max(c);
                continue;
            }
            Record::Entry(e) => e,
        };
        match (
            entries.first().map(|f| f.index),
            entries.last().map(|l| l.index),
        ) {
            (Some(first), Some(last)) if e.index >= first && e.index <= last + 1 => {
                entries.truncate((e.index - first) as usize);
            }
            // Older than what we hold (after a deleted segment) or a restart of the log after
            // an installed snapshot: start over from this entry.
            (Some(first), _) if e.index < first => entries.clear(),
            _ if e.index <= snap_index + 1 => entries.clear(),
            (_, last) => {
                return Err(StorageError::Corrupt {
                    path: log_dir.to_path_buf(),
                    reason: format!(
                        "entry {} follows entry {} (snapshot at {snap_index}): a segment is missing",
                        e.index,
                        last.unwrap_or(snap_index)
                    ),
                });
            }
        }
        entries.push(e);
    }
    let covered = entries.iter().take_while(|e| e.index <= snap_index).count();
    entries.drain(..covered);
    if let Some(first) = entries.first()
        && first.index != snap_index + 1
    {
        return Err(StorageError::Corrupt {
            path: log_dir.to_path_buf(),
            reason: format!(
                "the log starts at entry {} but the snapshot ends at {snap_index}",
                first.index
            ),
        });
    }
    Ok((entries, commit))
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.first();
        if low < first {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let mut out = self.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// The latest snapshot, unless it is older than `request_index` or predates `to` joining
    /// the group (a new member refuses a snapshot whose configuration does not include it):
    /// then raft is told to retry later and the owner is asked for a fresh snapshot.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let meta = self.snapshot.get_metadata();
        let cs = meta.get_conf_state();
        let includes_peer = [
            &cs.voters,
            &cs.learners,
            &cs.voters_outgoing,
            &cs.learners_next,
        ]
        .iter()
        .any(|ids| ids.contains(&to));
        if meta.index == 0 || meta.index < request_index || !includes_peer {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests;
