//! `DiskStorage` against the behaviour of raft-rs's `MemStorage` (its tests, ported: the
//! storage is seeded through a snapshot at index 2, so the term of index 2 is known rather
//! than compacted), plus durability: reopen, torn and corrupt tails, compaction, snapshots.

use std::error::Error;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, Storage, StorageError as RaftStorageError};

use super::{DamageKind, DiskStorage, PendingSnapshot, StorageError, StorageOptions};

type TestResult = Result<(), Box<dyn Error>>;

fn new_entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("entry {index}/{term}").into_bytes().into(),
        ..Default::default()
    }
}

fn new_snapshot(index: u64, term: u64, voters: Vec<u64>) -> Snapshot {
    let mut s = Snapshot::default();
    s.mut_metadata().index = index;
    s.mut_metadata().term = term;
    s.mut_metadata().mut_conf_state().voters = voters;
    s.data = b"state".to_vec().into();
    s
}

fn open(dir: &Path) -> Result<DiskStorage, StorageError> {
    DiskStorage::open(dir, &StorageOptions::default())
}

fn open_small(dir: &Path) -> Result<DiskStorage, StorageError> {
    DiskStorage::open(dir, &StorageOptions { segment_bytes: 256 })
}

/// A storage whose log is `ents`, preceded by a snapshot at the index before them.
fn storage_with(dir: &Path, ents: &[Entry]) -> Result<DiskStorage, StorageError> {
    let mut s = open(dir)?;
    let first = ents.first().map_or(1, |e| e.index);
    s.apply_snapshot(new_snapshot(first - 1, first - 1, vec![1, 2, 3]))?;
    s.append(ents)?;
    Ok(s)
}

fn ents_3_4_5() -> Vec<Entry> {
    vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]
}

/// A snapshot at index 4 (of `storage_with(.., &ents_3_4_5())`) holding `data`, not written yet.
fn pending_at_4(s: &DiskStorage, data: &[u8]) -> Result<PendingSnapshot, StorageError> {
    Ok(s.prepare_snapshot(4, ConfState::default())?
        .with_data(data.to_vec()))
}

fn all_entries(s: &DiskStorage) -> Result<Vec<Entry>, raft::Error> {
    let (first, last) = (s.first_index()?, s.last_index()?);
    s.entries(first, last + 1, None, GetEntriesContext::empty(false))
}

fn segments(dir: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("log"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn last_segment(dir: &Path) -> Result<PathBuf, Box<dyn Error>> {
    Ok(segments(dir)?.pop().ok_or("no segment")?)
}

/// Where `needle` first occurs in the file at `path`.
fn position_of(path: &Path, needle: &[u8]) -> Result<u64, Box<dyn Error>> {
    let bytes = fs::read(path)?;
    let pos = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .ok_or_else(|| format!("{} not found", String::from_utf8_lossy(needle)))?;
    Ok(pos as u64)
}

/// Writes `bytes` over the file at `path` from `pos`.
fn overwrite(path: &Path, pos: u64, bytes: &[u8]) -> Result<(), std::io::Error> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(pos))?;
    f.write_all(bytes)
}

/// Where the written bytes of a segment end, before the zeros of its unused preallocated space
/// (the test entries end in non-zero bytes).
fn data_len(path: &Path) -> Result<u64, std::io::Error> {
    let bytes = fs::read(path)?;
    Ok(bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1) as u64)
}

#[test]
fn term_like_memstorage() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let s = storage_with(tmp.path(), &ents_3_4_5())?;
    assert_eq!(
        s.term(1),
        Err(raft::Error::Store(RaftStorageError::Compacted))
    );
    assert_eq!(s.term(2), Ok(2), "the snapshot's term");
    assert_eq!(s.term(3), Ok(3));
    assert_eq!(s.term(4), Ok(4));
    assert_eq!(s.term(5), Ok(5));
    assert_eq!(
        s.term(6),
        Err(raft::Error::Store(RaftStorageError::Unavailable))
    );
    Ok(())
}

