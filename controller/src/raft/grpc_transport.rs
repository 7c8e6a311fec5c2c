//! Raft messages between controllers over gRPC (`tug.v1.Raft`, `api/proto/tug/v1/raft.proto`).
//!
//! Outgoing: [`GrpcTransport`] keeps one task and one bounded queue per peer. The task connects
//! lazily, streams every queued message over one long-lived `Send` call, and when the peer
//! cannot be reached (or the stream breaks) reports it unreachable to the node (and snapshots
//! as failed), then reconnects with a capped back-off. While a stream is up and nothing waits
//! in the queue, [`Transport::send`] encodes a message and puts it straight into the stream's
//! buffer: one task hop less on every append and acknowledgement. Snapshots always take the
//! queue (they are large, and a failed one must be reported). [`Transport::send`] never
//! blocks: a full queue drops the message (Raft resends what matters).
//!
//! Incoming: [`RaftService`] parses each message of a stream and hands it to the node's
//! [`Mailbox`](super::Mailbox).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
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
pub struct Reachability(Arc<Mutex<HashMap<u64, bool>>>);

impl Reachability {
    fn new(peers: impl Iterator<Item = u64>) -> Self {
        Self(Arc::new(Mutex::new(peers.map(|id| (id, false)).collect())))
    }

    fn flags(&self) -> MutexGuard<'_, HashMap<u64, bool>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, peer: u64, up: bool) {
        if let Some(flag) = self.flags().get_mut(&peer) {
            *flag = up;
        }
    }

    fn add(&self, peer: u64) {
        self.flags().entry(peer).or_insert(false);
    }

    fn remove(&self, peer: u64) {
        self.flags().remove(&peer);
    }

    /// Peers (this replica not counted) with a live stream.
    pub fn reachable_peers(&self) -> usize {
        self.flags().values().filter(|up| **up).count()
    }
}

/// Every replica's id and `host:port` (this one included), shared by the transport (which
/// updates it when membership changes) and the API server (which forwards writes with it).
#[derive(Debug, Clone, Default)]
pub struct PeerAddresses(Arc<RwLock<BTreeMap<u64, String>>>);

impl PeerAddresses {
    pub fn new(peers: BTreeMap<u64, String>) -> Self {
        Self(Arc::new(RwLock::new(peers)))
    }

    /// `id`'s address, if known.
    pub fn get(&self, id: u64) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// Every known id and address.
    pub fn snapshot(&self) -> BTreeMap<u64, String> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many replicas have a known address.
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records `id`'s address; returns the one it replaces.
    fn insert(&self, id: u64, addr: String) -> Option<String> {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, addr)
    }

    fn remove(&self, id: u64) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// Sends Raft messages to peers over gRPC, one stream per peer. Peers come from the static
/// map it is created with, plus (at run time) [`Transport::add_peer`] / `remove_peer` as
/// membership changes carrying addresses are applied.
#[derive(Debug)]
pub struct GrpcTransport {
    self_id: u64,
    queues: Mutex<HashMap<u64, Outbox>>,
    addresses: PeerAddresses,
    reachability: Reachability,
    handle: HandleCell,
    /// Where the address map is saved whenever membership changes it.
    address_file: Option<PathBuf>,
}

impl GrpcTransport {
    /// Starts one sender task per peer in `peers` (id -> `host:port`; this replica's own entry,
    /// if present, is skipped). Must be called inside a tokio runtime. The tasks end when the
    /// transport is dropped.
    pub fn new(self_id: u64, peers: &BTreeMap<u64, String>, handle: HandleCell) -> Self {
        let ids = peers.keys().copied().filter(|id| *id != self_id);
        let transport = Self {
            self_id,
            queues: Mutex::default(),
            addresses: PeerAddresses::new(peers.clone()),
            reachability: Reachability::new(ids),
            handle,
            address_file: None,
        };
        for (&peer, addr) in peers.iter().filter(|(id, _)| **id != self_id) {
            transport.start_sender(peer, addr.clone());
        }
        transport
    }

    pub fn reachability(&self) -> Reachability {
        self.reachability.clone()
    }

