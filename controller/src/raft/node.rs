//! The Raft node: owns raft-rs's `RawNode` over [`DiskStorage`] and the state machine, and runs
//! one tokio task that ticks, steps peer messages, takes client requests, and handles each Ready
//! in the order of STYLE.md §3:
//!
//! 1. send `messages` (they may leave before the local write);
//! 2. install a snapshot (storage, then state machine);
//! 3. on the leader, apply committed entries (commands to the state machine, conf changes to
//!    raft + storage): its clients are answered before its own sync. That includes entries a
//!    quorum of followers made durable while the leader's own sync of them still runs (raft-rs
//!    hands those out only after it: see `apply_committed_unsynced`); then, if anything was
//!    handed over in 1 or 3 and there is a local write, yield once, so the transport's and
//!    the clients' tasks put it on the wire before the local write and sync (otherwise the
//!    followers' fsyncs would start that much later);
//! 4. append `entries` and persist the hard state: one fdatasync (a commit-only change is
//!    written with the next append, see `storage`). The leader writes in place but syncs
//!    asynchronously (raft-rs's `advance_append_async`, see [`LeaderSyncs`]): the loop goes
//!    on proposing and replicating while a sync runs on tokio's blocking pool, and tells raft
//!    (`on_persist_ready`) when it is done, which counts the leader's own copy towards the
//!    commit. A follower, whose acknowledgement waits for the sync, syncs in place;
//! 5. only now send `persisted_messages` (votes, append acks); a follower applies committed
//!    entries after this (yielding first, so they are on the wire), so its acknowledgement does
//!    not wait for them;
//! 6. `advance`; the LightReady's commit index, messages and committed entries likewise;
//!    then `advance_apply_to(applied)` (no further than the persisted log). (A leader with a
//!    sync in flight advances asynchronously instead; what its LightReady would carry comes
//!    with the next Ready.)
//!
//! Client requests queued while one cycle runs are all proposed before the next, so concurrent
//! writers share Ready cycles and fsyncs.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use protobuf::Message as PbMessage;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
    Snapshot,
};
use raft::{ProgressState, RawNode, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::config::NodeConfig;
use super::handle::{Membership, NodeHandle, ProposeError, ProposeReply, ReadError, Request};
use super::log_sync::{LeaderSyncs, LogWrite};
use super::logger::raft_logger;
use super::proposals::{Output, Proposals, Reads, Reply, decode_ctx, encode_ctx};
use super::status::NodeStatus;
use super::storage::{DamageKind, DiskStorage, StorageError, StorageOptions};
use super::transport::{Mailbox, Transport};
use crate::fsm::snapshot::{self as fsm_snapshot, Encodings};
use crate::fsm::{Fsm, FsmError};
use crate::state::SharedStore;

/// A node stops on these: continuing could diverge from the group or lose acknowledged data.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid node configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Fsm(#[from] FsmError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("cannot decode the {what} at log index {index}: {source}")]
    Decode {
        what: &'static str,
        index: u64,
        #[source]
        source: protobuf::ProtobufError,
    },
}

/// Ticks a peer may stay in raft's snapshot state (a snapshot in flight) before the node
/// reports the transfer failed so raft sends a new one, in election timeouts.
const SNAPSHOT_WAIT_ELECTIONS: u64 = 5;
/// Peer messages and client requests folded into one Ready cycle at most.
const MAX_STEPS_PER_CYCLE: usize = 4096;
/// How long a leader lets a new commit index wait for an append to carry it to the followers
/// before it sends one just for that.
const COMMIT_NOTIFY_DELAY: Duration = Duration::from_millis(2);

/// A Raft member. Create with [`Node::open`], then drive with [`Node::run`] (or [`spawn`]).
pub struct Node {
    id: u64,
    cfg: NodeConfig,
    raw: RawNode<DiskStorage>,
    fsm: Fsm,
    transport: Arc<dyn Transport>,
    requests: mpsc::Receiver<Request>,
    inbox: mpsc::Receiver<Message>,
    /// Keeps the inbox open while no transport holds the mailbox.
    _mailbox: Mailbox,
    status: watch::Sender<NodeStatus>,
    proposals: Proposals,
    reads: Reads,
    incarnation: u64,
    next_seq: u64,
    applied: u64,
    snapshot_index: u64,
    /// Objects in the state as of the last snapshot: the next is due after at least as many
    /// entries (see [`NodeConfig::snapshot_threshold`]).
    snapshot_objects: u64,
    /// Entries the next routine snapshot waits beyond its interval (see [`snapshot_stagger`]).
    snapshot_stagger: u64,
    /// The snapshot being written on a thread of its own, if any: a large state takes a while
    /// to write and sync, and the loop keeps replicating meanwhile.
    snapshot_writer: Option<SnapshotWriter>,
    /// Where the last snapshot this node wrote encoded each object (see
    /// [`fsm_snapshot::Encodings`]); empty while a writer has them, and after a restart.
    snapshot_encodings: Encodings,
    /// Bytes of the entries applied since the last snapshot was started.
    applied_bytes: u64,
    ticks: u64,
    /// Peers with a snapshot in flight: ticks spent waiting.
    snapshot_waits: HashMap<u64, u64>,
    role: StateRole,
    /// Set while catching up after the log was found damaged on open.
    catch_up: Option<CatchUp>,
    /// Free bytes of the data dir's filesystem and when they were looked up (inner `None`: the
    /// lookup failed); see [`DISK_TRUSTED_FOR`].
    disk_free: Option<(Instant, Option<u64>)>,
    /// Leader: the commit index as of the last append sent to every follower.
    told_commit: u64,
    /// Leader: when to tell the followers a commit index no append has carried yet.
    commit_notify_at: Option<tokio::time::Instant>,
    /// Background proposals waiting for a foreground one, and until when they wait.
    held: Vec<(Vec<u8>, ProposeReply)>,
    held_until: Option<tokio::time::Instant>,
    /// Leader: membership changes waiting for the one before them to be applied (raft-rs
    /// takes one at a time, and a new leader's log may end in one it has not applied yet).
    waiting_confs: Vec<(ConfChangeV2, Reply)>,
    /// Leader: its log syncs in flight.
    leader_syncs: LeaderSyncs,
}

