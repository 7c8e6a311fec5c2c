//! Raft messages between controllers over gRPC (`tug.v1.Raft`, `api/proto/tug/v1/raft.proto`).
//!
//! Outgoing: [`GrpcTransport`] keeps one task and one bounded queue per peer. The task connects
//! lazily, streams every queued message over one long-lived `Send` call, and when the peer
//! cannot be reached (or the stream breaks) reports it unreachable to the node (and snapshots
//! as failed), then reconnects with a capped back-off. [`Transport::send`] never blocks: a full
//! queue drops the message (Raft resends what matters).
//!
//! Incoming: [`RaftService`] parses each message of a stream and hands it to the node's
//! [`Mailbox`](super::Mailbox).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tug_api::v1::raft_client::RaftClient;
use tug_api::v1::raft_server::Raft;
use tug_api::v1::{RaftMessage, SendAck};

use super::handle::NodeHandle;
use super::transport::{DeliverError, Transport};

/// Largest peer message accepted or sent (snapshots travel as one message).
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// Outgoing messages queued per peer before new ones are dropped.
const QUEUE: usize = 4096;
/// Messages buffered between a peer's queue and its gRPC stream.
const STREAM_BUFFER: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the transport reports unreachable peers and failed snapshots: the node's handle, which
/// exists only once the node is opened (after the transport), so it is filled in afterwards.
pub type HandleCell = Arc<OnceLock<NodeHandle>>;

/// Which peers have a live stream right now (for "M reachable" in error messages).
#[derive(Debug, Clone, Default)]
pub struct Reachability(Arc<HashMap<u64, AtomicBool>>);

impl Reachability {
    fn new(peers: impl Iterator<Item = u64>) -> Self {
        Self(Arc::new(
            peers.map(|id| (id, AtomicBool::new(false))).collect(),
        ))
    }

    fn set(&self, peer: u64, up: bool) {
        if let Some(flag) = self.0.get(&peer) {
            flag.store(up, Ordering::Relaxed);
        }
    }

    /// Peers (this replica not counted) with a live stream.
    pub fn reachable_peers(&self) -> usize {
        self.0
            .values()
            .filter(|flag| flag.load(Ordering::Relaxed))
            .count()
    }
}

/// Sends Raft messages to peers over gRPC, one stream per peer.
#[derive(Debug)]
pub struct GrpcTransport {
    queues: HashMap<u64, mpsc::Sender<Message>>,
    reachability: Reachability,
}

impl GrpcTransport {
    /// Starts one sender task per peer in `peers` (id -> `host:port`; this replica's own entry,
    /// if present, is skipped). Must be called inside a tokio runtime. The tasks end when the
    /// transport is dropped.
    pub fn new(self_id: u64, peers: &BTreeMap<u64, String>, handle: HandleCell) -> Self {
        let ids = peers.keys().copied().filter(|id| *id != self_id);
        let reachability = Reachability::new(ids);
        let mut queues = HashMap::new();
        for (&peer, addr) in peers.iter().filter(|(id, _)| **id != self_id) {
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.insert(peer, tx);
            let sender = PeerSender {
                self_id,
                peer,
                addr: addr.clone(),
                handle: handle.clone(),
                reachability: reachability.clone(),
            };
            tokio::spawn(sender.run(rx));
        }
        Self {
            queues,
            reachability,
        }
    }

    pub fn reachability(&self) -> Reachability {
        self.reachability.clone()
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msgs: Vec<Message>) {
        for msg in msgs {
            let Some(queue) = self.queues.get(&msg.to) else {
                tracing::debug!(to = msg.to, "no address for raft peer; message dropped");
                continue;
            };
            if let Err(mpsc::error::TrySendError::Full(msg)) = queue.try_send(msg) {
                tracing::debug!(to = msg.to, "raft peer queue full; message dropped");
            }
        }
    }
}

struct PeerSender {
    self_id: u64,
    peer: u64,
    addr: String,
    handle: HandleCell,
    reachability: Reachability,
}

