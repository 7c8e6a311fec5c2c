//! The node protocol (`tug.v1.Dispatcher`), served by every replica. Register, Heartbeat and
//! ReportStatus act on the leader (a follower forwards them): sessions and heartbeats live in the
//! leader's memory ([`Sessions`]); only transitions (a node registering, a node going down, task
//! status) become Raft commands. Assignments stream from the replica the agent asked.

mod assignments;
mod network;
mod router;
mod sessions;
mod usage;

pub use network::NetworkWatch;
pub use router::Router;
pub use sessions::Sessions;
pub use usage::{Reported, UsageBoard};

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tug_api::v1::dispatcher_client::DispatcherClient;
use tug_api::v1::dispatcher_server::Dispatcher;
use tug_api::v1::{
    AssignmentsMessage, AssignmentsRequest, HeartbeatRequest, HeartbeatResponse, NetworkMap,
    NetworkRequest, NodeState, RegisterRequest, RegisterResponse, ReportStatusRequest,
    ReportStatusResponse,
};

use crate::fsm::Command;
use crate::leader::{LeaderLink, Written};
use crate::raft::{NodeHandle, ProposeError};
use crate::scheduler::Constraint;
use crate::state::ClusterNetwork;

/// Assignment messages buffered per agent before the stream waits for it. Each may hold
/// hundreds of tasks, and there is a stream per node: a deep buffer costs gigabytes at 1,000
/// nodes with 1,000 tasks each. Changes wait in the router's queue instead (shared, cheap).
const STREAM_BUFFER: usize = 2;

/// The Dispatcher service of one replica.
#[derive(Debug, Clone)]
pub struct DispatcherApi {
    link: LeaderLink,
    handle: NodeHandle,
    router: Router,
    sessions: Sessions,
    usage: UsageBoard,
    heartbeat_period: Duration,
    network: ClusterNetwork,
    network_map: NetworkWatch,
    stopping: watch::Receiver<bool>,
}

impl DispatcherApi {
    pub fn new(
        link: LeaderLink,
        router: Router,
        sessions: Sessions,
        usage: UsageBoard,
        heartbeat_period: Duration,
        network: ClusterNetwork,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        let network_map = NetworkWatch::spawn(link.handle.clone(), stopping.clone());
        Self {
            handle: link.handle.clone(),
            link,
            router,
            sessions,
            usage,
            heartbeat_period,
            network,
            network_map,
            stopping,
        }
    }

    /// `Ok` when this replica leads; else where to forward.
    fn lead(&self) -> Result<(), ProposeError> {
        let status = self.handle.status();
        if status.is_leader() {
            Ok(())
        } else {
            Err(ProposeError::NotLeader {
                leader_id: status.leader_id,
            })
        }
    }

    fn period_ms(&self) -> u64 {
        self.heartbeat_period.as_millis() as u64
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn check_labels(labels: &std::collections::HashMap<String, String>) -> Result<(), Status> {
    for (k, v) in labels {
        // A label must be usable in a placement constraint.
        Constraint::parse(&format!("{k}=={v}"))
            .ok()
            .filter(|c| c.key == *k && c.value == *v)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "node label {k}={v} cannot be used in placement constraints"
                ))
            })?;
    }
    Ok(())
}

type AssignmentStream = Pin<Box<dyn Stream<Item = Result<AssignmentsMessage, Status>> + Send>>;
type NetworkMapStream = Pin<Box<dyn Stream<Item = Result<NetworkMap, Status>> + Send>>;

