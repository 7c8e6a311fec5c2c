//! Where a write goes: proposed here when this replica leads, else forwarded to the leader (its
//! address comes from the peers map) and the leader's answer returned. Shared by the operator's
//! API and the agents' dispatcher. Reads are linearizable (ReadIndex) unless asked to be stale.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tug_api::v1::ReadOptions;

use crate::fsm::Command;
use crate::raft::{
    Applied, NodeHandle, PeerAddresses, ProposeError, Reachability, ReadConsistency, ReadError,
};
use crate::state::{Store, StoreError};

/// Metadata key set on a request one controller forwards to another, so it is never forwarded
/// twice (a stale leader hint must not bounce a request around).
const FORWARDED: &str = "tug-forwarded";

/// How long a write keeps trying to reach a leader that cannot be reached, and the pause
/// between tries when no other leader shows up.
const FORWARD_RETRY: Duration = Duration::from_secs(5);
const FORWARD_PAUSE: Duration = Duration::from_millis(200);

/// This replica's way to the leader.
#[derive(Debug, Clone)]
pub struct LeaderLink {
    pub(crate) handle: NodeHandle,
    pub(crate) peers: PeerAddresses,
    reachability: Reachability,
    channels: Arc<Mutex<HashMap<u64, Channel>>>,
}

enum Write<T> {
    Done(T),
    Forward(Channel, u64),
}

/// A write applied here, or the leader's answer to it.
pub(crate) enum Written<T, R> {
    Here(T),
    Forwarded(Response<R>),
}

impl LeaderLink {
    pub fn new(handle: NodeHandle, peers: PeerAddresses, reachability: Reachability) -> Self {
        Self {
            handle,
            peers,
            reachability,
            channels: Arc::default(),
        }
    }

    pub(crate) fn no_leader(&self) -> Status {
        let status = self.handle.status();
        let size = status.voters.len().max(self.peers.len()).max(1);
        let reachable = 1 + self.reachability.reachable_peers();
        Status::unavailable(format!(
            "no leader elected yet (cluster of {size}, {reachable} reachable); nothing was written"
        ))
    }

    /// A channel to the leader `id`, cached.
    pub(crate) fn leader_channel(&self, id: u64) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(&id) {
            return Ok(channel.clone());
        }
        let addr = self.peers.get(id).ok_or_else(|| {
            Status::unavailable(format!(
                "the leader is node {id}, but this controller does not know its address"
            ))
        })?;
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|err| {
                Status::internal(format!("node {id}'s address {addr} is not valid: {err}"))
            })?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(id, channel.clone());
        Ok(channel)
    }

    /// Runs the write `op` here (on the leader), or says where to forward it.
    async fn write<Req, T, Fut>(
        &self,
        request: &Request<Req>,
        op: impl FnOnce() -> Fut,
    ) -> Result<Write<T>, Status>
    where
        Fut: Future<Output = Result<T, ProposeError>>,
    {
        match op().await {
            Ok(applied) => Ok(Write::Done(applied)),
            Err(ProposeError::NotLeader {
                leader_id: Some(id),
            }) => {
                if request.metadata().contains_key(FORWARDED) {
                    return Err(Status::unavailable(format!(
                        "this controller is not the leader either (it thinks node {id} is); \
                         leadership is changing, retry"
                    )));
                }
                Ok(Write::Forward(self.leader_channel(id)?, id))
            }
            Err(err) => Err(self.propose_status(err)),
        }
    }

    /// Proposes `command` here when this replica leads, or forwards the request to the leader
    /// with `forward`.
    pub(crate) async fn write_or_forward<Req, Resp, F, Fut>(
        &self,
        request: &Request<Req>,
        command: &Command,
        forward: F,
    ) -> Result<Written<Applied, Resp>, Status>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.run_or_forward(request, || self.handle.propose(command), forward)
            .await
    }

    /// Runs the write `op` here when this replica leads, or forwards the request to the leader
    /// with `forward`. A leader that cannot be reached (it may just have died) is retried, as
    /// soon as another leader is known or after a short pause, for [`FORWARD_RETRY`].
    pub(crate) async fn run_or_forward<Req, Resp, T, Op, OpFut, F, Fut>(
        &self,
        request: &Request<Req>,
        op: Op,
        forward: F,
    ) -> Result<Written<T, Resp>, Status>
    where
        Req: Clone,
        Op: Fn() -> OpFut,
        OpFut: Future<Output = Result<T, ProposeError>>,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let deadline = Instant::now() + FORWARD_RETRY;
        loop {
            let (client, leader) = match self.write(request, &op).await? {
                Write::Done(applied) => return Ok(Written::Here(applied)),
                Write::Forward(client, leader) => (client, leader),
            };
            match forward(client, forwarded(request.get_ref().clone())).await {
                Ok(response) => return Ok(Written::Forwarded(response)),
                Err(status)
                    if status.code() == tonic::Code::Unavailable && Instant::now() < deadline =>
                {
                    tracing::debug!(leader, ?status, "forwarding to the leader failed; retrying");
                    let mut updates = self.handle.status_updates();
                    let _ = tokio::time::timeout(FORWARD_PAUSE, async move {
                        updates
                            .wait_for(|s| s.leader_id != Some(leader))
                            .await
                            .is_ok()
                    })
                    .await;
                }
                Err(status) => return Err(forward_error(status)),
            }
        }
    }

    pub(crate) fn propose_status(&self, err: ProposeError) -> Status {
        match err {
            ProposeError::NotLeader { leader_id: None } | ProposeError::NoLeader { .. } => {
                self.no_leader()
            }
            ProposeError::NotLeader { .. }
            | ProposeError::LeadershipLost { .. }
            | ProposeError::Refused(_)
            | ProposeError::Stopped => Status::unavailable(err.to_string()),
            ProposeError::Timeout { .. } => Status::deadline_exceeded(err.to_string()),
            ProposeError::Dropped { .. } => Status::aborted(err.to_string()),
            ProposeError::Rejected(StoreError::NodeNotDown(..)) => {
                Status::failed_precondition(err.to_string())
            }
            ProposeError::DiskFull { .. } => Status::resource_exhausted(err.to_string()),
            ProposeError::Rejected(StoreError::SubnetsExhausted { .. }) => {
                Status::resource_exhausted(err.to_string())
            }
            ProposeError::Rejected(_) => Status::invalid_argument(err.to_string()),
            ProposeError::MembershipChange(_) => Status::failed_precondition(err.to_string()),
        }
    }

    pub(crate) async fn read<R>(
        &self,
        options: Option<&ReadOptions>,
        f: impl FnOnce(&Store) -> R,
    ) -> Result<R, Status> {
        let consistency = if options.is_some_and(|o| o.stale) {
            ReadConsistency::Stale
        } else {
            ReadConsistency::Linearizable
        };
        self.handle
            .read(consistency, f)
            .await
            .map_err(|err| match err {
                ReadError::Timeout { .. } | ReadError::Stopped => {
                    Status::unavailable(err.to_string())
                }
            })
    }
}

pub(crate) fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    request
}

pub(crate) fn forward_error(status: Status) -> Status {
    if status.code() == tonic::Code::Unavailable && status.message().contains("transport") {
        Status::unavailable(format!(
            "this controller is not the leader and cannot reach the leader: {}",
            status.message()
        ))
    } else {
        status
    }
}
