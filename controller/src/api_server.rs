//! The operator's API (`tug.v1.Control`), served by every replica.
//!
//! Writes are proposed to the local node; when it is not the leader the request is forwarded to
//! the leader (its address comes from the peers map) and the leader's answer is returned. Reads
//! are linearizable (ReadIndex, on any replica) unless the request asks for a stale read.
//! Membership changes (AddMember, RemoveMember) travel the same way to the leader, which
//! proposes a Raft conf change carrying the new member's address; a leader asked to remove
//! itself hands leadership over first and lets the new leader do it. Every error becomes a
//! [`Status`] with one clear sentence.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tug_api::v1::control_client::ControlClient;
use tug_api::v1::control_server::Control;
use tug_api::v1::{
    self, AddMemberRequest, ApplyRequest, ApplyResponse, ApplyResult, ClusterStatusRequest,
    ClusterStatusResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse,
    ListNodesRequest, ListNodesResponse, ListRequest, ListResponse, ListTasksRequest,
    ListTasksResponse, Member, MemberResponse, RemoveMemberRequest, RemoveNodeRequest,
    RemoveNodeResponse, RolloutUndoRequest, ScaleRequest, SetNodeAvailabilityRequest,
    SetNodeAvailabilityResponse, TaskUsageInfo, TopRequest, TopResponse, WatchRequest,
    apply_result, watch_event,
};

use crate::dispatcher::{UsageBoard, now_ms};
use crate::fsm::{Command, CommandResult};
use crate::leader::{LeaderLink, Written, forward_error, forwarded};
use crate::raft::{Applied, Membership, NodeHandle, NodeStatus, ProposeError};
use crate::state::{ApplyOutcome, EventKind, WatchError, normalize_namespace};
use crate::views;

/// How long a leader that is being removed waits for one voter to take leadership over.
const TRANSFER_WAIT: Duration = Duration::from_secs(3);

/// Watch events buffered per client before the stream waits for it.
const WATCH_BUFFER: usize = 256;

/// Usage reports older than this are not shown by `tug top` (the node stopped reporting).
const USAGE_FRESH_MS: u64 = 30_000;

/// The Control service of one replica.
#[derive(Debug, Clone)]
pub struct ControlApi {
    link: LeaderLink,
    handle: NodeHandle,
    stopping: watch::Receiver<bool>,
    usage: UsageBoard,
}

impl ControlApi {
    /// `peers`: every replica's id and `host:port`, this one included (the transport keeps it
    /// current as members change). `stopping` turning true (or its sender going away) ends
    /// every open watch.
    pub fn new(link: LeaderLink, stopping: watch::Receiver<bool>) -> Self {
        Self {
            handle: link.handle.clone(),
            link,
            stopping,
            usage: UsageBoard::default(),
        }
    }

    /// Answer `Top` from `usage` (the board the dispatcher records agents' reports on).
    pub fn with_usage(mut self, usage: UsageBoard) -> Self {
        self.usage = usage;
        self
    }

    /// The fresh usage reports, with each task's service (tasks no longer stored are left out).
    fn top_here(&self) -> Result<TopResponse, ProposeError> {
        let status = self.handle.status();
        if !status.is_leader() {
            return Err(ProposeError::NotLeader {
                leader_id: status.leader_id,
            });
        }
        let reported = self.usage.all(now_ms().saturating_sub(USAGE_FRESH_MS));
        let store = self.handle.store().read();
        let tasks = reported
            .into_iter()
            .filter_map(|r| {
                let task = store.get_task(&r.usage.task_id)?;
                Some(TaskUsageInfo {
                    task_id: r.usage.task_id,
                    namespace: task.namespace.clone(),
                    service: task.service.clone(),
                    node: r.node,
                    cpu_millis: r.usage.cpu_millis,
                    memory_bytes: r.usage.memory_bytes,
                    reported_ms: r.reported_ms,
                })
            })
            .collect();
        Ok(TopResponse { tasks })
    }

