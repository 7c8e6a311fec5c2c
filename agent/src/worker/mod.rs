//! The worker (DESIGN.md, "Agent"; STYLE.md §4, §5): the node side of "from `tug apply` to
//! running containers on many hosts".
//!
//! It registers with a controller and keeps a session (`session`): heartbeats at the period the
//! controller sets, the assignments stream (a COMPLETE set, then INCREMENTAL changes, resumed
//! after a disconnect from the last revision received) and batched status reports
//! (`reporter`). Each assigned task gets a runner (`runner`) that pulls its image, creates and
//! starts its container, notices its exit, restarts it per policy, probes its health, stops it
//! when asked and removes it when unassigned; `plan` decides which runners to start, update or
//! remove. The agent API (`api`) serves the tasks' logs and exec.
//!
//! Containers outlive the agent: each has its own monitor process. A restarted worker resumes
//! the tasks it saved (`records`, under `DATA/worker/`), adopts their containers without
//! restarting them, and removes task containers nobody assigned only once a controller has sent
//! it a COMPLETE set. While no controller is reachable the node keeps running (and restarting)
//! what it has.
//!
//! `run` is a library entry point without process-wide assumptions, so `tug agent` and `tug up`
//! (a controller and an agent in one process) both call it.

mod api;
mod assignments;
mod backoff;
mod core;
mod ctx;
mod error;
mod exec;
mod exit;
mod health;
pub mod launch;
mod node;
mod outcome;
mod plan;
mod records;
mod reporter;
mod runner;
mod session;
pub mod task_config;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tug_api::v1::agent_server::AgentServer;

pub use api::AgentApi;
pub use error::WorkerError;

use crate::image::{CredentialStore, ImageStore, StoreConfig};
use crate::metrics::{self, AgentMetrics};
use crate::network::{CniSettings, NetworkError, NetworkMode, NodeNetwork};
use crate::runtime::container::Runtime;

/// Default address of the agent API.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7441";

/// Everything the worker needs; `tug agent` fills it from flags, `tug up` from its own.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Controllers (`host:port`), tried in turn.
    pub controllers: Vec<String>,
    /// Images under `images/`, containers under `containers/`, rootfs under `rootfs/`, named
    /// volumes under `volumes/`, the worker's own files under `worker/`.
    pub data_dir: PathBuf,
    /// The node's name, unique in the cluster.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// What the scheduler may hand out here; `None`: this machine's CPUs × 1000 and MemTotal.
    pub capacity_cpu_millis: Option<u64>,
    pub capacity_memory_bytes: Option<u64>,
    /// The agent API address to register (`host:port`); `None`: derived from the listener.
    pub advertise: Option<String>,
    /// Registries spoken to over plain HTTP (`host[:port]`).
    pub insecure_registries: Vec<String>,
    /// Docker-style credentials file (`config.json`); `None`: anonymous pulls.
    pub registry_credentials: Option<PathBuf>,
    /// Run containers with this OCI runtime (runc, crun) instead of the built-in one.
    pub oci_runtime: Option<PathBuf>,
    /// The executable whose `__monitor STATE_DIR` mode supervises each container (the `tug`
    /// binary).
    pub monitor_exe: PathBuf,
    /// Pulls, creates, stops and removals running at once.
    pub max_parallel: usize,
    /// Where to serve Prometheus `/metrics`.
    pub metrics: MetricsListen,
    /// How containers get their network.
    pub network_mode: NetworkMode,
    /// The node's own address for peers and published ports; `None`: the advertised host.
    pub node_ip: Option<Ipv4Addr>,
    /// Attach containers with these CNI plugins instead of the built-in setup.
    pub cni: Option<CniSettings>,
    /// Use the eBPF fast path between containers on different nodes where the kernel can.
    pub fast_path: bool,
    /// Raise the uplink's IPv4 GSO limit for BIG TCP (see `tug_netplugin::big_tcp`).
    pub big_tcp: bool,
}