#[tonic::async_trait]
impl Dispatcher for DispatcherApi {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let Some(desc) = request.get_ref().node.clone() else {
            return Err(Status::invalid_argument(
                "a registration needs a node description",
            ));
        };
        if desc.name.is_empty() || desc.address.is_empty() {
            return Err(Status::invalid_argument(
                "a node registers with a name and the address of its agent API",
            ));
        }
        check_labels(&desc.labels)?;
        let op = || async {
            self.lead()?;
            let unchanged = self
                .handle
                .store()
                .read()
                .get_node(&desc.name)
                .is_some_and(|n| {
                    n.state() == NodeState::Ready
                        && n.description.as_ref() == Some(&desc)
                        && (!desc.container_network || !n.subnet.is_empty())
                });
            let revision = if unchanged {
                self.handle.store().read().revision()
            } else {
                let command = Command::RegisterNode {
                    node: desc.clone(),
                    now_ms: now_ms(),
                    network: (
                        self.network.cidr.to_string(),
                        u32::from(self.network.node_prefix),
                    ),
                };
                self.handle.propose(&command).await?.index
            };
            let (subnet, cluster_cidr) = {
                let store = self.handle.store().read();
                (
                    store
                        .get_node(&desc.name)
                        .map(|n| n.subnet.clone())
                        .unwrap_or_default(),
                    store
                        .cluster_network()
                        .map(|n| n.cidr.to_string())
                        .unwrap_or_default(),
                )
            };
            Ok(RegisterResponse {
                session_id: self.sessions.open(&desc.name),
                heartbeat_period_ms: self.period_ms(),
                revision,
                subnet,
                cluster_cidr,
            })
        };
        let forward = |channel: Channel, request| async move {
            DispatcherClient::new(channel).register(request).await
        };
        match self.link.run_or_forward(&request, op, forward).await? {
            Written::Here(response) => {
                tracing::info!(node = %desc.name, address = %desc.address, "node registered");
                Ok(Response::new(response))
            }
            Written::Forwarded(response) => Ok(response),
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.get_ref();
        // No store read here: a heartbeat must never wait behind the store's lock (a long
        // reconcile pass holds it for reading while an apply queues for writing), or a busy
        // leader would declare live nodes down. A node marked down has its session closed by
        // the liveness check (before and after the change), so it registers again.
        let op = || async {
            self.lead()?;
            Ok(self.sessions.touch(&req.node, &req.session_id))
        };
        let forward = |channel: Channel, request| async move {
            DispatcherClient::new(channel).heartbeat(request).await
        };
        match self.link.run_or_forward(&request, op, forward).await? {
            Written::Here(true) => Ok(Response::new(HeartbeatResponse {
                heartbeat_period_ms: self.period_ms(),
            })),
            Written::Here(false) => Err(Status::not_found(format!(
                "node {} has no session with this leader: register again",
                req.node
            ))),
            Written::Forwarded(response) => Ok(response),
        }
    }

    type AssignmentsStream = AssignmentStream;

    async fn assignments(
        &self,
        request: Request<AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let req = request.into_inner();
        if req.node.is_empty() {
            return Err(Status::invalid_argument("a node name is required"));
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let handle = self.handle.clone();
        let router = self.router.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let stream =
                assignments::stream(handle, router, req.node, req.after_revision, tx.clone());
            let result = tokio::select! {
                result = stream => result,
                _ = async { stopping.wait_for(|s| *s).await.is_ok() } => {
                    Err(Status::unavailable("this controller is shutting down"))
                }
            };
            if let Err(err) = result {
                let _ = tx.send(Err(err)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_status(
        &self,
        request: Request<ReportStatusRequest>,
    ) -> Result<Response<ReportStatusResponse>, Status> {
        let req = request.get_ref();
        let op = || async {
            self.lead()?;
            if !self.sessions.is_current(&req.node, &req.session_id) {
                return Ok(None);
            }
            if req.has_usage {
                self.usage.record(&req.node, req.usage.clone(), now_ms());
            }
            if req.updates.is_empty() {
                // Usage only: nothing to commit.
                return Ok(Some(self.handle.store().read().revision()));
            }
            let command = Command::ReportStatus {
                node: req.node.clone(),
                updates: req.updates.clone(),
            };
            Ok(Some(self.handle.propose(&command).await?.index))
        };
        let forward = |channel: Channel, request| async move {
            DispatcherClient::new(channel).report_status(request).await
        };
        match self.link.run_or_forward(&request, op, forward).await? {
            Written::Here(Some(revision)) => Ok(Response::new(ReportStatusResponse { revision })),
            Written::Here(None) => Err(Status::not_found(format!(
                "node {} has no session with this leader: register again",
                req.node
            ))),
            Written::Forwarded(response) => Ok(response),
        }
    }

    type NetworkStream = NetworkMapStream;

    async fn network(
        &self,
        request: Request<NetworkRequest>,
    ) -> Result<Response<Self::NetworkStream>, Status> {
        let mut maps = self.network_map.subscribe();
        let mut stopping = self.stopping.clone();
        let node = request.into_inner().node;
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                let map = NetworkMap::clone(&maps.borrow_and_update());
                if tx.send(Ok(map)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = maps.changed() => if changed.is_err() {
                        let _ = tx.send(Err(Status::unavailable("this controller is shutting down"))).await;
                        return;
                    },
                    _ = async { stopping.wait_for(|s| *s).await.is_ok() } => {
                        let _ = tx.send(Err(Status::unavailable("this controller is shutting down"))).await;
                        return;
                    }
                    () = tx.closed() => {
                        tracing::debug!(node, "network stream closed");
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