    /// The members of `membership` with their addresses and roles.
    fn members(&self, voters: &[u64], learners: &[u64], leader_id: Option<u64>) -> Vec<Member> {
        let mut ids: Vec<(u64, bool)> = voters.iter().map(|id| (*id, true)).collect();
        ids.extend(learners.iter().map(|id| (*id, false)));
        ids.sort_unstable();
        ids.into_iter()
            .map(|(id, voter)| Member {
                id,
                address: self.link.peers.get(id).unwrap_or_default(),
                is_leader: leader_id == Some(id),
                voter,
            })
            .collect()
    }

    fn member_response(&self, membership: &Membership) -> MemberResponse {
        let leader_id = self.handle.status().leader_id;
        MemberResponse {
            members: self.members(&membership.voters, &membership.learners, leader_id),
            revision: membership.index,
        }
    }

    /// This replica leads and is to be removed: hands leadership to another voter (trying each
    /// in turn) and returns the new leader's id.
    async fn hand_over_leadership(&self) -> Result<u64, Status> {
        let me = self.handle.id();
        let candidates: Vec<u64> = self
            .handle
            .status()
            .voters
            .into_iter()
            .filter(|id| *id != me)
            .collect();
        if candidates.is_empty() {
            return Err(Status::failed_precondition(format!(
                "node {me} is the only voter; a cluster cannot remove its last member"
            )));
        }
        let moved = |s: &NodeStatus| s.leader_id.is_some_and(|l| l != me);
        for to in candidates {
            tracing::info!(
                node = me,
                to,
                "handing leadership over before leaving the group"
            );
            self.handle
                .transfer_leadership(to)
                .await
                .map_err(|err| self.link.propose_status(err))?;
            let mut updates = self.handle.status_updates();
            let waited = tokio::time::timeout(TRANSFER_WAIT, async move {
                updates.wait_for(moved).await.map(|s| s.leader_id).ok()
            })
            .await;
            if let Ok(Some(Some(leader))) = waited {
                return Ok(leader);
            }
            if let Some(leader) = self.handle.status().leader_id.filter(|l| *l != me) {
                return Ok(leader);
            }
        }
        Err(Status::unavailable(format!(
            "node {me} leads and could not hand leadership to another member within {TRANSFER_WAIT:?} each; nothing was changed, retry"
        )))
    }
}

fn outcome(o: ApplyOutcome) -> apply_result::Outcome {
    match o {
        ApplyOutcome::Created => apply_result::Outcome::Created,
        ApplyOutcome::Configured => apply_result::Outcome::Configured,
        ApplyOutcome::Unchanged => apply_result::Outcome::Unchanged,
    }
}

fn event(kind: watch_event::Kind, service: Option<v1::Service>, revision: u64) -> v1::WatchEvent {
    v1::WatchEvent {
        kind: kind.into(),
        service,
        revision,
    }
}