/// Resolves at `at`; never, without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a snapshot writer thread hands back.
struct Written {
    /// The written snapshot.
    snapshot: Result<Snapshot, StorageError>,
    /// Its objects' encodings, for the next snapshot to copy.
    encodings: Encodings,
    /// Objects copied from the previous snapshot rather than encoded.
    reused: usize,
    encoded_in: Duration,
    written_in: Duration,
    /// CPU time the writer thread used (`None` if the clock could not be read).
    cpu: Option<Duration>,
}

/// CPU time the calling thread has used so far.
fn thread_cpu_time() -> Option<Duration> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .ok()
        .map(Duration::from)
}

struct SnapshotWriter {
    index: u64,
    /// `applied_bytes` when it started, given back if it fails.
    applied_bytes: u64,
    for_peer: bool,
    started: Instant,
    /// How long taking the state held the loop.
    taken_in: Duration,
    /// The writer thread's result (an error if the thread died without one).
    done: oneshot::Receiver<Written>,
}

/// A free-space reading this far above the reserve is trusted for [`DISK_TRUSTED_FOR`]: the
/// log's own writes cannot use that much in that time, and the lookup (a `statfs`, 15 us here)
/// stays off the path of most writes. Closer to the reserve, every cycle looks again.
const DISK_TRUSTED_MARGIN: u64 = 64 << 20;
const DISK_TRUSTED_FOR: Duration = Duration::from_millis(100);

/// Whether a free-space reading (`None`: the lookup failed) taken `age` ago can stand in for a
/// new lookup, with `reserve` bytes to keep.
fn reading_trusted(age: Duration, free: Option<u64>, reserve: u64) -> bool {
    age < DISK_TRUSTED_FOR && free.is_some_and(|f| f >= reserve.saturating_add(DISK_TRUSTED_MARGIN))
}

/// How much less CPU weight a snapshot's writer thread gets than the Raft loop (a nice value):
/// at nice 10 it gets about a tenth of a contended CPU, so encoding a large state in the
/// background slows the writes in flight far less, and on an idle CPU it runs at full speed.
const SNAPSHOT_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`SNAPSHOT_NICE`] (on Linux a nice value is
/// per thread). Best effort: a failure only leaves it at the normal priority.
fn lower_thread_priority() {
    // SAFETY: setpriority reads no memory of ours; with PRIO_PROCESS and who = 0 it changes
    // only the calling thread's nice value.
    let rc = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS as _, 0, SNAPSHOT_NICE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the snapshot writer's priority");
    }
}

/// The writer's result once it finishes; never, when no snapshot is being written.
async fn snapshot_written(
    writer: &mut Option<SnapshotWriter>,
) -> Result<Written, oneshot::error::RecvError> {
    match writer {
        Some(w) => (&mut w.done).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug)]
