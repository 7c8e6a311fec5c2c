//! The state machine's snapshot format: a versioned header, then typed records.
//!
//! ```text
//! "TUGSNAP" version:u8  { kind:u8 len:u32le body[len] }*
//! ```
//! The first record is the [`SnapshotMeta`]; one record per object follows. Record kinds are
//! append-only like command types; an unknown kind with [`IGNORE_UNKNOWN`] set is skipped.
//! Restore builds a fresh state from the records and only then replaces the live one.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Weak};

use bytes::Bytes;
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
    encode_shared(&store.shared(), &Encodings::default())
        .data
        .to_vec()
}

/// Where the objects of the last snapshot a replica wrote are encoded in it, by the allocation
/// each object lives in, so the next snapshot copies their bytes instead of encoding them
/// again: its cost follows the objects changed in between, not the size of the state.
///
/// Stored objects never change in place: a change stores a new `Arc`. The weak reference kept
/// per object stops its allocation from being freed and reused while it is remembered (and
/// makes `Arc::get_mut` refuse, and `Arc::make_mut` move the value out), so an object found
/// here by address is the very object whose bytes are remembered. The bytes are slices of the
/// snapshot's own buffer, which the Raft storage keeps anyway.
#[derive(Debug, Default)]
pub struct Encodings {
    data: Bytes,
    services: HashMap<usize, Encoded<Service>>,
    tasks: HashMap<usize, Encoded<Task>>,
}