/// Where the agent serves `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// Not served (the container table and usage reports work all the same).
    Off,
    /// On the node's advertised address, port [`metrics::DEFAULT_PORT`]; if that cannot be
    /// bound, not served (with a warning).
    NodeAddress,
    /// On this `host:port` (an unspecified host is advertised as the node's address).
    At(String),
}

impl WorkerConfig {
    /// A config with the defaults: no labels, capacity from the machine, 4 at once, no container
    /// network.
    pub fn new(
        controllers: Vec<String>,
        data_dir: PathBuf,
        name: String,
        monitor_exe: PathBuf,
    ) -> WorkerConfig {
        WorkerConfig {
            controllers,
            data_dir,
            name,
            labels: BTreeMap::new(),
            capacity_cpu_millis: None,
            capacity_memory_bytes: None,
            advertise: None,
            insecure_registries: Vec::new(),
            registry_credentials: None,
            oci_runtime: None,
            monitor_exe,
            max_parallel: 4,
            metrics: MetricsListen::Off,
            // Opt in: a network changes the host's interfaces and iptables (`tug agent` does,
            // with its --network-mode).
            network_mode: NetworkMode::None,
            node_ip: None,
            cni: None,
            fast_path: true,
            big_tcp: false,
        }
    }
}

/// Run the worker until `shutdown`: the agent API on `listener`, sessions with the
/// controllers, a runner per assigned task. On shutdown the containers keep running (a
/// restarted worker adopts them).
pub async fn run(
    cfg: WorkerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    if cfg.controllers.is_empty() {
        return Err(WorkerError::NoControllers);
    }
    let listening: SocketAddr = listener.local_addr().map_err(WorkerError::Listener)?;
    let first_controller = cfg.controllers.first().cloned();
    let address = {
        let (advertise, first) = (cfg.advertise.clone(), first_controller.clone());
        ctx::blocking(move || {
            node::advertise_address(advertise.as_deref(), listening, first.as_deref())
        })
        .await
        .map_err(|e| WorkerError::Listener(std::io::Error::other(e)))?
    };
    let metrics_listener = bind_metrics(&cfg.metrics, &address).await?;
    let metrics_address = match &metrics_listener {
        Some(l) => {
            let local = l.local_addr().map_err(WorkerError::Listener)?;
            let first = first_controller.clone();
            Some(
                ctx::blocking(move || node::advertise_address(None, local, first.as_deref()))
                    .await
                    .map_err(|e| WorkerError::Listener(std::io::Error::other(e)))?,
            )
        }
        None => None,
    };
    let metrics = Arc::new(
        AgentMetrics::new(
            &cfg.name,
            node::machine_cpu_millis() / 1000,
            node::machine_memory_bytes(),
        )
        .map_err(WorkerError::Metrics)?,
    );
    // The node's own address matters only with a container network (peers route to it).
    let node_ip = cfg.node_ip.or_else(|| node::host_ipv4(&address));
    let network_ip = match (cfg.network_mode, node_ip) {
        (NetworkMode::None, _) => Ipv4Addr::UNSPECIFIED,
        (_, Some(ip)) => ip,
        (_, None) => {
            return Err(WorkerError::Network(NetworkError::Internal(format!(
                "the advertised address {address} has no IPv4 host: pass --node-ip"
            ))));
        }
    };
    let network = Arc::new(
        NodeNetwork::open(
            cfg.network_mode,
            cfg.cni.clone(),
            cfg.fast_path,
            cfg.big_tcp,
            &cfg.data_dir,
            network_ip,
        )
        .await
        .map_err(WorkerError::Network)?,
    );
    metrics.watch_fast_path(network.fast_path_slot());
    let ctx = Arc::new(context(&cfg, metrics.clone(), network)?);
    let runtime = ctx.runtime.clone();
    let description = {
        let cfg = cfg.clone();
        let metrics_address = metrics_address.clone();
        ctx::blocking(move || {
            node::describe(
                &cfg.name,
                address,
                &cfg.labels,
                (cfg.capacity_cpu_millis, cfg.capacity_memory_bytes),
                cfg.oci_runtime.as_deref(),
                metrics_address,
                (node_ip, cfg.network_mode != NetworkMode::None),
            )
        })
        .await
        .map_err(|e| WorkerError::Listener(std::io::Error::other(e)))?
    };
    tracing::info!(node = %description.name, address = %description.address, metrics = %description.metrics_address, runtime = %description.runtime_version, "agent starting");

    {
        // Before any runner creates a container: what the runtime lists is every container.
        let rt = ctx.runtime.clone();
        let live: BTreeSet<String> = ctx::blocking(move || rt.list())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|states| states.into_iter().map(|s| s.id).collect())
            .unwrap_or_default();
        ctx.network.collect_garbage(&live).await;
    }
    let worker = Arc::new(core::Worker::start(ctx.clone()).await);
    let stop = CancellationToken::new();
    let sessions = tokio::spawn(session::run(
        worker.clone(),
        description,
        cfg.controllers.clone(),
        stop.clone(),
    ));
    let metrics_server = metrics_listener.map(|l| {
        let stop = stop.clone();
        tokio::spawn(metrics::serve(
            metrics,
            l,
            async move { stop.cancelled().await },
        ))
    });
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let stop_api = stop.clone();
    let served = tonic::transport::Server::builder()
        .add_service(AgentServer::new(AgentApi::new(runtime)))
        .serve_with_incoming_shutdown(incoming, async move { stop_api.cancelled().await });
    tokio::pin!(served);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut served => r.map_err(WorkerError::from),
        () = &mut shutdown => Ok(()),
    };
    tracing::info!("agent stopping; containers keep running");
    stop.cancel();
    let _ = sessions.await;
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    worker.shutdown().await;
    if result.is_ok() {
        let _ = served.await;
    }
    result
}

