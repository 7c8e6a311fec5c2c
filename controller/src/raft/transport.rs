//! How Raft messages travel between controllers.
//!
//! Outgoing: the node hands every batch of messages to a [`Transport`], fire and forget (raft
//! retries whatever is lost). Incoming: whatever receives messages for a node (the gRPC server,
//! or the in-memory test network) delivers them into its [`Mailbox`]. A transport that learns a
//! peer is unreachable or a snapshot failed should tell the node through
//! [`crate::raft::NodeHandle::report_unreachable`] / `report_snapshot`; the node also gives up on
//! a snapshot that gets no answer in time, so a transport that cannot tell still works.

use raft::eraftpb::Message;
use tokio::sync::mpsc;

/// Sends Raft messages to peers. Must not block: queue, or drop what cannot be sent.
pub trait Transport: Send + Sync {
    fn send(&self, msgs: Vec<Message>);

    /// A membership change that names `id`'s address was applied: reach it at `addr` from now
    /// on (replacing any older address). Transports that route by id alone ignore it.
    fn add_peer(&self, _id: u64, _addr: &str) {}

    /// `id` was removed from the group: stop sending to it.
    fn remove_peer(&self, _id: u64) {}
}

/// The inbox of one node.
#[derive(Debug, Clone)]
pub struct Mailbox {
    node_id: u64,
    tx: mpsc::Sender<Message>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    #[error("node {0}'s inbox is full; message dropped")]
    Full(u64),
    #[error("node {0} has stopped")]
    Stopped(u64),
}

impl Mailbox {
    pub(crate) fn new(node_id: u64, tx: mpsc::Sender<Message>) -> Self {
        Self { node_id, tx }
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Hands a message to the node without waiting; a full inbox drops it (raft recovers).
    pub fn deliver(&self, msg: Message) -> Result<(), DeliverError> {
        self.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DeliverError::Full(self.node_id),
            mpsc::error::TrySendError::Closed(_) => DeliverError::Stopped(self.node_id),
        })
    }
}