#[test]
fn entries_like_memstorage() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let ents = vec![
        new_entry(3, 3),
        new_entry(4, 4),
        new_entry(5, 5),
        new_entry(6, 6),
    ];
    let s = storage_with(tmp.path(), &ents)?;
    let size = |i: usize| u64::from(ents[i].compute_size());
    let max = u64::MAX;
    let cases: Vec<(u64, u64, u64, raft::Result<Vec<Entry>>)> = vec![
        (
            2,
            6,
            max,
            Err(raft::Error::Store(RaftStorageError::Compacted)),
        ),
        (3, 4, max, Ok(vec![new_entry(3, 3)])),
        (4, 5, max, Ok(vec![new_entry(4, 4)])),
        (4, 6, max, Ok(vec![new_entry(4, 4), new_entry(5, 5)])),
        (4, 7, max, Ok(ents[1..].to_vec())),
        // even with a zero budget the first entry is returned
        (4, 7, 0, Ok(vec![new_entry(4, 4)])),
        (4, 7, size(1) + size(2), Ok(ents[1..3].to_vec())),
        (
            4,
            7,
            size(1) + size(2) + size(3) / 2,
            Ok(ents[1..3].to_vec()),
        ),
        (
            4,
            7,
            size(1) + size(2) + size(3) - 1,
            Ok(ents[1..3].to_vec()),
        ),
        (4, 7, size(1) + size(2) + size(3), Ok(ents[1..].to_vec())),
    ];
    for (i, (lo, hi, max_size, want)) in cases.into_iter().enumerate() {
        let got = s.entries(lo, hi, max_size, GetEntriesContext::empty(false));
        assert_eq!(got, want, "case {i}");
    }
    assert_eq!(
        s.entries(4, 8, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(RaftStorageError::Unavailable)),
        "past the end"
    );
    Ok(())
}

#[test]
fn first_and_last_index_like_memstorage() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    assert_eq!(s.first_index()?, 3);
    assert_eq!(s.last_index()?, 5);
    s.append(&[new_entry(6, 5)])?;
    assert_eq!(s.last_index()?, 6);
    s.compact(4)?;
    assert_eq!(s.first_index()?, 4);
    Ok(())
}

#[test]
fn compact_like_memstorage() -> TestResult {
    // (compact index, first index, its term, entries left)
    for (i, (idx, windex, wterm, wlen)) in [(2, 3, 3, 3), (3, 3, 3, 3), (4, 4, 4, 2), (5, 5, 5, 1)]
        .into_iter()
        .enumerate()
    {
        let tmp = tempfile::tempdir()?;
        let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
        s.compact(idx)?;
        let index = s.first_index()?;
        assert_eq!(index, windex, "case {i}");
        let first = s.entries(index, index + 1, 1, GetEntriesContext::empty(false))?;
        assert_eq!(first.first().map(|e| e.term), Some(wterm), "case {i}");
        assert_eq!(all_entries(&s)?.len(), wlen, "case {i}");
    }
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    assert!(s.compact(7).is_err(), "cannot compact past the end");
    Ok(())
}

#[test]
fn append_like_memstorage() -> TestResult {
    let cases: Vec<(Vec<Entry>, Option<Vec<Entry>>)> = vec![
        (ents_3_4_5(), Some(ents_3_4_5())),
        (
            vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)],
            Some(vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)]),
        ),
        (
            vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 5),
            ],
            Some(vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 5),
            ]),
        ),
        // overwriting compacted entries is refused
        (
            vec![new_entry(2, 3), new_entry(3, 3), new_entry(4, 5)],
            None,
        ),
        // truncate the existing entries and append
        (
            vec![new_entry(4, 5)],
            Some(vec![new_entry(3, 3), new_entry(4, 5)]),
        ),
        // direct append
        (
            vec![new_entry(6, 6)],
            Some(vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 6),
            ]),
        ),
        // a gap is refused
        (vec![new_entry(8, 6)], None),
    ];
    for (i, (entries, want)) in cases.into_iter().enumerate() {
        let tmp = tempfile::tempdir()?;
        let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
        let res = s.append(&entries);
        match want {
            Some(want) => {
                res?;
                assert_eq!(all_entries(&s)?, want, "case {i}");
                // and the same after a restart
                drop(s);
                assert_eq!(all_entries(&open(tmp.path())?)?, want, "case {i} reopened");
            }
            None => {
                assert!(res.is_err(), "case {i}");
                assert_eq!(all_entries(&s)?, ents_3_4_5(), "case {i} unchanged");
            }
        }
    }
    Ok(())
}

#[test]
fn apply_snapshot_like_memstorage() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = open(tmp.path())?;
    assert!(!s.is_initialized());
    s.apply_snapshot(new_snapshot(4, 4, vec![1, 2, 3]))?;
    assert!(s.is_initialized());
    assert!(matches!(
        s.apply_snapshot(new_snapshot(3, 3, vec![1, 2, 3])),
        Err(StorageError::SnapshotOutOfDate { .. })
    ));
    Ok(())
}