/// The metrics listener `how` asks for; `node_address` is the agent API's advertised address.
async fn bind_metrics(
    how: &MetricsListen,
    node_address: &str,
) -> Result<Option<TcpListener>, WorkerError> {
    let at = match how {
        MetricsListen::Off => return Ok(None),
        MetricsListen::At(at) => at.clone(),
        MetricsListen::NodeAddress => {
            let host = node_address
                .rsplit_once(':')
                .map_or(node_address, |(host, _)| host);
            format!("{host}:{}", metrics::DEFAULT_PORT)
        }
    };
    match TcpListener::bind(&at).await {
        Ok(listener) => Ok(Some(listener)),
        // The default port may be taken (several agents on one address, in tests): the agent
        // runs without /metrics rather than not at all. An address asked for must work.
        Err(source) if *how == MetricsListen::NodeAddress => {
            tracing::warn!(address = %at, cause = %source, "cannot serve /metrics on the default address; pass --metrics-listen");
            Ok(None)
        }
        Err(source) => Err(WorkerError::MetricsListener {
            address: at,
            source,
        }),
    }
}

fn context(
    cfg: &WorkerConfig,
    metrics: Arc<AgentMetrics>,
    network: Arc<NodeNetwork>,
) -> Result<ctx::Ctx, WorkerError> {
    let credentials = match &cfg.registry_credentials {
        Some(path) => CredentialStore::load(path)
            .map_err(|e| WorkerError::Images(crate::image::ImageError::from(e)))?,
        None => CredentialStore::empty(),
    };
    let mut store_cfg = StoreConfig::new(cfg.data_dir.join("images"));
    store_cfg.insecure_registries = cfg.insecure_registries.clone();
    store_cfg.credentials = credentials;
    store_cfg.sync_in_background = true;
    Ok(ctx::Ctx {
        data_dir: cfg.data_dir.clone(),
        store: ImageStore::open(store_cfg)?,
        runtime: Runtime {
            root: cfg.data_dir.join("containers"),
            monitor_exe: cfg.monitor_exe.clone(),
        },
        oci_runtime: cfg.oci_runtime.clone(),
        board: reporter::StatusBoard::default(),
        files: records::TaskFiles::open(&cfg.data_dir)?,
        converge: Arc::new(Semaphore::new(cfg.max_parallel.max(1))),
        removing: Mutex::new(BTreeSet::new()),
        shutdown: CancellationToken::new(),
        pulls: Mutex::new(BTreeMap::new()),
        metrics,
        network,
    })
}