fn in_namespace(service: &v1::Service, namespace: &str) -> bool {
    namespace.is_empty()
        || service
            .metadata
            .as_ref()
            .map_or("", |m| m.namespace.as_str())
            == namespace
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlApi {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let services = &request.get_ref().services;
        if services.is_empty() {
            return Err(Status::invalid_argument("the request holds no services"));
        }
        for (i, svc) in services.iter().enumerate() {
            match &svc.metadata {
                Some(meta) if !meta.name.is_empty() => {}
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "service #{} of the request has no name",
                        i + 1
                    )));
                }
            }
            if svc.spec.is_none() {
                return Err(Status::invalid_argument(format!(
                    "service #{} of the request has no spec",
                    i + 1
                )));
            }
        }
        let command = Command::ApplyServices(services.clone());
        let forward = |channel: Channel, request| async move {
            ControlClient::new(channel).apply(request).await
        };
        let applied = match self
            .link
            .write_or_forward(&request, &command, forward)
            .await?
        {
            Written::Here(applied) => applied,
            Written::Forwarded(response) => return Ok(response),
        };
        let CommandResult::Services(results) = applied.result else {
            return Err(Status::internal(
                "the apply was committed but produced no per-service results",
            ));
        };
        let results = results
            .into_iter()
            .map(|r| ApplyResult {
                namespace: r.namespace,
                name: r.name,
                outcome: outcome(r.outcome).into(),
                generation: r.generation,
            })
            .collect();
        Ok(Response::new(ApplyResponse {
            results,
            revision: applied.index,
        }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("a service name is required"));
        }
        let namespace = normalize_namespace(&req.namespace).to_string();
        let (service, revision) = self
            .link
            .read(req.read.as_ref(), |store| {
                (
                    store.get_service(&namespace, &req.name).cloned(),
                    store.revision(),
                )
            })
            .await?;
        match service {
            Some(service) => Ok(Response::new(GetResponse {
                service: Some(service),
                revision,
            })),
            None => Err(Status::not_found(format!(
                "service \"{}\" not found in namespace \"{namespace}\"",
                req.name
            ))),
        }
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let req = request.into_inner();
        let namespace = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
        let (services, revision) = self
            .link
            .read(req.read.as_ref(), |store| {
                let services: Vec<v1::Service> = store
                    .list_services(namespace, &req.label_selector)
                    .into_iter()
                    .cloned()
                    .collect();
                (services, store.revision())
            })
            .await?;
        Ok(Response::new(ListResponse { services, revision }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let req = request.get_ref();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("a service name is required"));
        }
        let namespace = normalize_namespace(&req.namespace).to_string();
        let command = Command::DeleteService {
            namespace: namespace.clone(),
            name: req.name.clone(),
        };
        let forward = |channel: Channel, request| async move {
            ControlClient::new(channel).delete(request).await
        };
        let applied = match self
            .link
            .write_or_forward(&request, &command, forward)
            .await?
        {
            Written::Here(applied) => applied,
            Written::Forwarded(response) => return Ok(response),
        };
        match applied.result {
            CommandResult::Deleted { found: true } => Ok(Response::new(DeleteResponse {
                deleted: true,
                revision: applied.index,
            })),
            CommandResult::Deleted { found: false } => Err(Status::not_found(format!(
                "service \"{}\" not found in namespace \"{namespace}\"",
                req.name
            ))),
            _ => Err(Status::internal(
                "the delete was committed but produced no result",
            )),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let handle = self.handle.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                result = stream_watch(&handle, req, &tx) => result,
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

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let status = self.handle.status();
        let members = self.members(&status.voters, &status.learners, status.leader_id);
        Ok(Response::new(ClusterStatusResponse {
            members,
            leader_id: status.leader_id.unwrap_or(0),
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
        }))
    }

    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<Response<MemberResponse>, Status> {
        let req = request.get_ref();
        if req.id == 0 {
            return Err(Status::invalid_argument("a member id must be 1 or more"));
        }
        let address = req.address.trim().to_string();
        if address.is_empty() || !address.contains(':') || address.contains('/') {
            return Err(Status::invalid_argument(format!(
                "member address {:?} is not HOST:PORT",
                req.address
            )));
        }
        let id = req.id;
        let status = self.handle.status();
        if status.voters.contains(&id) || status.learners.contains(&id) {
            return Err(Status::already_exists(format!(
                "node {id} is already a member of the cluster"
            )));
        }
        let forward = |channel: Channel, request| async move {
            ControlClient::new(channel).add_member(request).await
        };
        let op = || self.handle.add_voter_at(id, &address);
        match self.link.run_or_forward(&request, op, forward).await? {
            Written::Here(membership) => {
                tracing::info!(node = id, %address, index = membership.index, "member added");
                Ok(Response::new(self.member_response(&membership)))
            }
            Written::Forwarded(response) => Ok(response),
        }
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<MemberResponse>, Status> {
        let id = request.get_ref().id;
        if id == 0 {
            return Err(Status::invalid_argument("a member id must be 1 or more"));
        }
        let status = self.handle.status();
        if !status.voters.contains(&id) && !status.learners.contains(&id) {
            return Err(Status::not_found(format!(
                "node {id} is not a member of the cluster"
            )));
        }
        let me = self.handle.id();
        if id == me && status.leader_id == Some(me) {
            // raft-rs keeps a removed leader leading: hand over first, then let the new
            // leader remove this replica.
            let leader = self.hand_over_leadership().await?;
            let channel = self.link.leader_channel(leader)?;
            return ControlClient::new(channel)
                .remove_member(forwarded(request.into_inner()))
                .await
                .map_err(forward_error);
        }
        let forward = |channel: Channel, request| async move {
            ControlClient::new(channel).remove_member(request).await
        };
        let op = || self.handle.remove_voter(id);
        match self.link.run_or_forward(&request, op, forward).await? {
            Written::Here(membership) => {
                tracing::info!(node = id, index = membership.index, "member removed");
                Ok(Response::new(self.member_response(&membership)))
            }
            Written::Forwarded(response) => Ok(response),
        }
    }

    async fn top(&self, request: Request<TopRequest>) -> Result<Response<TopResponse>, Status> {
        let op = || async { self.top_here() };
        let forward = |channel: Channel, request| async move {
            ControlClient::new(channel).top(request).await
        };
        match self.link.run_or_forward(&request, op, forward).await? {
            Written::Here(response) => Ok(Response::new(response)),
            Written::Forwarded(response) => Ok(response),
        }
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let req = request.into_inner();
        let (tasks, revision) = self
            .link
            .read(req.read.as_ref(), |store| {
                (views::tasks(store, &req), store.revision())
            })
            .await?;
        Ok(Response::new(ListTasksResponse { tasks, revision }))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let req = request.into_inner();
        let (nodes, revision) = self
            .link
            .read(req.read.as_ref(), |store| {
                (views::nodes(store), store.revision())
            })
            .await?;
        Ok(Response::new(ListNodesResponse { nodes, revision }))
    }

    async fn set_node_availability(
        &self,
        request: Request<SetNodeAvailabilityRequest>,
    ) -> Result<Response<SetNodeAvailabilityResponse>, Status> {
        let req = request.get_ref();
        let availability = req.availability();
        if req.node.is_empty() || availability == v1::NodeAvailability::Unspecified {
            return Err(Status::invalid_argument(
                "a node name and an availability (active or drain) are required",
            ));
        }
        let command = Command::SetNodeAvailability {
            name: req.node.clone(),
            availability,
        };
        let forward = |channel: Channel, request| async move {
            ControlClient::new(channel)
                .set_node_availability(request)
                .await
        };
        self.node_write(&request, &command, forward, |node, revision| {
            SetNodeAvailabilityResponse { node, revision }
        })
        .await
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        if request.get_ref().node.is_empty() {
            return Err(Status::invalid_argument("a node name is required"));
        }
        let command = Command::RemoveNode {
            name: request.get_ref().node.clone(),
        };
        let forward = |channel: Channel, request| async move {
            ControlClient::new(channel).remove_node(request).await
        };
        self.node_write(&request, &command, forward, |node, revision| {
            RemoveNodeResponse { node, revision }
        })
        .await
    }

    async fn scale(
        &self,
        request: Request<ScaleRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let req = request.get_ref();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("a service name is required"));
        }
        let command = Command::ScaleService {
            namespace: normalize_namespace(&req.namespace).to_string(),
            name: req.name.clone(),
            replicas: req.replicas,
        };
        let forward = |channel: Channel, request| async move {
            ControlClient::new(channel).scale(request).await
        };
        self.service_write(&request, &command, forward).await
    }

    async fn rollout_undo(
        &self,
        request: Request<RolloutUndoRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let req = request.get_ref();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("a service name is required"));
        }
        let command = Command::UndoService {
            namespace: normalize_namespace(&req.namespace).to_string(),
            name: req.name.clone(),
        };
        let forward = |channel: Channel, request| async move {
            ControlClient::new(channel).rollout_undo(request).await
        };
        self.service_write(&request, &command, forward).await
    }
}