#[test]
fn snapshot_is_served_unless_too_old() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = open(tmp.path())?;
    let unavailable = Err(raft::Error::Store(
        RaftStorageError::SnapshotTemporarilyUnavailable,
    ));
    assert_eq!(s.snapshot(0, 2), unavailable, "nothing to serve yet");
    assert!(s.take_snapshot_request());
    s.apply_snapshot(new_snapshot(4, 4, vec![1, 2]))?;
    assert_eq!(s.snapshot(3, 2)?, new_snapshot(4, 4, vec![1, 2]));
    assert!(!s.take_snapshot_request());
    assert_eq!(s.snapshot(5, 2), unavailable);
    assert!(s.take_snapshot_request());
    // A peer added after the snapshot would refuse it: a fresh one is needed.
    assert_eq!(s.snapshot(0, 3), unavailable);
    assert!(s.take_snapshot_request());
    Ok(())
}

#[test]
fn everything_survives_a_restart() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    let mut hs = HardState {
        term: 5,
        vote: 2,
        commit: 4,
        ..Default::default()
    };
    s.set_hard_state(&hs)?;
    let cs = ConfState {
        voters: vec![1, 2, 3, 4],
        ..Default::default()
    };
    s.set_conf_state(cs.clone(), 5)?;
    s.set_commit(5);
    s.append(&[new_entry(6, 5)])?; // carries the commit record
    drop(s);

    let s = open(tmp.path())?;
    let state = s.initial_state()?;
    hs.commit = 5;
    assert_eq!(state.hard_state, hs);
    assert_eq!(state.conf_state, cs);
    assert_eq!(s.conf_index(), 5);
    assert_eq!(
        all_entries(&s)?,
        vec![
            new_entry(3, 3),
            new_entry(4, 4),
            new_entry(5, 5),
            new_entry(6, 5)
        ]
    );
    assert_eq!(s.term(2)?, 2);
    assert_eq!(s.recovery().damage, None);
    Ok(())
}

#[test]
fn a_commit_only_change_is_written_with_the_next_append_or_at_shutdown() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    let seg = last_segment(tmp.path())?;
    let before = data_len(&seg)?;
    let hs = s.initial_state()?.hard_state;
    assert!(hs.commit < 4);
    s.persist(&[], Some(&HardState { commit: 5, ..hs }))?;
    // No write of its own: a crash now restarts from the older commit, which raft recovers.
    assert_eq!(data_len(&seg)?, before);
    drop(s);
    assert_eq!(
        open(tmp.path())?.initial_state()?.hard_state.commit,
        hs.commit
    );

    let mut s = open(tmp.path())?;
    s.set_commit(4);
    s.append(&[new_entry(6, 5)])?;
    drop(s);
    assert_eq!(open(tmp.path())?.initial_state()?.hard_state.commit, 4);

    let mut s = open(tmp.path())?;
    s.set_commit(6);
    s.flush_pending()?;
    drop(s);
    assert_eq!(open(tmp.path())?.initial_state()?.hard_state.commit, 6);
    Ok(())
}

#[test]
fn an_overwritten_suffix_stays_overwritten_after_restart() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    s.append(&[new_entry(6, 5), new_entry(7, 5)])?;
    s.append(&[new_entry(5, 7)])?;
    drop(s);
    let s = open(tmp.path())?;
    assert_eq!(
        all_entries(&s)?,
        vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 7)]
    );
    Ok(())
}

#[test]
fn a_torn_tail_is_truncated_to_the_last_good_record() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    s.append(&[new_entry(6, 5)])?;
    drop(s);
    // Cut the last record in half, as a crash during the write would.
    let seg = last_segment(tmp.path())?;
    let len = data_len(&seg)?;
    OpenOptions::new()
        .write(true)
        .open(&seg)?
        .set_len(len - 7)?;

    let mut s = open(tmp.path())?;
    let damage = s.recovery().damage.clone().ok_or("damage not reported")?;
    assert!(damage.reason.contains("torn"), "{}", damage.reason);
    assert_eq!(damage.kind, DamageKind::TornWrite);
    assert_eq!(s.last_index()?, 5);
    assert_eq!(all_entries(&s)?, ents_3_4_5());
    // The log is clean again: appends continue and survive another restart.
    s.append(&[new_entry(6, 6)])?;
    drop(s);
    let s = open(tmp.path())?;
    assert_eq!(s.recovery().damage, None);
    assert_eq!(s.last_index()?, 6);
    assert_eq!(s.term(6)?, 6);
    Ok(())
}

