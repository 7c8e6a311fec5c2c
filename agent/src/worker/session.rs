//! Sessions with the controllers (STYLE.md §4.1, §4.2): register, then heartbeat, watch the
//! assignments and report statuses side by side; the first of them to fail ends the session
//! (the others are dropped with it), and the agent registers again with the next controller
//! after a jittered, capped back-off. Any controller will do: it forwards to the leader.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tug_api::v1::dispatcher_client::DispatcherClient;
use tug_api::v1::{
    AssignmentsRequest, HeartbeatRequest, NetworkRequest, NodeDescription, RegisterRequest,
    ReportStatusRequest,
};

use super::backoff::{Backoff, Jitter};
use super::core::Worker;
use super::error::SessionError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Register, Heartbeat and ReportStatus answer within this, or the session is over.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_PERIOD: Duration = Duration::from_secs(5);
/// Statuses per ReportStatus (one Raft command on the controller).
const MAX_BATCH: usize = 256;
/// How long the reporter waits after a change for more changes to send with it.
const COALESCE: Duration = Duration::from_millis(50);
/// How often the usage of the node's tasks goes with a report (for `tug top`). Sampling reads
/// every container's cgroup, so it costs agent cpu in proportion: 10 s keeps it (with a 15 s
/// scrape) under 1% of a core at 200 containers, as fresh as `kubectl top`'s 15 s resolution.
const USAGE_PERIOD: Duration = Duration::from_secs(10);

type Result<T, E = SessionError> = std::result::Result<T, E>;

/// Keep a session with one of `controllers` (round robin) until `shutdown`.
pub(crate) async fn run(
    worker: Arc<Worker>,
    description: NodeDescription,
    controllers: Vec<String>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    for address in controllers.iter().cycle() {
        if shutdown.is_cancelled() {
            return;
        }
        let session = session(&worker, &description, address, &mut backoff);
        let ended = tokio::select! {
            r = session => r,
            () = shutdown.cancelled() => return,
        };
        if let Err(e) = ended {
            tracing::warn!(controller = %address, cause = %e, "session ended");
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn call<T>(
    name: &'static str,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(SessionError::Rpc { call: name, status }),
        Err(_) => Err(SessionError::Timeout { call: name }),
    }
}

async fn session(
    worker: &Arc<Worker>,
    description: &NodeDescription,
    address: &str,
    backoff: &mut Backoff,
) -> Result<()> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|source| SessionError::Address {
            address: address.into(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let connect = || async {
        endpoint
            .connect()
            .await
            .map_err(|source| SessionError::Connect {
                address: address.into(),
                source,
            })
    };
    let mut client = DispatcherClient::new(connect().await?);
    // Heartbeats get a connection of their own: on the session's, assignment data the worker has
    // not read yet fills the HTTP/2 flow-control window and can hold back heartbeat answers, and
    // a busy node would be declared down.
    let beat_channel = connect().await?;
    let registered = call(
        "Register",
        client.register(RegisterRequest {
            node: Some(description.clone()),
        }),
    )
    .await?;
    backoff.reset();
    let period = match registered.heartbeat_period_ms {
        0 => DEFAULT_PERIOD,
        ms => Duration::from_millis(ms),
    };
    tracing::info!(controller = %address, session = %registered.session_id, ?period, subnet = %registered.subnet, "registered");
    worker.ctx.network.session_started(registered.revision);
    if let Err(e) = worker
        .ctx
        .network
        .configure(&registered.subnet, &registered.cluster_cidr)
        .await
    {
        // Containers cannot be wired in until this works; the session stays up (tasks fail
        // with the reason) and the next registration tries again.
        tracing::error!(cause = %e, subnet = %registered.subnet, "cannot set up the node network");
        worker.ctx.network.set_failure(e.to_string());
    }
    // The controller may have missed anything while there was no session.
    worker.ctx.board.mark_all_dirty();
    let node = description.name.clone();
    let session_id = registered.session_id;
    tokio::select! {
        r = heartbeat(DispatcherClient::new(beat_channel), &node, &session_id, period) => r,
        r = assignments(client.clone(), worker, &node) => r,
        r = network(client.clone(), worker, &node) => r,
        r = report(client, worker, &node, &session_id) => r,
    }
}

/// Follow the cluster's network map: peers' routes and the DNS table. A failed sync is logged
/// and tried again with the next map (or the next session).
async fn network(mut client: DispatcherClient<Channel>, worker: &Worker, node: &str) -> Result<()> {
    if !worker.ctx.network.enabled() {
        return std::future::pending().await;
    }
    let rpc = |status| SessionError::Rpc {
        call: "Network",
        status,
    };
    let mut stream = client
        .network(NetworkRequest { node: node.into() })
        .await
        .map_err(rpc)?
        .into_inner();
    while let Some(map) = stream.message().await.map_err(rpc)? {
        if let Err(e) = worker.ctx.network.sync(&map).await {
            tracing::warn!(cause = %e, "cannot apply the network map");
        }
    }
    Err(SessionError::StreamEnded)
}

async fn heartbeat(
    mut client: DispatcherClient<Channel>,
    node: &str,
    session_id: &str,
    mut period: Duration,
) -> Result<()> {
    let mut jitter = Jitter::seeded();
    loop {
        tokio::time::sleep(jitter.spread(period)).await;
        let answer = call(
            "Heartbeat",
            client.heartbeat(HeartbeatRequest {
                node: node.into(),
                session_id: session_id.into(),
            }),
        )
        .await?;
        if answer.heartbeat_period_ms > 0 {
            period = Duration::from_millis(answer.heartbeat_period_ms);
        }
    }
}

async fn assignments(
    mut client: DispatcherClient<Channel>,
    worker: &Worker,
    node: &str,
) -> Result<()> {
    let after_revision = worker.revision();
    let rpc = |status| SessionError::Rpc {
        call: "Assignments",
        status,
    };
    let mut stream = client
        .assignments(AssignmentsRequest {
            node: node.into(),
            after_revision,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(rpc)? {
        worker.apply(msg).await?;
    }
    Err(SessionError::StreamEnded)
}

async fn report(
    mut client: DispatcherClient<Channel>,
    worker: &Worker,
    node: &str,
    session_id: &str,
) -> Result<()> {
    let board = &worker.ctx.board;
    let mut usage_at = tokio::time::Instant::now();
    loop {
        if !board.has_dirty() {
            tokio::select! {
                () = board.changed() => tokio::time::sleep(COALESCE).await,
                () = tokio::time::sleep_until(usage_at) => {}
            }
        }
        let usage_due = tokio::time::Instant::now() >= usage_at;
        let updates = board.take(MAX_BATCH);
        if updates.is_empty() && !usage_due {
            continue;
        }
        let usage = if usage_due {
            usage_at = tokio::time::Instant::now() + USAGE_PERIOD;
            let metrics = worker.ctx.metrics.clone();
            super::ctx::blocking(move || metrics.task_usage())
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let sent = call(
            "ReportStatus",
            client.report_status(ReportStatusRequest {
                node: node.into(),
                session_id: session_id.into(),
                updates: updates.clone(),
                usage,
                has_usage: usage_due,
            }),
        )
        .await;
        if let Err(e) = sent {
            // Sent again by the next session (which re-reports everything anyway).
            board.requeue(&updates);
            return Err(e);
        }
    }
}
