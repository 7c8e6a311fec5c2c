//! [`NodeHandle`]: what the API server (and tests) use to talk to a running node: propose
//! commands and membership changes, read linearizably or stale, watch, and feed peer messages.

use std::time::Duration;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout_at};

use super::status::NodeStatus;
use super::transport::Mailbox;
use crate::fsm::{Command, CommandResult};
use crate::state::{SharedStore, Store, StoreError, WatchError, Watcher};

/// A command that was committed and applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Its log index: the revision of every object it changed.
    pub index: u64,
    pub result: CommandResult,
}

/// The voters and learners after a membership change, applied at `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

fn leader_text(leader_id: &Option<u64>) -> String {
    match leader_id {
        Some(id) => format!("the leader is node {id}"),
        None => "no leader is known right now".into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// Writes go to the leader; forward there (or retry when one is elected).
    #[error("this controller is not the Raft leader; {}", leader_text(.leader_id))]
    NotLeader { leader_id: Option<u64> },
    #[error(
        "no leader was elected within {timeout:?}: a majority of the controllers is not \
         reachable (no quorum); nothing was written"
    )]
    NoLeader { timeout: Duration },
    #[error(
        "the write was not committed within {timeout:?}: a majority of the controllers is not \
         reachable (no quorum); it may still be applied if the leader regains its quorum"
    )]
    Timeout { timeout: Duration },
    #[error(
        "leadership was lost before the write was applied ({}); it may or may not have been \
         committed",
        leader_text(.leader_id)
    )]
    LeadershipLost { leader_id: Option<u64> },
    #[error(
        "the write at log index {index} was superseded (a new leader replaced it or raft refused it); it was not applied"
    )]
    Dropped { index: u64 },
    #[error("raft refused the proposal: {0}")]
    Refused(String),
    #[error("the command was rejected: {0}")]
    Rejected(StoreError),
    #[error("the membership change failed: {0}")]
    MembershipChange(String),
    #[error(
        "the controller's disk is full: {free_mib} MiB free on {path}, below the {reserve_mib} MiB \
         kept for the Raft log and snapshots; nothing was written (free space there, then retry)"
    )]
    DiskFull {
        path: String,
        free_mib: u64,
        reserve_mib: u64,
    },
    #[error("the controller's Raft node has stopped")]
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error(
        "cannot confirm the latest commit index within {timeout:?}: a majority of the \
         controllers is not reachable (no quorum); use a stale read to read this replica anyway"
    )]
    Timeout { timeout: Duration },
    #[error("the controller's Raft node has stopped")]
    Stopped,
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Sees every write acknowledged before the read started (ReadIndex).
    #[default]
    Linearizable,
    /// This replica's state as it is, possibly behind the leader.
    Stale,
}

/// Where a proposal's outcome goes.
pub(crate) type ProposeReply = oneshot::Sender<Result<Applied, ProposeError>>;

/// Requests from handles to the node task.
#[derive(Debug)]
pub(crate) enum Request {
    Propose {
        data: Vec<u8>,
        reply: ProposeReply,
        /// May wait a moment for a foreground proposal to share its log write with.
        background: bool,
    },
    ChangeMembership {
        change: ConfChangeV2,
        reply: oneshot::Sender<Result<Membership, ProposeError>>,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<u64, ReadError>>,
    },
    ReportUnreachable {
        peer: u64,
    },
    ReportSnapshot {
        peer: u64,
        delivered: bool,
    },
    TransferLeadership {
        to: u64,
    },
}

/// A cheap, cloneable handle on a running node.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    id: u64,
    requests: mpsc::Sender<Request>,
    mailbox: Mailbox,
    status: watch::Receiver<NodeStatus>,
    store: SharedStore,
    proposal_timeout: Duration,
    read_timeout: Duration,
    metrics: crate::metrics::RaftMetrics,
}