#[test]
fn a_flipped_byte_cuts_the_log_there() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    s.append(&[new_entry(6, 5)])?;
    s.append(&[new_entry(7, 5)])?;
    drop(s);
    // Flip a byte inside the record of entry 6 (the second to last record).
    let seg = last_segment(tmp.path())?;
    let pos = position_of(&seg, b"entry 6/5")?;
    let byte = fs::read(&seg)?[pos as usize];
    overwrite(&seg, pos, &[byte ^ 0x40])?;

    let s = open(tmp.path())?;
    let damage = s.recovery().damage.clone().ok_or("damage not reported")?;
    assert!(damage.reason.contains("checksum"), "{}", damage.reason);
    assert_eq!(
        damage.kind,
        DamageKind::Corrupt,
        "complete records follow it"
    );
    assert_eq!(
        all_entries(&s)?,
        ents_3_4_5(),
        "entry 7 is after the damage"
    );
    Ok(())
}

#[test]
fn a_zero_filled_tail_is_the_end_of_the_log() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let s = storage_with(tmp.path(), &ents_3_4_5())?;
    drop(s);
    // Past the unused preallocated space, the file grew but its last blocks never got data.
    let seg = last_segment(tmp.path())?;
    OpenOptions::new()
        .append(true)
        .open(&seg)?
        .write_all(&[0u8; 100])?;
    let mut s = open(tmp.path())?;
    assert_eq!(s.recovery().damage, None);
    assert_eq!(all_entries(&s)?, ents_3_4_5());
    s.append(&[new_entry(6, 6)])?;
    drop(s);
    reopens_clean(tmp.path(), open, 6)
}

/// Opens the storage in `dir` again and checks that it finds no damage and ends at `last`.
fn reopens_clean(
    dir: &Path,
    reopen: fn(&Path) -> Result<DiskStorage, StorageError>,
    last: u64,
) -> TestResult {
    let s = reopen(dir)?;
    assert_eq!(s.recovery().damage, None);
    assert_eq!(s.last_index()?, last);
    Ok(())
}

#[test]
fn a_half_written_record_in_preallocated_space_is_a_torn_write() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    s.append(&[new_entry(6, 5)])?;
    drop(s);
    // The last record's final bytes never landed: zeros, as the rest of the space.
    let seg = last_segment(tmp.path())?;
    let end = data_len(&seg)?;
    let mut f = OpenOptions::new().write(true).open(&seg)?;
    f.seek(SeekFrom::Start(end - 5))?;
    f.write_all(&[0u8; 5])?;
    drop(f);

    let s = open(tmp.path())?;
    let damage = s.recovery().damage.clone().ok_or("damage not reported")?;
    assert!(damage.reason.contains("checksum"), "{}", damage.reason);
    assert_eq!(damage.kind, DamageKind::TornWrite);
    assert_eq!(all_entries(&s)?, ents_3_4_5());
    Ok(())
}

#[test]
fn a_batch_torn_in_the_middle_in_preallocated_space_is_a_torn_write() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    // One append, one write: entries 6, 7 and 8 in one batch.
    s.append(&[new_entry(6, 5), new_entry(7, 5), new_entry(8, 5)])?;
    drop(s);
    // The middle of the write never landed; its end did.
    let seg = last_segment(tmp.path())?;
    overwrite(&seg, position_of(&seg, b"entry 7/5")?, &[0u8; 9])?;

    let s = open(tmp.path())?;
    let damage = s.recovery().damage.clone().ok_or("damage not reported")?;
    assert_eq!(damage.kind, DamageKind::TornWrite, "{}", damage.reason);
    assert_eq!(all_entries(&s)?, ents_3_4_5(), "the whole batch is gone");
    Ok(())
}

#[test]
fn zeros_before_the_end_of_a_sealed_segment_are_corruption() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = open_small(tmp.path())?;
    for i in 1..=40 {
        s.append(&[new_entry(i, 1)])?;
    }
    drop(s);
    let segs = segments(tmp.path())?;
    assert!(segs.len() >= 3, "{} segments", segs.len());
    // Records of the first (sealed) segment read back as zeros.
    let len = fs::metadata(&segs[0])?.len();
    let mut f = OpenOptions::new().write(true).open(&segs[0])?;
    f.seek(SeekFrom::Start(len - 20))?;
    f.write_all(&[0u8; 20])?;
    drop(f);

    let s = open_small(tmp.path())?;
    let damage = s.recovery().damage.clone().ok_or("damage not reported")?;
    assert_eq!(damage.kind, DamageKind::Corrupt, "{}", damage.reason);
    assert_eq!(damage.dropped_segments, segs.len() - 1);
    Ok(())
}