    /// Keeps the address map in `path` (one `ID=ADDR` a line), rewritten whenever a
    /// membership change adds or removes a member, so a restarted replica still reaches
    /// members added at run time after the conf change that named them was compacted into a
    /// snapshot. Addresses recorded there for ids missing from the static peers map are used
    /// now; the static map wins for ids it names.
    pub fn persist_addresses(mut self, path: PathBuf) -> Self {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for (id, addr) in parse_address_file(&text) {
                    if self.addresses.get(id).is_none() {
                        tracing::info!(node = self.self_id, peer = id, %addr, "raft peer address from the last run");
                        self.addresses.insert(id, addr.clone());
                        if id != self.self_id {
                            self.start_sender(id, addr);
                        }
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %path.display(), cause = %err, "cannot read the saved peer addresses");
            }
        }
        self.address_file = Some(path);
        self
    }

    /// Rewrites the address file (write, fsync, rename); a failure is logged, not fatal: the
    /// static peers map still works.
    fn save_addresses(&self) {
        let Some(path) = &self.address_file else {
            return;
        };
        let text: String = self
            .addresses
            .snapshot()
            .iter()
            .map(|(id, addr)| format!("{id}={addr}\n"))
            .collect();
        let tmp = path.with_extension("tmp");
        let written = (|| -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(err) = written {
            tracing::warn!(path = %path.display(), cause = %err, "cannot save the peer addresses");
        }
    }

    /// The address map, kept current as members are added and removed.
    pub fn addresses(&self) -> PeerAddresses {
        self.addresses.clone()
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<u64, Outbox>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts (or restarts, with a new address) the sender task of `peer`; the previous task,
    /// if any, ends when its queue is dropped here.
    fn start_sender(&self, peer: u64, addr: String) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(peer, "no async runtime to run a raft peer sender on");
            return;
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let outbox = Outbox {
            queue: tx,
            shared: Arc::default(),
        };
        let sender = PeerSender {
            self_id: self.self_id,
            peer,
            addr,
            handle: self.handle.clone(),
            reachability: self.reachability.clone(),
            shared: outbox.shared.clone(),
        };
        self.queues().insert(peer, outbox);
        self.reachability.add(peer);
        runtime.spawn(sender.run(rx));
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msgs: Vec<Message>) {
        let queues = self.queues();
        for msg in msgs {
            let Some(outbox) = queues.get(&msg.to) else {
                tracing::debug!(to = msg.to, "no address for raft peer; message dropped");
                continue;
            };
            outbox.send(msg);
        }
    }

    fn add_peer(&self, id: u64, addr: &str) {
        let previous = self.addresses.insert(id, addr.to_string());
        if previous.as_deref() != Some(addr) {
            self.save_addresses();
        }
        if id == self.self_id
            || (previous.as_deref() == Some(addr) && self.queues().contains_key(&id))
        {
            return;
        }
        tracing::info!(node = self.self_id, peer = id, addr, "raft peer added");
        self.start_sender(id, addr.to_string());
    }

    fn remove_peer(&self, id: u64) {
        if id == self.self_id {
            return;
        }
        if self.addresses.get(id).is_some() {
            self.addresses.remove(id);
            self.save_addresses();
        }
        self.reachability.remove(id);
        if self.queues().remove(&id).is_some() {
            tracing::info!(node = self.self_id, peer = id, "raft peer removed");
        }
    }
}

/// `ID=ADDR` lines; anything else is skipped.
fn parse_address_file(text: &str) -> Vec<(u64, String)> {
    text.lines()
        .filter_map(|line| {
            let (id, addr) = line.trim().split_once('=')?;
            let id: u64 = id.trim().parse().ok().filter(|id| *id != 0)?;
            let addr = addr.trim();
            (!addr.is_empty()).then(|| (id, addr.to_string()))
        })
        .collect()
}

/// One peer's way out: the queue its [`PeerSender`] drains, and what the two share.
#[derive(Debug)]
struct Outbox {
    queue: mpsc::Sender<Message>,
    shared: Arc<Shared>,
}

/// Shared by the node's side of a peer's outbox and the peer's sender task.
#[derive(Debug, Default)]
struct Shared {
    /// The buffer of the stream that is up right now, if one is.
    stream: Mutex<Option<mpsc::Sender<RaftMessage>>>,
    /// Messages put in the queue that the sender task has not finished with. While there are
    /// any, new messages queue behind them, so a peer gets its messages in order.
    queued: AtomicUsize,
}

impl Shared {
    fn stream(&self) -> MutexGuard<'_, Option<mpsc::Sender<RaftMessage>>> {
        self.stream.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The sender task is done with one queued message (sent, reported or dropped).
    fn done(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Outbox {
    fn send(&self, msg: Message) {
        let Some(msg) = self.send_direct(msg) else {
            return;
        };
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(err) = self.queue.try_send(msg) {
            self.shared.done();
            if let mpsc::error::TrySendError::Full(msg) = err {
                tracing::debug!(to = msg.to, "raft peer queue full; message dropped");
            }
        }
    }

    /// Puts `msg` straight into the live stream's buffer; gives it back when it must queue.
    fn send_direct(&self, msg: Message) -> Option<Message> {
        if msg.get_msg_type() == MessageType::MsgSnapshot
            || self.shared.queued.load(Ordering::Acquire) > 0
        {
            return Some(msg);
        }
        let stream = self.shared.stream();
        let Some(stream) = stream.as_ref() else {
            return Some(msg);
        };
        let message = match msg.write_to_bytes() {
            Ok(bytes) => bytes,
            Err(err) => {
                tracing::warn!(to = msg.to, cause = %err, "cannot encode raft message; dropped");
                return None;
            }
        };
        // Full or closed: the queue's sender task waits for room or reports the failure.
        stream.try_send(RaftMessage { message }).err().map(|_| msg)
    }
}

struct PeerSender {
    self_id: u64,
    peer: u64,
    addr: String,
    handle: HandleCell,
    reachability: Reachability,
    shared: Arc<Shared>,
}

/// Clears the live stream when the call it belongs to ends, however it ends.
struct LiveStream<'a>(&'a Shared);

impl Drop for LiveStream<'_> {
    fn drop(&mut self) {
        *self.0.stream() = None;
    }
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
                            if unsent.is_some() {
                                self.shared.done();
                            }
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
                    self.shared.done();
                }
            }
            // Whatever queued up while the peer was down is stale: report and drop it.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            while let Ok(msg) = queue.try_recv() {
                self.failed(Some(&msg));
                self.shared.done();
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
        *self.shared.stream() = Some(tx.clone());
        let _live = LiveStream(&self.shared);
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
                    self.shared.done();
                    continue;
                }
            };
            let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
            tokio::select! {
                sent = tx.send(RaftMessage { message: bytes }) => {
                    if sent.is_err() {
                        return StreamEnd::Broken("the stream closed".into(), Some(Box::new(msg)));
                    }
                    self.shared.done();
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
