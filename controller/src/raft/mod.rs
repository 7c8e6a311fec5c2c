//! The Raft side of the controller: durable storage, the node that drives raft-rs's `RawNode`,
//! and the transport seam peers talk through.
//!
//! The API server holds a [`NodeHandle`]: it proposes [`crate::fsm::Command`]s (on the leader;
//! [`ProposeError::NotLeader`] says where to forward), reads the [`crate::state::Store`] after
//! [`NodeHandle::read_index`] (or directly for stale reads), watches it, changes membership,
//! and reports [`NodeStatus`]. The gRPC peer transport implements [`Transport`] and delivers
//! incoming messages to the node's [`Mailbox`].

mod config;
pub mod grpc_transport;
mod handle;
mod log_sync;
mod logger;
mod node;
mod proposals;
mod status;
pub mod storage;
#[cfg(test)]
mod sync_gate;
#[cfg(test)]
mod tests;
pub mod transport;

pub use config::NodeConfig;
pub use grpc_transport::{GrpcTransport, PeerAddresses, RaftService, Reachability};
pub use handle::{Applied, Membership, NodeHandle, ProposeError, ReadConsistency, ReadError};
pub use node::{Node, NodeError, spawn};
pub use status::{NodeStatus, Role};
pub use transport::{DeliverError, Mailbox, Transport};