struct CatchUp {
    /// The commit index persisted before the damage.
    min_commit: u64,
    /// The highest commit index a leader has told us since.
    leader_commit: u64,
    heard_leader: bool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

/// Opens a node and runs it on a tokio task until `shutdown` resolves.
pub fn spawn(
    cfg: NodeConfig,
    transport: Arc<dyn Transport>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(NodeHandle, JoinHandle<Result<(), NodeError>>), NodeError> {
    let (node, handle) = Node::open(cfg, transport)?;
    Ok((handle, tokio::spawn(node.run(shutdown))))
}

impl Node {
    /// Opens the Raft state in `cfg.data_dir` (bootstrapping a new cluster or waiting to join
    /// one if it is empty), restores the state machine from the latest snapshot, and returns
    /// the node with a handle on it. Entries after the snapshot are re-applied once running.
    pub fn open(
        cfg: NodeConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<(Self, NodeHandle), NodeError> {
        cfg.validate().map_err(NodeError::Config)?;
        let id = cfg.id;
        let mut storage = DiskStorage::open(
            &cfg.data_dir.join("raft"),
            &StorageOptions {
                segment_bytes: cfg.segment_bytes,
            },
        )?;
        if !storage.is_initialized() && !cfg.initial_members.is_empty() {
            storage.apply_snapshot(bootstrap_snapshot(&cfg.initial_members))?;
            tracing::info!(node = id, members = ?cfg.initial_members, "bootstrapped a new Raft group");
        }

        let store = SharedStore::new(cfg.watch_history);
        let fsm = Fsm::new(store.clone());
        let snapshot = storage.latest_snapshot().clone();
        let snapshot_index = snapshot.get_metadata().index;
        if snapshot_index > 0 {
            fsm.restore(snapshot_index, &snapshot.data)?;
        }
        let snapshot_objects = fsm.object_count() as u64;
        let stagger = snapshot_stagger(
            id,
            &storage.conf_state().voters,
            cfg.snapshot_interval(snapshot_objects),
        );
        let hard_state = storage.hard_state().clone();
        let recovery = storage.recovery().clone();
        let voters = storage.conf_state().voters.len();
        // A torn last write lost nothing acknowledged; anything else may have.
        let lost_acknowledged = recovery
            .damage
            .as_ref()
            .is_some_and(|d| d.kind == DamageKind::Corrupt)
            || recovery.commit_clamped.is_some();
        let catch_up = lost_acknowledged
            .then(|| CatchUp {
                min_commit: recovery
                    .commit_clamped
                    .map_or(hard_state.commit, |(persisted, _)| persisted),
                leader_commit: 0,
                heard_leader: false,
            })
            .filter(|_| voters > 1);
        if let Some(c) = &catch_up {
            tracing::warn!(
                node = id,
                min_commit = c.min_commit,
                "the raft log lost entries (crash or corruption); not voting until caught up \
                 with a leader"
            );
        }
        let raft_cfg = cfg.raft_config(snapshot_index);
        raft_cfg.validate()?;
        let raw = RawNode::new(&raft_cfg, storage, &raft_logger())?;
        tracing::info!(
            node = id,
            term = hard_state.term,
            commit = hard_state.commit,
            snapshot_index,
            last_index = raw.raft.raft_log.last_index(),
            "raft node opened"
        );

        let (request_tx, requests) = mpsc::channel(cfg.max_batch.max(64));
        let (inbox_tx, inbox) = mpsc::channel(cfg.mailbox_capacity);
        let mailbox = Mailbox::new(id, inbox_tx);
        let (status_tx, status_rx) = watch::channel(NodeStatus {
            id,
            ..NodeStatus::default()
        });
        let handle = NodeHandle::new(
            id,
            request_tx,
            mailbox.clone(),
            status_rx,
            store,
            cfg.proposal_timeout,
            cfg.read_timeout,
        )
        .with_metrics(cfg.metrics.clone());
        let incarnation = RandomState::new().hash_one((
            id,
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        ));
        let mut node = Self {
            id,
            cfg,
            raw,
            fsm,
            transport,
            requests,
            inbox,
            _mailbox: mailbox,
            status: status_tx,
            proposals: Proposals::default(),
            reads: Reads::default(),
            incarnation,
            next_seq: 1,
            applied: snapshot_index,
            snapshot_index,
            snapshot_objects,
            snapshot_stagger: stagger,
            snapshot_writer: None,
            snapshot_encodings: Encodings::default(),
            applied_bytes: 0,
            ticks: 0,
            snapshot_waits: HashMap::new(),
            role: StateRole::Follower,
            catch_up,
            disk_free: None,
            told_commit: 0,
            commit_notify_at: None,
            held: Vec::new(),
            held_until: None,
            waiting_confs: Vec::new(),
            leader_syncs: LeaderSyncs::default(),
        };
        node.publish_status();
        Ok((node, handle))
    }

    /// Runs until `shutdown` resolves, every handle is dropped, or a fatal error. Pending
    /// requests fail with `Stopped` when it returns.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
        let mut result = self.run_loop(shutdown).await;
        // (After a fatal error the log is left as the failed write left it.)
        if result.is_ok() {
            result = self.drain_leader_syncs().await;
        }
        if result.is_ok() {
            result = self
                .raw
                .mut_store()
                .flush_pending()
                .map_err(NodeError::from);
        }
        // A snapshot file half written by a thread of a stopped node could race the next
        // node opened on the same directory.
        if let Some(w) = self.snapshot_writer.take() {
            let _ = w.done.await;
        }
        if let Err(e) = &result {
            tracing::error!(node = self.id, error = %e, "raft node stopped on a fatal error");
        }
        self.proposals.fail_all(|_| ProposeError::Stopped);
        for (_, reply) in self.waiting_confs.drain(..) {
            reply.fail(ProposeError::Stopped);
        }
        self.reads.fail_all(|| ReadError::Stopped);
        result
    }

    async fn run_loop(&mut self, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(self.cfg.tick_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                _ = ticker.tick() => self.on_tick(),
                msg = self.inbox.recv() => {
                    if let Some(msg) = msg {
                        self.step(msg);
                    }
                }
                request = self.requests.recv() => match request {
                    Some(request) => self.on_request(request),
                    None => return Ok(()),
                },
                written = snapshot_written(&mut self.snapshot_writer) => {
                    self.on_snapshot_written(written)?;
                }
                () = sleep_until(self.commit_notify_at) => self.notify_commit(),
                () = sleep_until(self.held_until) => self.release_held(),
                // A leader's sync finished: raft counts its own copy of those entries towards
                // their commit.
                synced = self.leader_syncs.finished() => self.raw.on_persist_ready(synced?),
            }
            self.drain_queued();
            self.propose_waiting_conf();
            self.on_ready().await?;
            self.schedule_commit_notify();
            self.maybe_snapshot()?;
            self.check_caught_up();
            self.publish_status();
        }
    }

    /// Takes whatever else is already queued, so it shares this Ready cycle.
    fn drain_queued(&mut self) {
        for _ in 0..MAX_STEPS_PER_CYCLE {
            match self.inbox.try_recv() {
                Ok(msg) => self.step(msg),
                Err(_) => break,
            }
        }
        for _ in 0..self.cfg.max_batch {
            match self.requests.try_recv() {
                Ok(request) => self.on_request(request),
                Err(_) => break,
            }
        }
    }

    fn step(&mut self, mut msg: Message) {
        let (from, msg_type) = (msg.from, msg.get_msg_type());
        match msg_type {
            MessageType::MsgAppend | MessageType::MsgHeartbeat => {
                if let Some(catch_up) = self.catch_up.as_mut()
                    && msg.term >= self.raw.raft.term
                {
                    catch_up.leader_commit = catch_up.leader_commit.max(msg.commit);
                    catch_up.heard_leader = true;
                }
                // A leader that still believes we hold entries our damaged log lost sends a
                // commit index past our log, which raft treats as fatal: commit what we have.
                let last = self.raw.raft.raft_log.last_index();
                if msg_type == MessageType::MsgHeartbeat && msg.commit > last {
                    tracing::debug!(
                        node = self.id,
                        from,
                        commit = msg.commit,
                        last,
                        "heartbeat commit past our log"
                    );
                    msg.commit = last;
                }
            }
            MessageType::MsgAppendResponse if msg.reject => {
                self.forget_lost_entries(from, msg.index, msg.reject_hint);
            }
            MessageType::MsgRequestVote
            | MessageType::MsgRequestPreVote
            | MessageType::MsgTimeoutNow
                if self.catch_up.is_some() =>
            {
                tracing::debug!(
                    node = self.id,
                    from,
                    ?msg_type,
                    "not voting until caught up after log damage"
                );
                return;
            }
            _ => {}
        }
        if let Err(e) = self.raw.step(msg) {
            // Messages from removed or unknown peers, stale local messages: nothing to do.
            tracing::debug!(node = self.id, from, ?msg_type, error = %e, "raft message ignored");
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        if self.catch_up.is_none() {
            // (While catching up after log damage, no election timer: no campaigns.)
            self.raw.tick();
        }
        self.watch_snapshot_transfers();
        let retry_after = self.cfg.election_ticks as u64;
        for seq in self.reads.due_for_retry(self.ticks, retry_after) {
            self.raw.read_index(encode_ctx(self.incarnation, seq));
        }
        self.proposals.purge_closed();
        self.waiting_confs.retain(|(_, reply)| !reply.is_closed());
        self.reads.purge_closed();
    }

    fn next_ctx(&mut self) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        (seq, encode_ctx(self.incarnation, seq))
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Propose {
                data,
                reply,
                background,
            } => {
                let hold = self.cfg.background_hold;
                if background && !hold.is_zero() && self.raw.raft.state == StateRole::Leader {
                    self.held.push((data, reply));
                    self.held_until
                        .get_or_insert_with(|| tokio::time::Instant::now() + hold);
                } else {
                    self.propose(Proposal::Command(data), Reply::Command(reply));
                    self.release_held();
                }
            }
            Request::ChangeMembership { change, reply } => {
                let reply = Reply::Membership(reply);
                if self.waiting_confs.is_empty() {
                    self.propose(Proposal::ConfChange(change), reply);
                } else {
                    // Behind the changes already waiting, in the order they came.
                    self.waiting_confs.push((change, reply));
                }
            }
            Request::ReadIndex { reply } => {
                let (seq, ctx) = self.next_ctx();
                self.raw.read_index(ctx);
                self.reads.insert(seq, reply, self.ticks);
            }
            Request::ReportUnreachable { peer } => self.raw.report_unreachable(peer),
            Request::ReportSnapshot { peer, delivered } => {
                let status = if delivered {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(peer, status);
            }
            Request::TransferLeadership { to } => self.raw.transfer_leader(to),
        }
    }

    /// Proposes the held background proposals, after a client's or when their hold is up (a
    /// node that is no longer the leader fails them, and the proposer tries the new one).
    fn release_held(&mut self) {
        self.held_until = None;
        for (data, reply) in std::mem::take(&mut self.held) {
            self.propose(Proposal::Command(data), Reply::Command(reply));
        }
    }

    /// Proposes the first membership change that waited, once the one before it is applied.
    fn propose_waiting_conf(&mut self) {
        if self.waiting_confs.is_empty()
            || self.raw.raft.state != StateRole::Leader
            || self.raw.raft.has_pending_conf()
        {
            return;
        }
        let (change, reply) = self.waiting_confs.remove(0);
        self.propose(Proposal::ConfChange(change), reply);
    }

    fn propose(&mut self, proposal: Proposal, reply: Reply) {
        if self.raw.raft.state != StateRole::Leader {
            reply.fail(ProposeError::NotLeader {
                leader_id: known(self.raw.raft.leader_id),
            });
            return;
        }
        if let Err(full) = self.check_disk() {
            reply.fail(full);
            return;
        }
        if let Proposal::ConfChange(change) = &proposal
            && change
                .get_changes()
                .iter()
                .any(|c| c.node_id == self.id && c.get_change_type() == ConfChangeType::RemoveNode)
        {
            // raft-rs keeps a removed leader leading; hand leadership over first.
            reply.fail(ProposeError::MembershipChange(format!(
                "node {} is the leader: transfer leadership to another member before removing it",
                self.id
            )));
            return;
        }
        let proposal = match proposal {
            // raft-rs would log it as an empty entry instead, and the caller would be told its
            // change was superseded: it waits for the change before it to be applied.
            Proposal::ConfChange(change) if self.raw.raft.has_pending_conf() => {
                self.waiting_confs.push((change, reply));
                return;
            }
            other => other,
        };
        let (_, ctx) = self.next_ctx();
        let before = self.raw.raft.raft_log.last_index();
        let result = match proposal {
            Proposal::Command(data) => self.raw.propose(ctx.clone(), data),
            Proposal::ConfChange(change) => self.raw.propose_conf_change(ctx.clone(), change),
        };
        let index = self.raw.raft.raft_log.last_index();
        if index > before {
            // raft sent the new entry, with the commit index, to every follower it is not
            // waiting on (a paused one gets the commit index with its next append).
            self.told_commit = self.raw.raft.raft_log.committed;
        }
        match result {
            Ok(()) if index > before => {
                self.proposals.insert(index, self.raw.raft.term, ctx, reply);
            }
            Ok(()) => reply.fail(ProposeError::Refused("no entry was appended".into())),
            Err(e) => reply.fail(ProposeError::Refused(e.to_string())),
        }
    }

    /// Refuses a write while the data dir's filesystem has less than the reserve free: an entry
    /// raft accepted must be persisted, and failing that stops the node.
    fn check_disk(&mut self) -> Result<(), ProposeError> {
        let reserve = self.cfg.disk_reserve_bytes;
        if reserve == 0 {
            return Ok(());
        }
        let trusted = self
            .disk_free
            .is_some_and(|(at, free)| reading_trusted(at.elapsed(), free, reserve));
        if !trusted {
            let free = nix::sys::statvfs::statvfs(&self.cfg.data_dir)
                .ok()
                .map(|stat| stat.blocks_available() * stat.fragment_size());
            self.disk_free = Some((Instant::now(), free));
        }
        let free = self.disk_free.and_then(|(_, free)| free);
        let Some(free) = free else {
            return Ok(());
        };
        if free >= reserve {
            return Ok(());
        }
        Err(ProposeError::DiskFull {
            path: self.cfg.data_dir.display().to_string(),
            free_mib: free >> 20,
            reserve_mib: reserve.div_ceil(1 << 20),
        })
    }

    /// One Ready cycle, in the order of the module docs.
    async fn on_ready(&mut self) -> Result<(), NodeError> {
        // A leader that stepped down makes its log durable before it acts as anything else.
        if self.raw.raft.state != StateRole::Leader {
            self.drain_leader_syncs().await?;
        }
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();

        if let Some(ss) = ready.ss() {
            self.on_role_change(ss.raft_state, ss.leader_id);
        }
        // Work handed to other tasks (peer streams, waiting clients) that should run before
        // the local write (step 3 of the module docs).
        let mut handed_over = false;
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
            handed_over = true;
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        // The leader applies first: that answers its clients before its own sync. A follower
        // persists and acknowledges first, since its acknowledgement is what the leader's
        // clients wait for, and applies afterwards (both before `advance`).
        let mut committed = ready.take_committed_entries();
        if self.role == StateRole::Leader {
            let before = self.applied;
            // (Those applied already, before the leader's sync, are skipped.)
            self.apply_entries(std::mem::take(&mut committed))?;
            self.apply_committed_unsynced()?;
            handed_over |= self.applied > before;
        }
        for rs in ready.take_read_states() {
            match decode_ctx(&rs.request_ctx) {
                Some((incarnation, seq)) if incarnation == self.incarnation => {
                    self.reads.confirmed(seq, rs.index);
                }
                _ => {}
            }
        }
        if handed_over && !ready.entries().is_empty() {
            tokio::task::yield_now().await;
        }
        let sync = self
            .raw
            .mut_store()
            .persist_unsynced(ready.entries(), ready.hs())?;
        // The leader's syncs run off this loop, which goes on proposing and replicating
        // meanwhile. A Ready that comes while one runs, even one with nothing to sync, is
        // durable only once the running sync is: it is reported to raft with it, never
        // advanced as persisted on its own.
        if self.role == StateRole::Leader && (sync.is_some() || !self.leader_syncs.is_idle()) {
            // (raft lets a leader send every message before its own write: none waits here.)
            debug_assert!(ready.persisted_messages().is_empty());
            let written = match sync {
                Some(sync) => LogWrite::Unsynced(sync),
                None if !ready.entries().is_empty() => LogWrite::Synced,
                None => LogWrite::Nothing,
            };
            self.leader_syncs.submit(ready.number(), written);
            self.apply_entries(committed)?;
            self.raw.advance_append_async(ready);
            self.report_applied();
            self.reads.resolve(self.applied);
            return Ok(());
        }
        // A follower's acknowledgement waits for its sync: it syncs here, without a thread hop.
        if let Some(sync) = sync {
            sync.run()?;
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
            // Likewise the acknowledgements leave before this follower applies.
            if !committed.is_empty() {
                tokio::task::yield_now().await;
            }
        }
        self.apply_entries(committed)?;

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        if !light.messages().is_empty() {
            self.transport.send(light.take_messages());
        }
        self.apply_entries(light.take_committed_entries())?;
        self.report_applied();

        self.reads.resolve(self.applied);
        Ok(())
    }

    /// Leader: applies what a quorum of followers has made durable while the leader's own
    /// sync of it still runs, and so answers its clients without waiting for that sync.
    /// Committed means durable on a majority, whichever members they are (raft thesis
    /// §10.2.1): raft-rs counts the leader's own copy only once its sync is reported
    /// (`on_persist_ready`), so nothing here depends on the leader's unsynced log. raft-rs 0.7
    /// hands out committed entries only up to the leader's persisted index; those applied here
    /// come again with a later Ready and are skipped then ([`Self::apply_entries`]), and raft
    /// is told only what it allows ([`Self::report_applied`]). Conf changes are left to that
    /// later Ready: applying one changes raft's own configuration.
    fn apply_committed_unsynced(&mut self) -> Result<(), NodeError> {
        let log = &self.raw.raft.raft_log;
        let (from, committed) = (self.applied + 1, log.committed);
        if self.raw.raft.state != StateRole::Leader || committed < from {
            return Ok(());
        }
        let mut entries = match log.slice(
            from,
            committed + 1,
            None,
            raft::GetEntriesContext::empty(false),
        ) {
            Ok(entries) => entries,
            Err(e) => {
                // (Compacted behind a snapshot: then raft hands them out as usual.)
                tracing::debug!(node = self.id, from, committed, error = %e, "committed entries not readable yet");
                return Ok(());
            }
        };
        let normal = entries
            .iter()
            .take_while(|e| e.get_entry_type() == EntryType::EntryNormal)
            .count();
        entries.truncate(normal);
        self.apply_entries(entries)
    }

    /// Tells raft how far the state machine has applied, as far as raft-rs 0.7 takes it: never
    /// past the local log's persisted index, which a leader's state machine may be ahead of
    /// (see [`Self::apply_committed_unsynced`]).
    fn report_applied(&mut self) {
        let log = &self.raw.raft.raft_log;
        let to = self.applied.min(log.persisted).min(log.committed);
        self.raw.advance_apply_to(to);
    }

    /// Waits for every sync the leader started and reports them to raft (`on_persist_ready`,
    /// as the loop does for each one that finishes while it runs).
    async fn drain_leader_syncs(&mut self) -> Result<(), NodeError> {
        if let Some(number) = self.leader_syncs.drain().await? {
            self.raw.on_persist_ready(number);
        }
        Ok(())
    }

    /// Leader: a commit index that no append has carried to the followers yet (raft is told
    /// not to send one just for it) is sent after [`COMMIT_NOTIFY_DELAY`], unless a proposal
    /// carries it first. Under load the next proposal always does.
    fn schedule_commit_notify(&mut self) {
        let committed = self.raw.raft.raft_log.committed;
        if self.role != StateRole::Leader || committed <= self.told_commit {
            self.commit_notify_at = None;
        } else if self.commit_notify_at.is_none() {
            self.commit_notify_at = Some(tokio::time::Instant::now() + COMMIT_NOTIFY_DELAY);
        }
    }

    fn notify_commit(&mut self) {
        self.commit_notify_at = None;
        if self.raw.raft.state == StateRole::Leader {
            self.raw.raft.bcast_append();
            self.told_commit = self.raw.raft.raft_log.committed;
        }
    }

    fn on_role_change(&mut self, role: StateRole, leader_id: u64) {
        let was_leader = self.role == StateRole::Leader;
        self.role = role;
        tracing::info!(
            node = self.id,
            term = self.raw.raft.term,
            role = ?role,
            leader = leader_id,
            "raft role changed"
        );
        if was_leader && role != StateRole::Leader {
            let leader_id = known(leader_id);
            self.proposals
                .fail_all(|_| ProposeError::LeadershipLost { leader_id });
            for (_, reply) in self.waiting_confs.drain(..) {
                reply.fail(ProposeError::LeadershipLost { leader_id });
            }
        }
        if role != StateRole::Leader {
            self.snapshot_waits.clear();
        }
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), NodeError> {
        let meta = snapshot.get_metadata();
        let (index, term) = (meta.index, meta.term);
        tracing::info!(
            node = self.id,
            index,
            term,
            bytes = snapshot.data.len(),
            "installing a snapshot from the leader"
        );
        let data = snapshot.data.clone();
        let voters = meta.get_conf_state().voters.clone();
        self.raw.mut_store().apply_snapshot(snapshot)?;
        self.fsm.restore(index, &data)?;
        self.applied = index;
        self.snapshot_index = index;
        self.snapshot_objects = self.fsm.object_count() as u64;
        // The leader and the other followers it sent this snapshot may be at the same point.
        self.snapshot_stagger = snapshot_stagger(
            self.id,
            &voters,
            self.cfg.snapshot_interval(self.snapshot_objects),
        );
        self.applied_bytes = 0;
        self.proposals
            .fail_through(index, |i| ProposeError::Dropped { index: i });
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        for entry in entries {
            let index = entry.index;
            if index <= self.applied {
                continue;
            }
            self.applied_bytes += entry.data.len() as u64;
            let output = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    self.fsm.apply_empty(index);
                    Output::Empty
                }
                EntryType::EntryNormal => Output::Command(self.fsm.apply(index, &entry.data)?),
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&entry.data).map_err(|source| {
                        NodeError::Decode {
                            what: "conf change",
                            index,
                            source,
                        }
                    })?;
                    let changed = (index > self.raw.store().conf_index())
                        .then(|| self.raw.apply_conf_change(&cc));
                    self.record_conf_change(index, changed)?
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&entry.data).map_err(|source| {
                        NodeError::Decode {
                            what: "conf change",
                            index,
                            source,
                        }
                    })?;
                    let changed = (index > self.raw.store().conf_index())
                        .then(|| self.raw.apply_conf_change(&cc));
                    if !changed.as_ref().is_some_and(|c| c.is_err()) {
                        self.update_peers(&cc);
                    }
                    self.record_conf_change(index, changed)?
                }
            };
            self.applied = index;
            self.proposals
                .resolve(index, entry.term, &entry.context, output);
        }
        Ok(())
    }

    /// Tells the transport about members added with an address (the change's context) and
    /// members removed, on every replica that applies the change (also when replaying it after
    /// a restart).
    fn update_peers(&self, cc: &ConfChangeV2) {
        let address = std::str::from_utf8(&cc.context)
            .ok()
            .map(str::trim)
            .filter(|a| !a.is_empty());
        for change in cc.get_changes() {
            match change.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    if let Some(addr) = address {
                        self.transport.add_peer(change.node_id, addr);
                    }
                }
                ConfChangeType::RemoveNode => self.transport.remove_peer(change.node_id),
            }
        }
    }

    /// Persists the outcome of applying the conf change at `index` to raft (`None`: it was
    /// already part of the conf state this node restarted with).
    fn record_conf_change(
        &mut self,
        index: u64,
        changed: Option<raft::Result<ConfState>>,
    ) -> Result<Output, NodeError> {
        let result = match changed {
            None => Ok(self.raw.raft.prs().conf().to_conf_state()),
            Some(changed) => match changed {
                Ok(cs) => {
                    self.raw.mut_store().set_conf_state(cs.clone(), index)?;
                    tracing::info!(
                        node = self.id,
                        index,
                        voters = ?sorted(&cs.voters),
                        learners = ?sorted(&cs.learners),
                        "membership changed"
                    );
                    Ok(cs)
                }
                Err(e) => {
                    tracing::warn!(node = self.id, index, error = %e, "membership change refused");
                    Err(e.to_string())
                }
            },
        };
        self.fsm.apply_empty(index);
        Ok(Output::Membership(result.map(|cs| Membership {
            index,
            voters: sorted(&cs.voters),
            learners: sorted(&cs.learners),
        })))
    }

    /// Snapshots the state machine every `snapshot_threshold` applied entries (or as many as
    /// the last snapshot held objects, if more), or when raft
    /// needs a newer snapshot than the stored one (for a new member), and compacts the log
    /// behind it.
    fn maybe_snapshot(&mut self) -> Result<(), NodeError> {
        if self.snapshot_writer.is_some() {
            return Ok(());
        }
        let wanted = self.raw.store().take_snapshot_request();
        let every = self.cfg.snapshot_interval(self.snapshot_objects);
        let due = self.applied
            >= self
                .snapshot_index
                .saturating_add(every)
                .saturating_add(self.snapshot_stagger)
            || self.applied_bytes >= self.cfg.snapshot_threshold_bytes;
        if !(due || wanted)
            || self.applied <= self.snapshot_index
            // A leader may have applied past its own synced log: the snapshot waits for the
            // sync, so it never covers entries this node's log does not durably hold.
            || self.applied > self.raw.raft.raft_log.persisted
            // While replaying after a restart the conf state may be ahead of `applied`.
            || self.applied < self.raw.store().conf_index()
        {
            return Ok(());
        }
        // Here, where nothing changes the state, only references to its objects are taken;
        // they are encoded, written and synced on a thread of their own, at a lower priority,
        // while the loop goes on.
        let started = Instant::now();
        let index = self.applied;
        let conf_state = self.raw.raft.prs().conf().to_conf_state();
        let state = self.fsm.shared_state();
        self.snapshot_objects = state.object_count() as u64;
        let pending = self.raw.store().prepare_snapshot(index, conf_state)?;
        let taken_in = started.elapsed();
        // A routine snapshot yields the CPU to the writes in flight; one a peer waits for, or
        // one that must bound a log grown to its byte limit, does not.
        let background = !wanted && self.applied_bytes < self.cfg.snapshot_threshold_bytes;
        let applied_bytes = std::mem::take(&mut self.applied_bytes);
        let previous = std::mem::take(&mut self.snapshot_encodings);
        let (tx, done) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("tug-snapshot".into())
            .spawn(move || {
                if background {
                    lower_thread_priority();
                }
                let cpu_at_start = thread_cpu_time();
                let encoding = Instant::now();
                let encoded = fsm_snapshot::encode_shared(&state, &previous);
                // Dropped here, not on the loop: a large state's references take a while.
                drop((state, previous));
                let pending = pending.with_data(encoded.data);
                let encoded_in = encoding.elapsed();
                let writing = Instant::now();
                let snapshot = pending.write();
                let _ = tx.send(Written {
                    snapshot,
                    encodings: encoded.encodings,
                    reused: encoded.reused,
                    encoded_in,
                    written_in: writing.elapsed(),
                    cpu: thread_cpu_time()
                        .zip(cpu_at_start)
                        .map(|(end, start)| end.saturating_sub(start)),
                });
            });
        if let Err(e) = spawned {
            tracing::error!(node = self.id, index, error = %e, "cannot start the snapshot writer; the next snapshot is taken when due");
            self.applied_bytes += applied_bytes;
            return Ok(());
        }
        self.snapshot_writer = Some(SnapshotWriter {
            index,
            applied_bytes,
            for_peer: wanted,
            started,
            taken_in,
            done,
        });
        Ok(())
    }

    /// The snapshot file is written: it becomes the stored snapshot and the log behind it is
    /// compacted (unless a snapshot from the leader superseded it meanwhile).
    fn on_snapshot_written(
        &mut self,
        written: Result<Written, oneshot::error::RecvError>,
    ) -> Result<(), NodeError> {
        let Some(w) = self.snapshot_writer.take() else {
            return Ok(());
        };
        let Written {
            snapshot,
            encodings,
            reused,
            encoded_in,
            written_in,
            cpu,
        } = match written {
            Ok(written) => written,
            Err(e) => {
                tracing::error!(node = self.id, index = w.index, error = %e, "the snapshot writer failed; the next snapshot is taken when due");
                self.applied_bytes += w.applied_bytes;
                return Ok(());
            }
        };
        self.snapshot_encodings = encodings;
        let snapshot = snapshot?;
        let bytes = snapshot.data.len();
        let store = self.raw.mut_store();
        if !store.snapshot_written(snapshot)? {
            return Ok(());
        }
        let compact_to = (w.index + 1).saturating_sub(self.cfg.snapshot_catch_up_entries);
        store.compact(compact_to)?;
        self.snapshot_index = w.index;
        // From here on this node keeps its own phase: the next is one interval away.
        self.snapshot_stagger = 0;
        self.cfg
            .metrics
            .observe_snapshot(w.started.elapsed().as_secs_f64());
        tracing::info!(
            node = self.id,
            index = w.index,
            bytes,
            first_index = compact_to.max(1),
            for_peer = w.for_peer,
            take_ms = w.taken_in.as_millis() as u64,
            reused,
            encode_ms = encoded_in.as_millis() as u64,
            cpu_ms = cpu.map(|c| c.as_millis() as u64),
            write_ms = written_in.as_millis() as u64,
            "state snapshot taken; log compacted"
        );
        Ok(())
    }

    /// After log damage this node neither votes nor campaigns (it may have lost entries it had
    /// acknowledged, so its vote could help elect a leader missing committed entries) until it
    /// has applied everything a leader says is committed.
    fn check_caught_up(&mut self) {
        if let Some(c) = &self.catch_up
            && c.heard_leader
            && self.applied >= c.leader_commit.max(c.min_commit)
        {
            tracing::info!(
                node = self.id,
                applied = self.applied,
                "caught up with the leader after log damage; voting again"
            );
            self.catch_up = None;
        }
    }

    /// Leader side of the same story: a follower rejecting an append with a last index below
    /// what it acknowledged has lost entries. raft-rs would ignore the rejection as stale and
    /// keep believing the old match index; lower it so the entries are sent again.
    fn forget_lost_entries(&mut self, peer: u64, rejected: u64, peer_last: u64) {
        if self.raw.raft.state != StateRole::Leader {
            return;
        }
        let id = self.id;
        if let Some(pr) = self.raw.raft.mut_prs().get_mut(peer)
            && rejected >= pr.matched
            && peer_last < pr.matched
        {
            tracing::warn!(
                node = id,
                peer,
                matched = pr.matched,
                peer_last,
                "a follower lost log entries it had acknowledged; replicating them again"
            );
            pr.matched = peer_last;
        }
    }

    /// raft-rs waits for a snapshot transfer to be reported; when the transport cannot tell
    /// (a dropped message), give up after a while so raft sends a fresh one.
    fn watch_snapshot_transfers(&mut self) {
        if self.raw.raft.state != StateRole::Leader {
            return;
        }
        let sending: Vec<u64> = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(_, pr)| pr.state == ProgressState::Snapshot)
            .map(|(id, _)| *id)
            .collect();
        self.snapshot_waits.retain(|id, _| sending.contains(id));
        let limit = SNAPSHOT_WAIT_ELECTIONS * self.cfg.election_ticks as u64;
        for peer in sending {
            let waited = self.snapshot_waits.entry(peer).or_insert(0);
            *waited += 1;
            if *waited > limit {
                *waited = 0;
                tracing::warn!(
                    node = self.id,
                    peer,
                    "snapshot transfer unanswered; sending again"
                );
                self.raw.report_snapshot(peer, SnapshotStatus::Failure);
            }
        }
    }

    fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf().to_conf_state();
        let status = NodeStatus {
            id: self.id,
            role: raft.state.into(),
            leader_id: known(raft.leader_id),
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            first_index: raft.raft_log.first_index(),
            last_index: raft.raft_log.last_index(),
            snapshot_index: self.snapshot_index,
            voters: sorted(&conf.voters),
            learners: sorted(&conf.learners),
        };
        // Index-only changes wake no one (see `status`).
        self.status.send_if_modified(|current| {
            let wake = current.role_differs(&status);
            *current = status;
            wake
        });
    }
}

