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
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tug_api::v1::control_client::ControlClient;
use tug_api::v1::control_server::Control;
use tug_api::v1::{
    self, AddMemberRequest, ApplyRequest, ApplyResponse, ApplyResult, ClusterStatusRequest,
    ClusterStatusResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse, ListRequest,
    ListResponse, Member, MemberResponse, ReadOptions, RemoveMemberRequest, WatchRequest,
    apply_result, watch_event,
};

use crate::fsm::{Command, CommandResult};
use crate::raft::{
    Applied, Membership, NodeHandle, NodeStatus, PeerAddresses, ProposeError, Reachability,
    ReadConsistency, ReadError,
};
use crate::state::{ApplyOutcome, EventKind, Store, WatchError, normalize_namespace};

/// Metadata key set on a request one controller forwards to another, so it is never forwarded
/// twice (a stale leader hint must not bounce a request around).
const FORWARDED: &str = "tug-forwarded";

/// How long a write keeps trying to reach a leader that cannot be reached, and the pause
/// between tries when no other leader shows up.
const FORWARD_RETRY: Duration = Duration::from_secs(5);
const FORWARD_PAUSE: Duration = Duration::from_millis(200);

/// How long a leader that is being removed waits for one voter to take leadership over.
const TRANSFER_WAIT: Duration = Duration::from_secs(3);

/// Watch events buffered per client before the stream waits for it.
const WATCH_BUFFER: usize = 256;

/// The Control service of one replica.
#[derive(Debug, Clone)]
pub struct ControlApi {
    handle: NodeHandle,
    peers: PeerAddresses,
    reachability: Reachability,
    clients: Arc<Mutex<HashMap<u64, ControlClient<Channel>>>>,
    stopping: watch::Receiver<bool>,
}

enum Write<T> {
    Done(T),
    Forward(ControlClient<Channel>, u64),
}

/// A write applied here, or the leader's answer to it.
enum Written<T, R> {
    Here(T),
    Forwarded(Response<R>),
}

impl ControlApi {
    /// `peers`: every replica's id and `host:port`, this one included (the transport keeps it
    /// current as members change). `stopping` turning true (or its sender going away) ends
    /// every open watch.
    pub fn new(
        handle: NodeHandle,
        peers: PeerAddresses,
        reachability: Reachability,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            handle,
            peers,
            reachability,
            clients: Arc::default(),
            stopping,
        }
    }

    fn no_leader(&self) -> Status {
        let status = self.handle.status();
        let size = status.voters.len().max(self.peers.len()).max(1);
        let reachable = 1 + self.reachability.reachable_peers();
        Status::unavailable(format!(
            "no leader elected yet (cluster of {size}, {reachable} reachable); nothing was written"
        ))
    }

    /// A client for the leader `id`, cached.
    fn leader_client(&self, id: u64) -> Result<ControlClient<Channel>, Status> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(&id) {
            return Ok(client.clone());
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
        let client = ControlClient::new(channel);
        clients.insert(id, client.clone());
        Ok(client)
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
                Ok(Write::Forward(self.leader_client(id)?, id))
            }
            Err(err) => Err(self.propose_status(err)),
        }
    }

    /// Proposes `command` here when this replica leads, or forwards the request to the leader
    /// with `forward`.
    async fn write_or_forward<Req, Resp, F, Fut>(
        &self,
        request: &Request<Req>,
        command: &Command,
        forward: F,
    ) -> Result<Written<Applied, Resp>, Status>
    where
        Req: Clone,
        F: Fn(ControlClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.run_or_forward(request, || self.handle.propose(command), forward)
            .await
    }

    /// Runs the write `op` here when this replica leads, or forwards the request to the leader
    /// with `forward`. A leader that cannot be reached (it may just have died) is retried, as
    /// soon as another leader is known or after a short pause, for [`FORWARD_RETRY`].
    async fn run_or_forward<Req, Resp, T, Op, OpFut, F, Fut>(
        &self,
        request: &Request<Req>,
        op: Op,
        forward: F,
    ) -> Result<Written<T, Resp>, Status>
    where
        Req: Clone,
        Op: Fn() -> OpFut,
        OpFut: Future<Output = Result<T, ProposeError>>,
        F: Fn(ControlClient<Channel>, Request<Req>) -> Fut,
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

    /// The members of `membership` with their addresses and roles.
    fn members(&self, voters: &[u64], learners: &[u64], leader_id: Option<u64>) -> Vec<Member> {
        let mut ids: Vec<(u64, bool)> = voters.iter().map(|id| (*id, true)).collect();
        ids.extend(learners.iter().map(|id| (*id, false)));
        ids.sort_unstable();
        ids.into_iter()
            .map(|(id, voter)| Member {
                id,
                address: self.peers.get(id).unwrap_or_default(),
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
                .map_err(|err| self.propose_status(err))?;
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
            "node {me} leads and could not hand leadership to another member within              {TRANSFER_WAIT:?} each; nothing was changed, retry"
        )))
    }

    fn propose_status(&self, err: ProposeError) -> Status {
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
            ProposeError::Rejected(_) => Status::invalid_argument(err.to_string()),
            ProposeError::MembershipChange(_) => Status::failed_precondition(err.to_string()),
        }
    }

    async fn read<R>(
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

fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    request
}

fn forward_error(status: Status) -> Status {
    if status.code() == tonic::Code::Unavailable && status.message().contains("transport") {
        Status::unavailable(format!(
            "this controller is not the leader and cannot reach the leader: {}",
            status.message()
        ))
    } else {
        status
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
        let forward = |mut client: ControlClient<Channel>, request| async move {
            client.apply(request).await
        };
        let applied = match self.write_or_forward(&request, &command, forward).await? {
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
        let forward = |mut client: ControlClient<Channel>, request| async move {
            client.delete(request).await
        };
        let applied = match self.write_or_forward(&request, &command, forward).await? {
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
        let forward = |mut client: ControlClient<Channel>, request| async move {
            client.add_member(request).await
        };
        let op = || self.handle.add_voter_at(id, &address);
        match self.run_or_forward(&request, op, forward).await? {
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
            let mut client = self.leader_client(leader)?;
            return client
                .remove_member(forwarded(request.into_inner()))
                .await
                .map_err(forward_error);
        }
        let forward = |mut client: ControlClient<Channel>, request| async move {
            client.remove_member(request).await
        };
        let op = || self.handle.remove_voter(id);
        match self.run_or_forward(&request, op, forward).await? {
            Written::Here(membership) => {
                tracing::info!(node = id, index = membership.index, "member removed");
                Ok(Response::new(self.member_response(&membership)))
            }
            Written::Forwarded(response) => Ok(response),
        }
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
                if !in_namespace(&ev.service, &req.namespace) {
                    continue;
                }
                let kind = match ev.kind {
                    EventKind::Put => watch_event::Kind::Put,
                    EventKind::Delete => watch_event::Kind::Delete,
                };
                if tx
                    .send(Ok(event(kind, Some(ev.service.clone()), ev.revision)))
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
            .services()
            .filter(|s| in_namespace(s, namespace))
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