impl PeerSender {
    async fn run(self, mut queue: mpsc::Receiver<Message>) {
        let mut backoff = BACKOFF_MIN;
        // Connect only once there is something to send.
        let Some(mut pending) = queue.recv().await else {
            return;
        };
        loop {
            match self.connect().await {
                Ok(client) => {
                    backoff = BACKOFF_MIN;
                    self.reachability.set(self.peer, true);
                    match self.stream(client, pending, &mut queue).await {
                        StreamEnd::QueueClosed => return,
                        StreamEnd::Broken(err, unsent) => {
                            tracing::debug!(
                                node = self.self_id,
                                peer = self.peer,
                                cause = %err,
                                "raft stream to peer broke; reconnecting"
                            );
                            self.reachability.set(self.peer, false);
                            self.failed(unsent.as_deref());
                        }
                    }
                }
                Err(err) => {
                    tracing::debug!(
                        node = self.self_id,
                        peer = self.peer,
                        addr = %self.addr,
                        cause = %err,
                        "cannot connect to raft peer"
                    );
                    self.failed(Some(&pending));
                }
            }
            // Whatever queued up while the peer was down is stale: report and drop it.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            while let Ok(msg) = queue.try_recv() {
                self.failed(Some(&msg));
            }
            pending = match queue.recv().await {
                Some(msg) => msg,
                None => return,
            };
        }
    }

    async fn connect(&self) -> Result<RaftClient<Channel>, tonic::transport::Error> {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .connect()
            .await?;
        Ok(RaftClient::new(channel)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Streams `first` and then the queue over one call until either ends.
    async fn stream(
        &self,
        mut client: RaftClient<Channel>,
        first: Message,
        queue: &mut mpsc::Receiver<Message>,
    ) -> StreamEnd {
        let (tx, rx) = mpsc::channel::<RaftMessage>(STREAM_BUFFER);
        let call = client.send(ReceiverStream::new(rx));
        tokio::pin!(call);
        let mut next = Some(first);
        loop {
            let msg = match next.take() {
                Some(msg) => msg,
                None => tokio::select! {
                    msg = queue.recv() => match msg {
                        Some(msg) => msg,
                        None => return StreamEnd::QueueClosed,
                    },
                    result = &mut call => {
                        let err = match result {
                            Ok(_) => "the peer ended the stream".to_string(),
                            Err(status) => status.message().to_string(),
                        };
                        return StreamEnd::Broken(err, None);
                    }
                },
            };
            let bytes = match msg.write_to_bytes() {
                Ok(bytes) => bytes,
                Err(err) => {
                    tracing::warn!(peer = self.peer, cause = %err, "cannot encode raft message; dropped");
                    continue;
                }
            };
            let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
            tokio::select! {
                sent = tx.send(RaftMessage { message: bytes }) => {
                    if sent.is_err() {
                        return StreamEnd::Broken("the stream closed".into(), Some(Box::new(msg)));
                    }
                    if is_snapshot {
                        tracing::info!(peer = self.peer, index = msg.get_snapshot().get_metadata().index, "sent a snapshot to a raft peer");
                    }
                }
                result = &mut call => {
                    let err = match result {
                        Ok(_) => "the peer ended the stream".to_string(),
                        Err(status) => status.message().to_string(),
                    };
                    return StreamEnd::Broken(err, Some(Box::new(msg)));
                }
            }
        }
    }

    /// Tells the node `self.peer` is unreachable (and that a snapshot to it failed).
    fn failed(&self, msg: Option<&Message>) {
        let Some(handle) = self.handle.get() else {
            return;
        };
        handle.report_unreachable(self.peer);
        if msg.is_some_and(|m| m.get_msg_type() == MessageType::MsgSnapshot) {
            handle.report_snapshot(self.peer, false);
        }
    }
}

enum StreamEnd {
    QueueClosed,
    Broken(String, Option<Box<Message>>),
}

/// The receiving side: delivers every message of a peer's stream to the local node.
#[derive(Debug, Clone)]
pub struct RaftService {
    handle: NodeHandle,
    stopping: watch::Receiver<bool>,
}

impl RaftService {
    /// `stopping` turning true ends every open stream (a server shutting down).
    pub fn new(handle: NodeHandle, stopping: watch::Receiver<bool>) -> Self {
        Self { handle, stopping }
    }
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn send(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<SendAck>, Status> {
        let mut stream = request.into_inner();
        let mut stopping = self.stopping.clone();
        loop {
            let raw = tokio::select! {
                raw = stream.message() => match raw? {
                    Some(raw) => raw,
                    None => break,
                },
                _ = async { stopping.wait_for(|s| *s).await.is_ok() } => {
                    return Err(Status::unavailable("this controller is shutting down"));
                }
            };
            let msg = Message::parse_from_bytes(&raw.message).map_err(|err| {
                Status::invalid_argument(format!("cannot decode a raft message: {err}"))
            })?;
            match self.handle.mailbox().deliver(msg) {
                Ok(()) | Err(DeliverError::Full(_)) => {}
                Err(err @ DeliverError::Stopped(_)) => {
                    return Err(Status::unavailable(err.to_string()));
                }
            }
        }
        Ok(Response::new(SendAck {}))
    }
}
