//! A controller node's Raft settings.

use std::path::PathBuf;
use std::time::Duration;

/// Everything a [`crate::raft::Node`] needs besides its transport.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id in the Raft group; non-zero and unique.
    pub id: u64,
    /// Raft state lives in `<data_dir>/raft`.
    pub data_dir: PathBuf,
    /// The voters of a new cluster. When the data dir holds no Raft state yet, a non-empty list
    /// bootstraps the cluster with it (every initial member must be given the same list); an
    /// empty list starts a node that waits to be added to an existing cluster and catches up
    /// from its leader. Ignored once the data dir is initialized.
    pub initial_members: Vec<u64>,
    /// One Raft tick.
    pub tick_interval: Duration,
    /// Ticks without a leader before a follower campaigns (randomized up to twice this).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Take a snapshot of the state machine every this many applied entries (etcd's
    /// `--snapshot-count` default), or every as many entries as the last snapshot held
    /// objects if that is more: a snapshot costs time in proportion to the state, so the log
    /// may grow as large as the state (in entries) before the next, which keeps the cost per
    /// write flat however large the state grows (Redis rewrites its append-only file on the
    /// same rule, at 100% growth). A member's first after it starts or installs the leader's
    /// snapshot comes later by its rank among the voters, i/n of an interval, so the members
    /// do not all take one at the same index...
    pub snapshot_threshold: u64,
    /// ...or once the entries applied since the last one hold this many bytes, whichever comes
    /// first: the log is kept in memory until a snapshot compacts it, so this bounds it (plus
    /// the `snapshot_catch_up_entries` kept, however large they are).
    pub snapshot_threshold_bytes: u64,
    /// Entries kept behind a snapshot so slightly lagging followers catch up from the log
    /// instead of a snapshot; 0 compacts everything the snapshot covers.
    pub snapshot_catch_up_entries: u64,
    /// A write that is not applied within this time fails (no quorum, or no leader).
    pub proposal_timeout: Duration,
    /// A linearizable read that cannot confirm the commit index within this time fails.
    pub read_timeout: Duration,
    /// Most client requests folded into one Ready cycle.
    pub max_batch: usize,
    /// How long a leader holds a background proposal (the reconciler's plans, see
    /// `NodeHandle::propose_background`) for a client's proposal to go into the log with: both
    /// then take one log write, one append to each follower and one sync, instead of a sync of
    /// their own that a client's write arriving meanwhile would queue behind. Short against the
    /// reconciler's 10 ms of gathering changes, and longer than the gap between two writes of a
    /// busy client. Zero proposes at once.
    pub background_hold: Duration,
    /// Raft's limit on one append message.
    pub max_size_per_msg: u64,
    /// Raft's limit on append messages in flight per follower.
    pub max_inflight_msgs: usize,
    /// Log segment file size before rotation.
    pub segment_bytes: u64,
    /// Free space the data dir's filesystem must keep: below it, the leader refuses new writes
    /// (a clean "disk full" error) instead of failing to persist an entry it already accepted.
    pub disk_reserve_bytes: u64,
    /// Changes kept in memory for watches.
    pub watch_history: usize,
    /// Peer messages queued for the node before new ones are dropped.
    pub mailbox_capacity: usize,
    /// Histograms the node records proposal latency and snapshot duration into.
    pub metrics: crate::metrics::RaftMetrics,
}

impl NodeConfig {
    /// Production defaults: 100 ms ticks, 1 s election timeout, snapshots every 10 000 entries.
    pub fn new(id: u64, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            id,
            data_dir: data_dir.into(),
            initial_members: Vec::new(),
            tick_interval: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_threshold: 100_000,
            snapshot_threshold_bytes: 256 << 20,
            snapshot_catch_up_entries: 5_000,
            proposal_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            max_batch: 4096,
            background_hold: Duration::from_millis(2),
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            segment_bytes: 64 << 20,
            disk_reserve_bytes: 128 << 20,
            watch_history: 10_000,
            mailbox_capacity: 4096,
            metrics: crate::metrics::RaftMetrics::default(),
        }
    }

    /// Entries between routine snapshots once the last one held `objects` objects (see
    /// [`NodeConfig::snapshot_threshold`]).
    pub(crate) fn snapshot_interval(&self, objects: u64) -> u64 {
        self.snapshot_threshold.max(objects)
    }

    /// Checks what raft-rs does not check itself.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("node id must not be 0".into());
        }
        if !self.initial_members.is_empty() && !self.initial_members.contains(&self.id) {
            return Err(format!(
                "initial members {:?} do not include this node ({})",
                self.initial_members, self.id
            ));
        }
        if self.initial_members.contains(&0) {
            return Err("initial members must not include id 0".into());
        }
        if self.tick_interval.is_zero() {
            return Err("tick interval must be positive".into());
        }
        if self.snapshot_threshold == 0 || self.snapshot_threshold_bytes == 0 {
            return Err("snapshot threshold must be positive".into());
        }
        if self.max_batch == 0 || self.mailbox_capacity == 0 {
            return Err("batch size and mailbox capacity must be positive".into());
        }
        Ok(())
    }

    pub(crate) fn raft_config(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            applied,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            // A leader cut off from a majority steps down after an election timeout, so its
            // pending writes fail instead of waiting forever; pre-vote keeps a rejoining
            // partitioned node from disrupting a healthy leader with a higher term.
            check_quorum: true,
            pre_vote: true,
            // A new commit index reaches the followers with the next append (or heartbeat),
            // not in an empty append of its own: that halved the messages and follower cycles
            // of every write. The node sends one itself when no append follows soon (see
            // `Node::notify_commit`), so followers never lag long.
            skip_bcast_commit: true,
            // The proposals of one cycle go to each follower as one append message, not one
            // message each.
            batch_append: true,
            ..raft::Config::default()
        }
    }
}