/// What a client asked to append.
enum Proposal {
    Command(Vec<u8>),
    ConfChange(ConfChangeV2),
}

/// Extra entries a member waits before its first routine snapshot from a point it may share
/// with the others (its start, as in a new group; a snapshot installed from the leader): the
/// i-th of n voters by id waits i/n of an interval. Members snapshot at the same index
/// otherwise, and a large state's snapshot costs each of them CPU at the same moment, the
/// leader's included; staggered, each meets the others while they are not taking one. Each
/// member then keeps its own phase (its next snapshot comes one interval after its last).
fn snapshot_stagger(id: u64, voters: &[u64], every: u64) -> u64 {
    if !voters.contains(&id) || voters.len() < 2 {
        return 0;
    }
    let rank = voters.iter().filter(|&&v| v < id).count() as u128;
    // In u128: `every` may be any configured threshold.
    let stagger = u128::from(every) * rank / voters.len() as u128;
    u64::try_from(stagger).unwrap_or(u64::MAX)
}

/// The first state of a new group: a snapshot at index 1, term 1, holding the initial voters
/// and an empty state machine. Every initial member writes the same one, and members added
/// later start from a leader's snapshot, so all replicas share one history from index 1.
fn bootstrap_snapshot(members: &[u64]) -> Snapshot {
    let mut snapshot = Snapshot {
        data: fsm_snapshot::encode_empty(1).into(),
        ..Default::default()
    };
    let meta = snapshot.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    meta.set_conf_state(ConfState {
        voters: members.to_vec(),
        ..Default::default()
    });
    snapshot
}