impl NodeHandle {
    pub(crate) fn new(
        id: u64,
        requests: mpsc::Sender<Request>,
        mailbox: Mailbox,
        status: watch::Receiver<NodeStatus>,
        store: SharedStore,
        proposal_timeout: Duration,
        read_timeout: Duration,
    ) -> Self {
        Self {
            id,
            requests,
            mailbox,
            status,
            store,
            proposal_timeout,
            read_timeout,
            metrics: crate::metrics::RaftMetrics::default(),
        }
    }

    /// Record proposal latency into `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: crate::metrics::RaftMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Role, leader, term, indices and membership as of the node's last Ready cycle.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// Status updates: woken on a change of role, leader, term or membership (the indices
    /// read are current, but their changes alone do not wake).
    pub fn status_updates(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// Where a transport delivers this node's incoming peer messages.
    pub fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    /// This replica's store, for stale reads (or after [`Self::read_index`]).
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Proposes a command and waits until it is applied here. Must be called on the leader
    /// (otherwise [`ProposeError::NotLeader`] says where to forward it); when no leader is known
    /// it waits for one. Fails after the proposal timeout rather than hanging.
    pub async fn propose(&self, command: &Command) -> Result<Applied, ProposeError> {
        self.propose_with(command, false).await
    }

    /// As [`Self::propose`], for work no client waits on (the reconciler's plans): the leader
    /// holds it until a client's proposal comes, for up to its
    /// [`background_hold`](super::NodeConfig::background_hold), and puts it into the log right
    /// after that one, with one write, one append to each follower and one sync for both.
    pub async fn propose_background(&self, command: &Command) -> Result<Applied, ProposeError> {
        self.propose_with(command, true).await
    }

    async fn propose_with(
        &self,
        command: &Command,
        background: bool,
    ) -> Result<Applied, ProposeError> {
        let started = Instant::now();
        let deadline = started + self.proposal_timeout;
        // Encoded again only for a retry: the first attempt takes it without a copy.
        let mut encoded = Some(command.encode());
        loop {
            self.ensure_leader(deadline).await?;
            let (reply, rx) = oneshot::channel();
            let request = Request::Propose {
                data: encoded.take().unwrap_or_else(|| command.encode()),
                reply,
                background,
            };
            self.request(request, deadline).await?;
            match self.await_reply(rx, deadline).await {
                // Leadership moved between our look at the status and the node's: wait for
                // the next leader (or the deadline), like a proposal made a moment later.
                Err(ProposeError::NotLeader { leader_id: None }) => continue,
                result => {
                    if result.is_ok() {
                        self.metrics
                            .observe_proposal(started.elapsed().as_secs_f64());
                    }
                    return result;
                }
            }
        }
    }

    /// Adds `id` as a voter. It should start with an empty data dir and no initial members;
    /// it catches up from the leader (by snapshot once the log is compacted).
    pub async fn add_voter(&self, id: u64) -> Result<Membership, ProposeError> {
        self.change_membership(ConfChangeType::AddNode, id, Vec::new())
            .await
    }

    /// Adds `id` as a voter reachable at `address` (`host:port`). The address travels in the
    /// conf change, so every replica's transport learns it when it applies the change.
    pub async fn add_voter_at(&self, id: u64, address: &str) -> Result<Membership, ProposeError> {
        self.change_membership(ConfChangeType::AddNode, id, address.as_bytes().to_vec())
            .await
    }

    /// Removes `id` from the group.
    pub async fn remove_voter(&self, id: u64) -> Result<Membership, ProposeError> {
        self.change_membership(ConfChangeType::RemoveNode, id, Vec::new())
            .await
    }

    async fn change_membership(
        &self,
        change_type: ConfChangeType,
        id: u64,
        context: Vec<u8>,
    ) -> Result<Membership, ProposeError> {
        let deadline = Instant::now() + self.proposal_timeout;
        self.ensure_leader(deadline).await?;
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = id;
        let mut change = ConfChangeV2::default();
        change.mut_changes().push(single);
        change.context = context.into();
        let (reply, rx) = oneshot::channel();
        self.request(Request::ChangeMembership { change, reply }, deadline)
            .await?;
        self.await_reply(rx, deadline).await
    }

    /// Confirms with the leader (ReadIndex) the commit index as of now and waits until this
    /// replica has applied it; a read of [`Self::store`] afterwards is linearizable. Works on
    /// followers too. Returns the confirmed index.
    pub async fn read_index(&self) -> Result<u64, ReadError> {
        let deadline = Instant::now() + self.read_timeout;
        let timeout = ReadError::Timeout {
            timeout: self.read_timeout,
        };
        let (reply, rx) = oneshot::channel();
        match timeout_at(deadline, self.requests.send(Request::ReadIndex { reply })).await {
            Err(_) => return Err(timeout),
            Ok(Err(_)) => return Err(ReadError::Stopped),
            Ok(Ok(())) => {}
        }
        match timeout_at(deadline, rx).await {
            Err(_) => Err(timeout),
            Ok(Err(_)) => Err(ReadError::Stopped),
            Ok(Ok(result)) => result,
        }
    }

    /// Runs `f` on the store, after a ReadIndex round if `consistency` asks for it.
    pub async fn read<R>(
        &self,
        consistency: ReadConsistency,
        f: impl FnOnce(&Store) -> R,
    ) -> Result<R, ReadError> {
        if consistency == ReadConsistency::Linearizable {
            self.read_index().await?;
        }
        Ok(f(&self.store.read()))
    }

    /// Changes to this replica's state from `from_revision` on (0: from now).
    pub fn watch(&self, from_revision: u64) -> Result<Watcher, WatchError> {
        self.store.read().watch(from_revision)
    }

    /// A transport could not reach `peer`.
    pub fn report_unreachable(&self, peer: u64) {
        let _ = self.requests.try_send(Request::ReportUnreachable { peer });
    }

    /// A snapshot sent to `peer` was delivered (or not).
    pub fn report_snapshot(&self, peer: u64, delivered: bool) {
        let _ = self
            .requests
            .try_send(Request::ReportSnapshot { peer, delivered });
    }

    /// Asks the leader (this node) to hand leadership to `to`.
    pub async fn transfer_leadership(&self, to: u64) -> Result<(), ProposeError> {
        let deadline = Instant::now() + self.proposal_timeout;
        self.request(Request::TransferLeadership { to }, deadline)
            .await
    }

    async fn ensure_leader(&self, deadline: Instant) -> Result<(), ProposeError> {
        let mut status = self.status.clone();
        loop {
            match status.borrow_and_update().leader_id {
                Some(id) if id == self.id => return Ok(()),
                Some(id) => {
                    return Err(ProposeError::NotLeader {
                        leader_id: Some(id),
                    });
                }
                None => {}
            }
            match timeout_at(deadline, status.changed()).await {
                Err(_) => {
                    return Err(ProposeError::NoLeader {
                        timeout: self.proposal_timeout,
                    });
                }
                Ok(Err(_)) => return Err(ProposeError::Stopped),
                Ok(Ok(())) => {}
            }
        }
    }

    async fn request(&self, request: Request, deadline: Instant) -> Result<(), ProposeError> {
        match timeout_at(deadline, self.requests.send(request)).await {
            Err(_) => Err(ProposeError::Timeout {
                timeout: self.proposal_timeout,
            }),
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Ok(Ok(())) => Ok(()),
        }
    }

    async fn await_reply<T>(
        &self,
        rx: oneshot::Receiver<Result<T, ProposeError>>,
        deadline: Instant,
    ) -> Result<T, ProposeError> {
        match timeout_at(deadline, rx).await {
            Err(_) => Err(ProposeError::Timeout {
                timeout: self.proposal_timeout,
            }),
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Ok(Ok(result)) => result,
        }
    }
}
