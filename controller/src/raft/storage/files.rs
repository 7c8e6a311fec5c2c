//! Small files written whole and atomically (temp file, fsync, rename, fsync directory): the
//! hard/conf state and the latest snapshot. Each carries a magic and a CRC32, so a damaged file
//! is recognised instead of being trusted.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, HardState, Snapshot, SnapshotMetadata};

pub(super) const STATE_FILE: &str = "state";
pub(super) const SNAPSHOT_FILE: &str = "snapshot";

const STATE_MAGIC: &[u8; 8] = b"TUGRST01";
const SNAPSHOT_MAGIC: &[u8; 8] = b"TUGRSN01";

/// Writes `name` in `dir` so that after a crash it holds either the old or the new bytes.
pub(super) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Writes `bytes` to a new file at `path` and syncs it.
pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_parts_synced(path, &[bytes])
}

/// Writes `parts`, one after the other, to a new file at `path` and syncs it.
pub(super) fn write_parts_synced(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let mut f = File::create(path)?;
    for part in parts {
        f.write_all(part)?;
    }
    f.sync_all()
}

/// Makes creations, renames and removals in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a whole file; `None` if it does not exist.
pub(super) fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What the `state` file holds: the hard state, the conf state and the index of the log entry
/// that produced that conf state (so replay after a restart does not apply it twice).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct PersistedState {
    pub(super) hard_state: HardState,
    pub(super) conf_state: ConfState,
    pub(super) conf_index: u64,
}

/// `magic crc32:u32 len:u32 payload`, payload = `hs_len:u32 hs cs_len:u32 cs conf_index:u64`.
pub(super) fn encode_state(state: &PersistedState) -> Result<Vec<u8>, protobuf::ProtobufError> {
    let hs = state.hard_state.write_to_bytes()?;
    let cs = state.conf_state.write_to_bytes()?;
    let mut payload = Vec::with_capacity(16 + hs.len() + cs.len());
    put_chunk(&mut payload, &hs);
    put_chunk(&mut payload, &cs);
    payload.extend_from_slice(&state.conf_index.to_le_bytes());
    Ok(frame(STATE_MAGIC, &payload))
}

pub(super) fn decode_state(bytes: &[u8]) -> Result<PersistedState, String> {
    let payload = unframe(STATE_MAGIC, bytes)?;
    let mut r = Reader(payload);
    let hs = HardState::parse_from_bytes(r.chunk()?).map_err(|e| format!("hard state: {e}"))?;
    let cs = ConfState::parse_from_bytes(r.chunk()?).map_err(|e| format!("conf state: {e}"))?;
    let conf_index = r.u64()?;
    Ok(PersistedState {
        hard_state: hs,
        conf_state: cs,
        conf_index,
    })
}

/// A snapshot file is `magic crc32:u32 len:u32 payload`, payload = `meta_len:u32 metadata
/// data`. This is everything before `data`: the file is written as this head and then the data
/// itself, so a large state is not copied into one buffer first. `None`: the payload is larger
/// than the format's 4 GiB.
pub(super) fn snapshot_head(snap: &Snapshot) -> Result<Option<Vec<u8>>, protobuf::ProtobufError> {
    let meta = snap.get_metadata().write_to_bytes()?;
    let mut chunk = Vec::with_capacity(4 + meta.len());
    put_chunk(&mut chunk, &meta);
    let Ok(len) = u32::try_from(chunk.len() + snap.data.len()) else {
        return Ok(None);
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&chunk);
    crc.update(&snap.data);
    let mut head = Vec::with_capacity(16 + chunk.len());
    head.extend_from_slice(&frame_head(SNAPSHOT_MAGIC, crc.finalize(), len));
    head.extend_from_slice(&chunk);
    Ok(Some(head))
}

pub(super) fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, String> {
    let payload = unframe(SNAPSHOT_MAGIC, bytes)?;
    let mut r = Reader(payload);
    let meta = SnapshotMetadata::parse_from_bytes(r.chunk()?)
        .map_err(|e| format!("snapshot metadata: {e}"))?;
    let mut snap = Snapshot::default();
    snap.set_metadata(meta);
    snap.data = bytes::Bytes::copy_from_slice(r.0);
    Ok(snap)
}

fn put_chunk(out: &mut Vec<u8>, chunk: &[u8]) {
    out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
    out.extend_from_slice(chunk);
}

fn frame(magic: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + payload.len());
    out.extend_from_slice(&frame_head(
        magic,
        crc32fast::hash(payload),
        payload.len() as u32,
    ));
    out.extend_from_slice(payload);
    out
}

/// `magic crc32:u32 len:u32`: what every file here starts with, before its payload.
fn frame_head(magic: &[u8; 8], crc: u32, len: u32) -> [u8; 16] {
    let mut head = [0; 16];
    head[..8].copy_from_slice(magic);
    head[8..12].copy_from_slice(&crc.to_le_bytes());
    head[12..].copy_from_slice(&len.to_le_bytes());
    head
}

fn unframe<'a>(magic: &[u8; 8], bytes: &'a [u8]) -> Result<&'a [u8], String> {
    if bytes.len() < 16 || &bytes[..8] != magic {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
    let payload = &bytes[16..];
    if payload.len() != len {
        return Err(format!("length {} but header says {len}", payload.len()));
    }
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(payload)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn chunk(&mut self) -> Result<&'a [u8], String> {
        let len = self.take(4)?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        self.take(len)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}