#[test]
fn a_segment_created_up_to_its_zeros_is_a_torn_write() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let s = storage_with(tmp.path(), &ents_3_4_5())?;
    drop(s);
    // A rotation cut the segment to its records; the next one's space was reserved but its
    // header never landed.
    let last = last_segment(tmp.path())?;
    let end = data_len(&last)?;
    OpenOptions::new().write(true).open(&last)?.set_len(end)?;
    let name = last.file_name().and_then(|n| n.to_str()).ok_or("name")?;
    let seq: u64 = name.trim_end_matches(".wal").parse()?;
    let next = last.with_file_name(format!("{:020}.wal", seq + 1));
    fs::write(&next, vec![0u8; 4096])?;

    let s = open(tmp.path())?;
    let damage = s.recovery().damage.clone().ok_or("damage not reported")?;
    assert_eq!(damage.kind, DamageKind::TornWrite, "{}", damage.reason);
    assert_eq!(all_entries(&s)?, ents_3_4_5());
    Ok(())
}

#[test]
fn the_active_segment_is_preallocated_and_cut_to_its_records_when_full() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = open_small(tmp.path())?;
    for i in 1..=40 {
        s.append(&[new_entry(i, 1)])?;
    }
    let segs = segments(tmp.path())?;
    assert!(segs.len() >= 3, "{} segments", segs.len());
    let (active, sealed) = segs.split_last().ok_or("no segment")?;
    assert!(
        fs::metadata(active)?.len() >= 256,
        "the active segment holds its 256 bytes"
    );
    for seg in sealed {
        assert_eq!(
            fs::metadata(seg)?.len(),
            data_len(seg)?,
            "{} keeps unused space",
            seg.display()
        );
    }
    drop(s);
    reopens_clean(tmp.path(), open_small, 40)
}

#[test]
fn a_commit_past_the_surviving_log_is_lowered() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    s.append(&[new_entry(6, 5)])?;
    let hs = HardState {
        term: 5,
        commit: 6,
        ..Default::default()
    };
    s.set_hard_state(&hs)?;
    drop(s);
    let seg = last_segment(tmp.path())?;
    let len = fs::metadata(&seg)?.len();
    // Remove the commit record and half of entry 6.
    let pos = position_of(&seg, b"entry 6/5")?;
    OpenOptions::new().write(true).open(&seg)?.set_len(pos)?;
    assert!(pos < len);

    let s = open(tmp.path())?;
    assert_eq!(s.recovery().commit_clamped, Some((6, 5)));
    assert_eq!(s.initial_state()?.hard_state.commit, 5);
    assert_eq!(
        s.initial_state()?.hard_state.term,
        5,
        "term and vote are kept"
    );
    Ok(())
}

#[test]
fn a_snapshot_compacts_the_log_and_removes_whole_segments() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = open_small(tmp.path())?;
    s.apply_snapshot(new_snapshot(2, 2, vec![1]))?;
    for i in 3..=40 {
        s.append(&[new_entry(i, 3)])?;
    }
    let before = segments(tmp.path())?.len();
    assert!(before > 3, "small segments rotate: {before}");

    let cs = ConfState {
        voters: vec![1],
        ..Default::default()
    };
    s.create_snapshot(30, cs.clone(), b"fsm at 30".to_vec())?;
    s.compact(31)?;
    assert_eq!(s.first_index()?, 31);
    assert_eq!(s.term(30)?, 3);
    assert_eq!(
        s.term(29),
        Err(raft::Error::Store(RaftStorageError::Compacted))
    );
    let after = segments(tmp.path())?.len();
    assert!(after < before, "segments {before} -> {after}");
    assert!(s.initial_state()?.hard_state.commit >= 30);

    drop(s);
    let s = open_small(tmp.path())?;
    assert_eq!(s.first_index()?, 31);
    assert_eq!(s.last_index()?, 40);
    assert_eq!(s.latest_snapshot().get_metadata().index, 30);
    assert_eq!(&s.latest_snapshot().data[..], b"fsm at 30");
    assert_eq!(s.latest_snapshot().get_metadata().get_conf_state(), &cs);
    assert_eq!(s.initial_state()?.hard_state.commit, 30);
    Ok(())
}

