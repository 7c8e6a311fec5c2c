//! One controller replica: the Raft node, the gRPC peer transport, and the API server, on one
//! listener. The binary parses flags and binds; tests bind `127.0.0.1:0`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use std::time::Duration;
use tokio::net::TcpListener;

use tokio::sync::{oneshot, watch};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tug_api::v1::control_server::ControlServer;
use tug_api::v1::dispatcher_server::DispatcherServer;
use tug_api::v1::raft_server::RaftServer;

use crate::api_server::ControlApi;
use crate::dispatcher::{DispatcherApi, Router, Sessions, UsageBoard};
use crate::leader::LeaderLink;
use crate::metrics::{self, ApiMetricsLayer, ControllerMetrics};
use crate::orchestrator::{self, OrchestratorConfig};
use crate::raft::grpc_transport::{GrpcTransport, MAX_MESSAGE_BYTES, RaftService};
use crate::raft::{Node, NodeConfig, NodeError};
use crate::state::ClusterNetwork;

/// How long open calls (peer streams, watches, forwarded writes) get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(3);

/// The addresses of members learned from membership changes, kept across restarts.
const PEER_ADDRESSES_FILE: &str = "peers";

/// Largest API request or response (a big apply, a full list).
const MAX_API_MESSAGE_BYTES: usize = 64 << 20;

/// A replica's settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Raft settings; `node.id` is this replica.
    pub node: NodeConfig,
    /// Every replica's id and `host:port` (this one included): where peer messages and
    /// forwarded writes go.
    pub peers: BTreeMap<u64, String>,
    /// Reconciler and node liveness (acting while this replica leads).
    pub orchestrator: OrchestratorConfig,
    /// The container address plan a new cluster starts with (the first node registration
    /// fixes it; later values are ignored).
    pub network: ClusterNetwork,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot start the controller's Raft node: {0}")]
    Open(#[source] NodeError),
    #[error("the controller's Raft node failed: {0}")]
    Node(#[source] NodeError),
    #[error("the controller's Raft node task panicked or was cancelled")]
    NodeTask,
    #[error("the API server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("set up the controller's metrics: {0}")]
    Metrics(#[source] prometheus::Error),
}

/// Runs a replica on `listener` until `shutdown` resolves (or the Raft node fails), then stops
/// the server and the node. Must be called inside a tokio runtime.
pub async fn run(
    cfg: ControllerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    run_with_metrics(cfg, listener, None, shutdown).await
}

/// [`run`], also serving Prometheus `/metrics` and service discovery (`/sd`) on `metrics`.
pub async fn run_with_metrics(
    mut cfg: ControllerConfig,
    listener: TcpListener,
    metrics: Option<metrics::Endpoint>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let instruments = ControllerMetrics::new().map_err(ServerError::Metrics)?;
    cfg.node.metrics = instruments.raft.clone();
    cfg.orchestrator.metrics = instruments.scheduling.clone();
    let id = cfg.node.id;
    let cell = Arc::new(OnceLock::new());
    let transport = GrpcTransport::new(id, &cfg.peers, cell.clone())
        .persist_addresses(cfg.node.data_dir.join(PEER_ADDRESSES_FILE));
    let reachability = transport.reachability();
    let addresses = transport.addresses();
    let (node, handle) = Node::open(cfg.node, Arc::new(transport)).map_err(ServerError::Open)?;
    // The cell was created just above and is set only here.
    let _ = cell.set(handle.clone());

    let (stop_node, node_stopped) = oneshot::channel::<()>();
    let mut node_task = tokio::spawn(node.run(async move {
        let _ = node_stopped.await;
    }));

    // Set when shutting down: ends peer streams and watches, which never end on their own.
    let (stopping_tx, stopping) = watch::channel(false);
    let raft = RaftServer::new(RaftService::new(handle.clone(), stopping.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let link = LeaderLink::new(handle.clone(), addresses, reachability);
    let sessions = Sessions::default();
    let usage = UsageBoard::default();
    let router = Router::spawn(handle.clone(), stopping.clone());
    let dispatcher = DispatcherServer::new(DispatcherApi::new(
        link.clone(),
        router,
        sessions.clone(),
        usage.clone(),
        cfg.orchestrator.heartbeat_period,
        cfg.network,
        stopping.clone(),
    ))
    .max_decoding_message_size(MAX_API_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_API_MESSAGE_BYTES);
    let leader_changes = tokio::spawn(metrics::count_leader_changes(
        handle.clone(),
        instruments.leader_changes.clone(),
        stopping.clone(),
    ));
    let metrics_server = metrics.map(|endpoint| {
        let mut stopping = stopping.clone();
        tracing::info!(node = id, metrics = %endpoint.advertise, "serving /metrics and /sd");
        tokio::spawn(metrics::serve(
            instruments.clone(),
            handle.clone(),
            link.peers.clone(),
            endpoint,
            async move {
                let _ = stopping.wait_for(|s| *s).await;
            },
        ))
    });
    let orchestrator = tokio::spawn(orchestrator::run(
        handle,
        sessions,
        cfg.orchestrator.clone(),
        stopping.clone(),
    ));
    let control =
        ControlServer::new(ControlApi::new(link.clone(), stopping.clone()).with_usage(usage))
            .max_decoding_message_size(MAX_API_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_API_MESSAGE_BYTES);
    let addr = listener.local_addr().ok();
    tracing::info!(node = id, addr = ?addr, "controller serving");

    let (node_failed_tx, node_failed_rx) = oneshot::channel::<()>();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let serve = Server::builder()
        .layer(ApiMetricsLayer(instruments.api.clone()))
        .add_service(raft)
        .add_service(control)
        .add_service(dispatcher)
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                () = shutdown => {}
                _ = node_failed_rx => {}
            }
            let _ = stopping_tx.send(true);
        });
    tokio::pin!(serve);

    // The node ending on its own is fatal: stop serving and report why.
    let mut node_result = None;
    let mut stopping_seen = stopping.clone();
    let served = tokio::select! {
        served = &mut serve => served,
        joined = &mut node_task => {
            node_result = Some(joined);
            let _ = node_failed_tx.send(());
            drain(id, serve).await
        }
        _ = async { stopping_seen.wait_for(|s| *s).await.is_ok() } => drain(id, serve).await,
    };
    orchestrator.abort();
    leader_changes.abort();
    if let Some(server) = metrics_server {
        server.abort();
    }
    let joined = match node_result {
        Some(joined) => joined,
        None => {
            let _ = stop_node.send(());
            node_task.await
        }
    };
    tracing::info!(node = id, "controller stopped");
    match joined {
        Err(_) => Err(ServerError::NodeTask),
        Ok(Err(err)) => Err(ServerError::Node(err)),
        Ok(Ok(())) => served.map_err(ServerError::from),
    }
}

/// Lets the server finish open calls for a while, then gives up on them.
async fn drain(
    id: u64,
    serve: impl Future<Output = Result<(), tonic::transport::Error>>,
) -> Result<(), tonic::transport::Error> {
    match tokio::time::timeout(DRAIN, serve).await {
        Ok(served) => served,
        Err(_) => {
            tracing::warn!(
                node = id,
                "open calls did not finish in {DRAIN:?}; stopping anyway"
            );
            Ok(())
        }
    }
}