impl ControlApi {
    /// A write that changes one existing service (scale, undo): proposed here or forwarded, and
    /// answered like an apply of that service.
    /// A write about one node: here when leading, else forwarded; `make` builds the answer from
    /// the node and the revision.
    async fn node_write<Req, Resp, F, Fut>(
        &self,
        request: &Request<Req>,
        command: &Command,
        forward: F,
        make: impl FnOnce(Option<v1::Node>, u64) -> Resp,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        match self.link.write_or_forward(request, command, forward).await {
            Ok(Written::Here(Applied {
                result: CommandResult::Node(node),
                index,
            })) => Ok(Response::new(make(Some(*node), index))),
            Ok(Written::Here(_)) => Err(Status::internal(
                "the change was committed but produced no node",
            )),
            Ok(Written::Forwarded(response)) => Ok(response),
            Err(status) => Err(not_found_if_missing(status)),
        }
    }

    async fn service_write<Req, F, Fut>(
        &self,
        request: &Request<Req>,
        command: &Command,
        forward: F,
    ) -> Result<Response<ApplyResponse>, Status>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<ApplyResponse>, Status>>,
    {
        match self.link.write_or_forward(request, command, forward).await {
            Ok(Written::Here(applied)) => one_service_result(applied),
            Ok(Written::Forwarded(response)) => Ok(response),
            Err(status) => Err(not_found_if_missing(status)),
        }
    }
}

