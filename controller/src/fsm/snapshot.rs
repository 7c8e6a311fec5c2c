//! The state machine's snapshot format: a versioned header, then typed records.
//!
//! ```text
//! "TUGSNAP" version:u8  { kind:u8 len:u32le body[len] }*
//! ```
//! The first record is the [`SnapshotMeta`]; one record per object follows. Record kinds are
//! append-only like command types; an unknown kind with [`IGNORE_UNKNOWN`] set is skipped.
//! Restore builds a fresh state from the records and only then replaces the live one.

use prost::Message;
use tug_api::v1::{Node, Service, Task};

use super::command::IGNORE_UNKNOWN;
use crate::state::{ClusterNetwork, Restored, SharedState, Store};

const MAGIC: &[u8; 7] = b"TUGSNAP";
const VERSION: u8 = 1;

/// Record kinds. Append only.
const KIND_META: u8 = 1;
const KIND_SERVICE: u8 = 2;
const KIND_NODE: u8 = 3;
const KIND_TASK: u8 = 4;

#[derive(Clone, PartialEq, Message)]
pub struct SnapshotMeta {
    /// The log index the snapshot was taken at.
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    #[prost(uint64, tag = "2")]
    pub services: u64,
    #[prost(uint64, tag = "3")]
    pub nodes: u64,
    #[prost(uint64, tag = "4")]
    pub tasks: u64,
    /// The cluster network ("10.88.0.0/16", 24); empty when no registration fixed it yet.
    #[prost(string, tag = "5")]
    pub cluster_cidr: String,
    #[prost(uint32, tag = "6")]
    pub node_prefix: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a tug state snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {0} is newer than this controller understands")]
    UnsupportedVersion(u8),
    #[error("snapshot truncated at byte {offset}")]
    Truncated { offset: usize },
    #[error("unknown snapshot record kind {kind} at byte {offset}")]
    UnknownRecord { kind: u8, offset: usize },
    #[error("cannot decode snapshot record at byte {offset}: {source}")]
    Decode {
        offset: usize,
        #[source]
        source: prost::DecodeError,
    },
    #[error("snapshot has no metadata record")]
    MissingMeta,
    #[error("snapshot holds an invalid cluster network: {0}")]
    Network(String),
    #[error("snapshot says it holds {expected} {what} but has {found}")]
    Count {
        what: &'static str,
        expected: u64,
        found: u64,
    },
}

/// Serializes the whole state.
pub fn encode(store: &Store) -> Vec<u8> {
    encode_shared(&store.shared())
}

/// Serializes the state taken by [`Store::shared`] (on any thread).
pub fn encode_shared(state: &SharedState) -> Vec<u8> {
    let network = state.network.as_ref();
    let meta = SnapshotMeta {
        revision: state.revision,
        services: state.services.len() as u64,
        nodes: state.nodes.len() as u64,
        tasks: state.tasks.len() as u64,
        cluster_cidr: network.map(|n| n.cidr.to_string()).unwrap_or_default(),
        node_prefix: network.map_or(0, |n| u32::from(n.node_prefix)),
    };
    let mut out = Vec::with_capacity(
        64 + state
            .services
            .iter()
            .map(|s| s.encoded_len() + 5)
            .sum::<usize>()
            + state.tasks.len() * 256,
    );
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    put_record(&mut out, KIND_META, &meta);
    // The store keeps services and tasks hashed; written in key order, the same state makes
    // the same snapshot on every replica.
    let mut services: Vec<&Service> = state.services.iter().map(AsRef::as_ref).collect();
    services.sort_unstable_by(|a, b| service_order(a).cmp(&service_order(b)));
    for svc in services {
        put_record(&mut out, KIND_SERVICE, svc);
    }
    for node in &state.nodes {
        put_record(&mut out, KIND_NODE, node.as_ref());
    }
    let mut tasks: Vec<&Task> = state.tasks.iter().map(AsRef::as_ref).collect();
    tasks.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    for task in tasks {
        put_record(&mut out, KIND_TASK, task);
    }
    out
}

/// (namespace, name) of a stored service.
fn service_order(svc: &Service) -> (&str, &str) {
    svc.metadata
        .as_ref()
        .map_or(("", ""), |m| (m.namespace.as_str(), m.name.as_str()))
}

/// The snapshot of an empty state at `revision` (how a new cluster starts).
pub fn encode_empty(revision: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    put_record(
        &mut out,
        KIND_META,
        &SnapshotMeta {
            revision,
            ..Default::default()
        },
    );
    out
}

fn put_record(out: &mut Vec<u8>, kind: u8, msg: &impl Message) {
    out.push(kind);
    let len = msg.encoded_len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    msg.encode_raw(out);
}

pub fn decode(data: &[u8]) -> Result<Restored, SnapshotError> {
    let header = MAGIC.len() + 1;
    if data.len() < header || &data[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    if data[MAGIC.len()] != VERSION {
        return Err(SnapshotError::UnsupportedVersion(data[MAGIC.len()]));
    }
    let mut offset = header;
    let mut meta: Option<SnapshotMeta> = None;
    let mut restored = Restored::default();
    while offset < data.len() {
        let start = offset;
        let head = data
            .get(offset..offset + 5)
            .ok_or(SnapshotError::Truncated { offset })?;
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        offset += 5;
        let body = data
            .get(offset..offset + len)
            .ok_or(SnapshotError::Truncated { offset: start })?;
        offset += len;
        let decode_err = |source| SnapshotError::Decode {
            offset: start,
            source,
        };
        match kind {
            KIND_META => meta = Some(SnapshotMeta::decode(body).map_err(decode_err)?),
            KIND_SERVICE => {
                let svc = Service::decode(body).map_err(decode_err)?;
                restored
                    .services
                    .insert(crate::state::service_key(&svc), svc);
            }
            KIND_NODE => {
                let node = Node::decode(body).map_err(decode_err)?;
                let name = node.description.as_ref().map(|d| d.name.clone());
                restored.nodes.insert(name.unwrap_or_default(), node);
            }
            KIND_TASK => restored.tasks.push(Task::decode(body).map_err(decode_err)?),
            k if k & IGNORE_UNKNOWN != 0 => {}
            k => {
                return Err(SnapshotError::UnknownRecord {
                    kind: k,
                    offset: start,
                });
            }
        }
    }
    let meta = meta.ok_or(SnapshotError::MissingMeta)?;
    for (what, expected, found) in [
        ("services", meta.services, restored.services.len()),
        ("nodes", meta.nodes, restored.nodes.len()),
        ("tasks", meta.tasks, restored.tasks.len()),
    ] {
        if expected != found as u64 {
            return Err(SnapshotError::Count {
                what,
                expected,
                found: found as u64,
            });
        }
    }
    restored.revision = meta.revision;
    if !meta.cluster_cidr.is_empty() {
        let prefix = u8::try_from(meta.node_prefix).unwrap_or(u8::MAX);
        restored.network = Some(
            ClusterNetwork::parse(&meta.cluster_cidr, prefix)
                .map_err(|e| SnapshotError::Network(e.to_string()))?,
        );
    }
    Ok(restored)
}