impl Encodings {
    /// Objects whose encodings are remembered.
    pub fn len(&self) -> usize {
        self.services.len() + self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct Encoded<T> {
    /// Keeps the allocation (not the object) alive; see [`Encodings`].
    _allocation: Weak<T>,
    /// The record body's place in [`Encodings::data`].
    body: Range<usize>,
}

/// A snapshot's bytes, the encodings to give the next one, and how many objects were copied
/// from the previous one rather than encoded.
#[derive(Debug)]
pub struct EncodedState {
    pub data: Bytes,
    pub encodings: Encodings,
    pub reused: usize,
}

/// Serializes the state taken by [`Store::shared`] (on any thread), copying the bytes of
/// objects that `previous` (the last snapshot's [`Encodings`]) holds.
pub fn encode_shared(state: &SharedState, previous: &Encodings) -> EncodedState {
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
        64 + previous.data.len() + state.object_count().saturating_sub(previous.len()) * 256,
    );
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    put_record(&mut out, KIND_META, &meta);
    let mut reused = 0;
    // The store keeps services and tasks hashed; written in a fixed order (see `in_order`),
    // the same state makes the same snapshot on every replica.
    let services: Vec<_> = in_order(
        &state.services,
        &previous.services,
        |svc| svc.metadata.as_ref().map_or(0, |m| m.revision),
        |a, b| service_order(a).cmp(&service_order(b)),
    )
    .into_iter()
    .map(|(svc, body)| {
        put_object(
            &mut out,
            KIND_SERVICE,
            svc,
            &previous.data,
            body,
            &mut reused,
        )
    })
    .collect();
    for node in &state.nodes {
        put_record(&mut out, KIND_NODE, node.as_ref());
    }
    let tasks: Vec<_> = in_order(
        &state.tasks,
        &previous.tasks,
        |task| task.revision,
        |a, b| a.id.cmp(&b.id),
    )
    .into_iter()
    .map(|(task, body)| put_object(&mut out, KIND_TASK, task, &previous.data, body, &mut reused))
    .collect();
    let data = Bytes::from(out);
    EncodedState {
        encodings: Encodings {
            data: data.clone(),
            services: services.into_iter().collect(),
            tasks: tasks.into_iter().collect(),
        },
        data,
        reused,
    }
}

/// `objects` in snapshot order, each with its record body in the previous snapshot if that
/// holds it. The order is by the revision that last changed an object, then by key: a
/// function of the state alone. The previous snapshot is in that order too, and every object
/// changed since has a later revision than any it holds unchanged, so those keep their old
/// order (by position) and only the changed ones are sorted, by a revision read once each
/// (keys are compared only between objects of one revision, such as the tasks of one plan).
/// The two lists are still merged by the full order, which costs no key comparison as long as
/// the revisions already tell.
fn in_order<'a, T>(
    objects: &'a [Arc<T>],
    remembered: &HashMap<usize, Encoded<T>>,
    revision: impl Fn(&T) -> u64,
    key: impl Fn(&T, &T) -> Ordering,
) -> Vec<(&'a Arc<T>, Option<Range<usize>>)> {
    let mut kept = Vec::with_capacity(remembered.len().min(objects.len()));
    let mut new = Vec::new();
    for object in objects {
        let rev = revision(object);
        match remembered.get(&(Arc::as_ptr(object) as usize)) {
            Some(e) => kept.push((rev, object, e.body.clone())),
            None => new.push((rev, object)),
        }
    }
    kept.sort_unstable_by_key(|(_, _, body)| body.start);
    new.sort_unstable_by(|(ra, a), (rb, b)| ra.cmp(rb).then_with(|| key(a, b)));
    let mut ordered = Vec::with_capacity(objects.len());
    let mut kept = kept.into_iter().peekable();
    let mut new = new.into_iter().peekable();
    loop {
        let take_kept = match (kept.peek(), new.peek()) {
            (Some((rk, k, _)), Some((rn, n))) => {
                rk.cmp(rn).then_with(|| key(k, n)) != Ordering::Greater
            }
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_kept {
            ordered.extend(kept.next().map(|(_, object, body)| (object, Some(body))));
        } else {
            ordered.extend(new.next().map(|(_, object)| (object, None)));
        }
    }
    ordered
}

/// Writes one object's record, copying its body from `previous` where `body` says it is
/// there; returns where its body is now, for the next snapshot.
fn put_object<T: Message>(
    out: &mut Vec<u8>,
    kind: u8,
    object: &Arc<T>,
    previous: &Bytes,
    body: Option<Range<usize>>,
    reused: &mut usize,
) -> (usize, Encoded<T>) {
    let cached = body.and_then(|b| previous.get(b));
    out.push(kind);
    let start = out.len() + 4;
    match cached {
        Some(body) => {
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(body);
            *reused += 1;
        }
        None => {
            out.extend_from_slice(&(object.encoded_len() as u32).to_le_bytes());
            object.encode_raw(out);
        }
    }
    (
        Arc::as_ptr(object) as usize,
        Encoded {
            _allocation: Arc::downgrade(object),
            body: start..out.len(),
        },
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, revision: u64) -> Arc<Task> {
        Arc::new(Task {
            id: id.to_string(),
            revision,
            ..Task::default()
        })
    }

    /// The ids of `in_order`'s output, and which of them came with a remembered body.
    fn order(objects: &[Arc<Task>], remembered: &HashMap<usize, Encoded<Task>>) -> Vec<String> {
        in_order(objects, remembered, |t| t.revision, |a, b| a.id.cmp(&b.id))
            .into_iter()
            .map(|(t, body)| format!("{}{}", t.id, if body.is_some() { "*" } else { "" }))
            .collect()
    }

    #[test]
    fn objects_go_by_revision_then_key_whichever_were_remembered() {
        // Revisions 3 and 5 were in the last snapshot, in that order (bodies at 0 and 10).
        let (a, b) = (task("a", 5), task("b", 3));
        let remembered = |objects: &[(&Arc<Task>, usize)]| -> HashMap<usize, Encoded<Task>> {
            objects
                .iter()
                .map(|(t, at)| {
                    let encoded = Encoded {
                        _allocation: Arc::downgrade(t),
                        body: *at..*at + 1,
                    };
                    (Arc::as_ptr(t) as usize, encoded)
                })
                .collect()
        };
        let last = remembered(&[(&b, 0), (&a, 10)]);
        // Changed since: two of one revision (keys decide), one later, and an older revision
        // than a remembered one (not what the store makes, but the order still holds).
        let objects = vec![
            task("z", 9),
            a.clone(),
            task("d", 7),
            task("c", 7),
            b.clone(),
            task("y", 4),
        ];
        assert_eq!(
            order(&objects, &last),
            ["b*", "y", "a*", "c", "d", "z"].map(String::from)
        );
        // With nothing remembered, the same order.
        assert_eq!(
            order(&objects, &HashMap::new()),
            ["b", "y", "a", "c", "d", "z"].map(String::from)
        );
    }
}