#[test]
fn a_received_snapshot_replaces_the_log() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    s.append(&[new_entry(6, 5), new_entry(7, 5)])?;
    // The leader's snapshot at 10 does not contain our (uncommitted) 6 and 7.
    s.apply_snapshot(new_snapshot(10, 8, vec![1, 2]))?;
    assert_eq!(s.first_index()?, 11);
    assert_eq!(s.last_index()?, 10);
    assert_eq!(s.term(10)?, 8);
    s.append(&[new_entry(11, 8)])?;
    drop(s);

    let s = open(tmp.path())?;
    assert_eq!(all_entries(&s)?, vec![new_entry(11, 8)]);
    let state = s.initial_state()?;
    assert_eq!(state.hard_state.commit, 10);
    assert_eq!(state.hard_state.term, 8);
    assert_eq!(state.conf_state.voters, vec![1, 2]);
    assert_eq!(s.segment_count(), 1, "old segments removed");
    Ok(())
}

#[test]
fn a_snapshot_written_on_another_thread_counts_once_handed_back() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    let pending = pending_at_4(&s, b"fsm at 4")?;
    assert_eq!(pending.index(), 4);
    let written = std::thread::spawn(move || pending.write())
        .join()
        .map_err(|_| "writer panicked")??;
    // Written, but not the stored snapshot until handed back.
    assert_eq!(s.latest_snapshot().get_metadata().index, 2);
    assert!(s.snapshot_written(written)?);
    assert_eq!(s.latest_snapshot().get_metadata().index, 4);
    s.compact(5)?;
    drop(s);
    let s = open(tmp.path())?;
    assert_eq!(s.latest_snapshot().get_metadata().index, 4);
    assert_eq!(&s.latest_snapshot().data[..], b"fsm at 4");
    Ok(())
}

#[test]
fn a_leader_snapshot_wins_over_an_older_one_written_late() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    let pending = pending_at_4(&s, b"fsm at 4")?;
    // The leader's snapshot arrives while ours is being written.
    s.apply_snapshot(new_snapshot(10, 8, vec![1, 2]))?;
    let written = pending.write()?;
    assert!(
        !s.snapshot_written(written)?,
        "the older snapshot is ignored"
    );
    assert_eq!(s.latest_snapshot().get_metadata().index, 10);
    drop(s);
    // Nor did it replace the leader's in the file.
    let s = open(tmp.path())?;
    assert_eq!(s.latest_snapshot().get_metadata().index, 10);
    assert_eq!(&s.latest_snapshot().data[..], b"state");
    Ok(())
}

#[test]
fn a_writer_of_a_stopped_node_does_not_replace_a_newer_snapshot() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let s = storage_with(tmp.path(), &ents_3_4_5())?;
    let pending = pending_at_4(&s, b"old node at 4")?;
    drop(s);
    // A new node on the same directory installs a leader's snapshot before the stopped
    // node's writer gets to write.
    let mut s = open(tmp.path())?;
    s.apply_snapshot(new_snapshot(10, 8, vec![1, 2]))?;
    pending.write()?;
    drop(s);
    let s = open(tmp.path())?;
    assert_eq!(s.latest_snapshot().get_metadata().index, 10);
    assert_eq!(&s.latest_snapshot().data[..], b"state");
    let leftovers: Vec<_> = fs::read_dir(tmp.path())?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    Ok(())
}

#[test]
fn create_snapshot_refuses_unknown_or_old_indices() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    assert!(s.create_snapshot(9, ConfState::default(), vec![]).is_err());
    assert!(s.create_snapshot(2, ConfState::default(), vec![]).is_err());
    assert_eq!(
        s.create_snapshot(4, ConfState::default(), vec![1])?
            .get_metadata()
            .term,
        4
    );
    Ok(())
}

#[test]
fn a_damaged_state_file_is_an_error_not_a_reset() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut s = storage_with(tmp.path(), &ents_3_4_5())?;
    let hs = HardState {
        term: 9,
        ..Default::default()
    };
    s.set_hard_state(&hs)?;
    drop(s);
    let path = tmp.path().join("state");
    let mut bytes = fs::read(&path)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, bytes)?;
    assert!(matches!(
        open(tmp.path()),
        Err(StorageError::Corrupt { .. })
    ));
    Ok(())
}
