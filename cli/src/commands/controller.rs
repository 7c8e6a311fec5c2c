//! `tug controller`: one controller replica until Ctrl-C or SIGTERM.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use tug_controller::ControllerConfig;
use tug_controller::metrics::{Endpoint, sd};
use tug_controller::orchestrator::OrchestratorConfig;
use tug_controller::raft::NodeConfig;

use tug_controller::state::ClusterNetwork;

use crate::args::{ClusterNetworkFlags, ControllerArgs, GlobalArgs, MemberCommand};

pub fn run(global: &GlobalArgs, args: ControllerArgs) -> anyhow::Result<()> {
    match args.member {
        Some(MemberCommand::AddMember { id, address }) => {
            return super::client::add_member(global, id, &address);
        }
        Some(MemberCommand::RemoveMember { id }) => {
            return super::client::remove_member(global, id);
        }
        None => {}
    }
    let Some(id) = args.id else {
        bail!("--id is required to run a controller");
    };
    let peers = parse_peers(id, &args.listen, &args.peers)?;
    let mut node = NodeConfig::new(id, global.data_dir.join("controller"));
    node.disk_reserve_bytes = tug_api::manifest::Memory::parse(&args.disk_reserve)
        .map(|m| m.0)
        .map_err(|e| anyhow::anyhow!("--disk-reserve: {e}"))?;
    if args.join {
        // No initial members: the node waits for a leader to add it and send it a snapshot.
        tracing::info!(
            node = id,
            "starting empty, waiting to be added to the cluster"
        );
    } else {
        node.initial_members = peers.keys().copied().collect();
    }
    let orchestrator = OrchestratorConfig {
        heartbeat_period: args.heartbeat_period,
        ..OrchestratorConfig::default()
    };
    let own_peer = peers
        .get(&id)
        .cloned()
        .unwrap_or_else(|| args.listen.clone());
    let cfg = ControllerConfig {
        node,
        peers,
        orchestrator,
        network: cluster_network(&args.network)?,
    };
    let metrics_listen = metrics_listen(&args.listen, args.metrics_listen.as_deref());
    let explicit = args.metrics_listen.is_some();
    let workers = args.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
        usize::from,
    );
    super::server_runtime(Some(workers))?.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let metrics = metrics_endpoint(metrics_listen.as_deref(), &own_peer, explicit).await?;
        tug_controller::run_with_metrics(cfg, listener, metrics, shutdown_signal()).await?;
        Ok(())
    })
}

/// The checked `--cluster-cidr` and `--node-subnet-prefix`.
pub(super) fn cluster_network(flags: &ClusterNetworkFlags) -> anyhow::Result<ClusterNetwork> {
    ClusterNetwork::parse(&flags.cluster_cidr, flags.node_subnet_prefix)
        .context("--cluster-cidr / --node-subnet-prefix")
}

/// Where `/metrics` goes: `flag` (`off`: nowhere), else the host of `listen` at the default
/// port.
pub(super) fn metrics_listen(listen: &str, flag: Option<&str>) -> Option<String> {
    match flag.map(str::trim) {
        Some("off") | Some("none") => None,
        Some(at) => Some(at.to_string()),
        None => Some(format!(
            "{}:{}",
            sd::host_of(listen),
            tug_controller::metrics::DEFAULT_PORT
        )),
    }
}

/// Bind `/metrics` at `at`; it is advertised at `at`, or at the host of this replica's peer
/// address when `at` names no host (0.0.0.0). A default address (not `explicit`) that cannot
/// be bound (several replicas on one host, in tests) means no `/metrics`, with a warning.
pub(super) async fn metrics_endpoint(
    at: Option<&str>,
    own_peer: &str,
    explicit: bool,
) -> anyhow::Result<Option<Endpoint>> {
    let Some(at) = at else {
        return Ok(None);
    };
    let listener = match tokio::net::TcpListener::bind(at).await {
        Ok(listener) => listener,
        Err(err) if !explicit => {
            tracing::warn!(address = %at, cause = %err, "cannot serve /metrics on the default address; pass --metrics-listen");
            return Ok(None);
        }
        Err(err) => {
            return Err(err).with_context(|| format!("cannot listen on {at} for /metrics"));
        }
    };
    let local = listener.local_addr()?;
    let advertise = if local.ip().is_unspecified() {
        format!("{}:{}", sd::host_of(own_peer), local.port())
    } else {
        local.to_string()
    };
    Ok(Some(Endpoint {
        listener,
        advertise,
    }))
}

/// `ID=ADDR` entries; none means a one-node cluster of this replica at `listen`.
fn parse_peers(id: u64, listen: &str, entries: &[String]) -> anyhow::Result<BTreeMap<u64, String>> {
    if id == 0 {
        bail!("--id must be 1 or more");
    }
    let mut peers = BTreeMap::new();
    for entry in entries.iter().filter(|e| !e.trim().is_empty()) {
        let Some((peer, addr)) = entry.split_once('=') else {
            bail!("--peers entry {entry:?} is not ID=ADDR (e.g. 1=10.0.0.1:7440)");
        };
        let peer: u64 = peer
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("--peers entry {entry:?}: the id must be a number from 1"))?;
        if peers.insert(peer, addr.trim().to_string()).is_some() {
            bail!("--peers names node {peer} twice");
        }
    }
    if peers.is_empty() {
        peers.insert(id, listen.to_string());
    }
    if !peers.contains_key(&id) {
        bail!("--peers does not include this controller (--id {id})");
    }
    Ok(peers)
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::warn!(cause = %err, "cannot watch for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_must_include_this_replica() -> anyhow::Result<()> {
        let peers = parse_peers(2, "x", &["1=a:1".into(), "2=b:2".into()])?;
        assert_eq!(peers.get(&2).map(String::as_str), Some("b:2"));
        assert_eq!(parse_peers(1, "h:7440", &[])?.len(), 1);
        assert!(parse_peers(3, "x", &["1=a:1".into()]).is_err());
        assert!(parse_peers(1, "x", &["1a:1".into()]).is_err());
        assert!(parse_peers(1, "x", &["1=a".into(), "1=b".into()]).is_err());
        Ok(())
    }

    #[test]
    fn metrics_listen_on_the_listen_host_by_default() {
        assert_eq!(
            metrics_listen("10.0.0.1:7440", None).as_deref(),
            Some("10.0.0.1:7442")
        );
        assert_eq!(
            metrics_listen("x:1", Some("0.0.0.0:9")).as_deref(),
            Some("0.0.0.0:9")
        );
        assert_eq!(metrics_listen("x:1", Some("off")), None);
    }
}
