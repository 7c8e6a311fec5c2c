//! `tug agent`: this machine's node agent until Ctrl-C or SIGTERM. Stopping the agent does not
//! stop its containers: each has its own monitor, and the next `tug agent` adopts them.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use tug_agent::image::CredentialStore;
use tug_agent::worker::{MetricsListen, WorkerConfig};
use tug_api::manifest::{Cpu, Memory};

use crate::args::{AgentArgs, GlobalArgs};

pub fn run(global: &GlobalArgs, args: AgentArgs) -> anyhow::Result<()> {
    let cfg = config(global, &args)?;
    super::server_runtime(None)?.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tug_agent::worker::run(cfg, listener, stop_requested()).await?;
        Ok(())
    })
}

pub(super) fn config(global: &GlobalArgs, args: &AgentArgs) -> anyhow::Result<WorkerConfig> {
    let controllers: Vec<String> = args
        .join
        .iter()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if controllers.is_empty() {
        bail!("--join needs at least one controller address (HOST:PORT)");
    }
    let name = match &args.node.name {
        Some(n) => n.trim().to_string(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("cannot read the host name: pass --name")?
            .trim()
            .to_string(),
    };
    if name.is_empty() {
        bail!("the node needs a name: pass --name");
    }
    let mut cfg = WorkerConfig::new(
        controllers,
        global.data_dir.clone(),
        name,
        std::env::current_exe().context("find the tug binary")?,
    );
    cfg.labels = labels(&args.node.labels)?;
    cfg.capacity_cpu_millis = args
        .node
        .cpus
        .as_deref()
        .map(|c| Cpu::parse(c).map(|c| c.0))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--cpus: {e}"))?;
    cfg.capacity_memory_bytes = args
        .node
        .memory
        .as_deref()
        .map(|m| Memory::parse(m).map(|m| m.0))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
    cfg.advertise = args.advertise.clone();
    cfg.insecure_registries = global.insecure_registry.clone();
    cfg.registry_credentials = CredentialStore::default_path();
    cfg.oci_runtime = args.node.oci_runtime.clone();
    if args.node.max_parallel == 0 {
        bail!("--max-parallel must be 1 or more");
    }
    cfg.max_parallel = args.node.max_parallel;
    cfg.network_mode = args
        .node
        .network_mode
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--network-mode: {e}"))?;
    cfg.node_ip = args.node.node_ip;
    cfg.fast_path = on_off("--fast-path", &args.node.fast_path)?;
    cfg.big_tcp = on_off("--big-tcp", &args.node.big_tcp)?;
    cfg.cni = args
        .node
        .cni_conf_dir
        .clone()
        .map(|conf_dir| tug_agent::network::CniSettings {
            conf_dir,
            bin_dir: args.node.cni_bin_dir.clone(),
        });
    if cfg.cni.is_some() && cfg.network_mode == tug_agent::network::NetworkMode::None {
        bail!("--cni-conf-dir needs a network: drop --network-mode none");
    }
    cfg.metrics = match args.metrics_listen.as_deref().map(str::trim) {
        None => MetricsListen::NodeAddress,
        Some("off") | Some("none") => MetricsListen::Off,
        Some(at) => MetricsListen::At(at.to_string()),
    };
    Ok(cfg)
}

/// `k=v` entries; keys are unique.
fn labels(entries: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in entries.iter().filter(|e| !e.trim().is_empty()) {
        let Some((k, v)) = entry.split_once('=') else {
            bail!("--labels entry {entry:?} is not KEY=VALUE (e.g. zone=a)");
        };
        let k = k.trim();
        if k.is_empty() {
            bail!("--labels entry {entry:?} has an empty key");
        }
        if out.insert(k.to_string(), v.trim().to_string()).is_some() {
            bail!("--labels names {k} twice");
        }
    }
    Ok(out)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, whichever comes first.
pub(super) async fn stop_requested() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot watch for SIGINT/SIGTERM: stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping the agent; its containers keep running");
}

/// The value of an `on`/`off` flag.
fn on_off(flag: &str, value: &str) -> anyhow::Result<bool> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        other => bail!("{flag}: {other:?} is not one of on, off"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_off_flags_take_on_and_off_only() -> anyhow::Result<()> {
        assert!(on_off("--big-tcp", "on")?);
        assert!(!on_off("--big-tcp", "off")?);
        let err = on_off("--big-tcp", "yes").err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("--big-tcp: \"yes\" is not one of on, off")
        );
        Ok(())
    }

    #[test]
    fn labels_parse_and_reject_nonsense() -> anyhow::Result<()> {
        let l = labels(&["zone=a".into(), " disk = ssd ".into(), String::new()])?;
        assert_eq!(l.get("zone").map(String::as_str), Some("a"));
        assert_eq!(l.get("disk").map(String::as_str), Some("ssd"));
        assert!(labels(&["zone".into()]).is_err());
        assert!(labels(&["=a".into()]).is_err());
        assert!(labels(&["a=1".into(), "a=2".into()]).is_err());
        Ok(())
    }
}