/// The answer to a write that changed one service.
fn one_service_result(applied: Applied) -> Result<Response<ApplyResponse>, Status> {
    let CommandResult::Service(r) = applied.result else {
        return Err(Status::internal(
            "the change was committed but produced no service result",
        ));
    };
    Ok(Response::new(ApplyResponse {
        results: vec![ApplyResult {
            namespace: r.namespace,
            name: r.name,
            outcome: outcome(r.outcome).into(),
            generation: r.generation,
        }],
        revision: applied.index,
    }))
}

/// A refused write about an object that does not exist is NOT_FOUND, not a bad argument.
fn not_found_if_missing(status: Status) -> Status {
    if status.code() == tonic::Code::InvalidArgument && status.message().contains("not found") {
        Status::not_found(status.message())
    } else {
        status
    }
}

type EventSender = mpsc::Sender<Result<v1::WatchEvent, Status>>;

/// Streams changes from `req.from_revision`; whenever the history cannot serve the watcher
/// (compacted, lagged, snapshot installed) it sends a full resync first. Ends when the client
/// goes away.
async fn stream_watch(
    handle: &NodeHandle,
    req: WatchRequest,
    tx: &EventSender,
) -> Result<(), Status> {
    let mut watcher = match handle.watch(req.from_revision) {
        Ok(watcher) => watcher,
        Err(WatchError::Closed) => return Err(Status::unavailable("the store was shut down")),
        Err(err) => {
            tracing::debug!(cause = %err, "watch starts with a resync");
            match resync(handle, &req.namespace, tx).await? {
                Some(watcher) => watcher,
                None => return Ok(()),
            }
        }
    };
    loop {
        let next = tokio::select! {
            next = watcher.next() => next,
            () = tx.closed() => return Ok(()),
        };
        match next {
            Ok(ev) => {
                let Some(service) = ev.service() else {
                    continue;
                };
                if !in_namespace(service, &req.namespace) {
                    continue;
                }
                let kind = match ev.kind {
                    EventKind::Put => watch_event::Kind::Put,
                    EventKind::Delete => watch_event::Kind::Delete,
                };
                if tx
                    .send(Ok(event(kind, Some(service.clone()), ev.revision)))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            Err(WatchError::Closed) => return Err(Status::unavailable("the store was shut down")),
            Err(err) => {
                tracing::debug!(cause = %err, "watch resyncs");
                watcher = match resync(handle, &req.namespace, tx).await? {
                    Some(watcher) => watcher,
                    None => return Ok(()),
                };
            }
        }
    }
}

/// Sends every object as RESYNC, then RESYNC_DONE, and returns a watcher for what follows
/// (None when the client went away).
async fn resync(
    handle: &NodeHandle,
    namespace: &str,
    tx: &EventSender,
) -> Result<Option<crate::state::Watcher>, Status> {
    let (services, revision, watcher) = {
        let store = handle.store().read();
        let revision = store.revision();
        let services: Vec<v1::Service> = store
            .list_services(
                (!namespace.is_empty()).then_some(namespace),
                &HashMap::new(),
            )
            .into_iter()
            .cloned()
            .collect();
        let watcher = store
            .watch(revision + 1)
            .map_err(|err| Status::unavailable(format!("cannot resume the watch: {err}")))?;
        (services, revision, watcher)
    };
    for service in services {
        if tx
            .send(Ok(event(
                watch_event::Kind::Resync,
                Some(service),
                revision,
            )))
            .await
            .is_err()
        {
            return Ok(None);
        }
    }
    if tx
        .send(Ok(event(watch_event::Kind::ResyncDone, None, revision)))
        .await
        .is_err()
    {
        return Ok(None);
    }
    Ok(Some(watcher))
}