fn known(id: u64) -> Option<u64> {
    (id != raft::INVALID_ID).then_some(id)
}

fn sorted(ids: &[u64]) -> Vec<u64> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voters_stagger_their_first_snapshot_by_their_rank() {
        let three = [3, 1, 2];
        assert_eq!(snapshot_stagger(1, &three, 300), 0);
        assert_eq!(snapshot_stagger(2, &three, 300), 100);
        assert_eq!(snapshot_stagger(3, &three, 300), 200);
        let five = [2, 4, 6, 8, 10];
        assert_eq!(snapshot_stagger(6, &five, 1000), 400);
        assert_eq!(snapshot_stagger(10, &five, 1000), 800);
        assert_eq!(snapshot_stagger(7, &five, 1000), 0, "not a voter");
        assert_eq!(snapshot_stagger(1, &[1], 1000), 0, "alone");
        assert_eq!(snapshot_stagger(2, &[1, 2], u64::MAX), u64::MAX / 2);
        assert_eq!(snapshot_stagger(3, &three, u64::MAX), u64::MAX / 3 * 2);
    }

    #[test]
    fn a_free_space_reading_is_reused_only_when_young_and_far_from_the_reserve() {
        let reserve = 128 << 20;
        let plenty = Some(reserve + DISK_TRUSTED_MARGIN);
        let young = DISK_TRUSTED_FOR / 2;
        assert!(reading_trusted(young, plenty, reserve));
        assert!(
            !reading_trusted(DISK_TRUSTED_FOR, plenty, reserve),
            "too old"
        );
        assert!(
            !reading_trusted(young, Some(reserve + DISK_TRUSTED_MARGIN - 1), reserve),
            "close to the reserve: look every time"
        );
        assert!(!reading_trusted(young, None, reserve), "a failed lookup");
    }
}
