//! `tug up`: the embedded default cluster. One process runs a single controller (Raft group of
//! one, data under `DATA/controller`) and this machine's agent (images, containers under `DATA`),
//! ready for `tug apply` with no other configuration. Ctrl-C or SIGTERM stops both; the
//! containers keep running and the next `tug up` adopts them.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow};
use tokio::sync::watch;
use tug_controller::ControllerConfig;
use tug_controller::orchestrator::OrchestratorConfig;
use tug_controller::raft::NodeConfig;

use crate::args::{AgentArgs, GlobalArgs, UpArgs};

/// Where `tug up` serves the controller's `/metrics` and `/sd` unless told otherwise.
const UP_METRICS: &str = "127.0.0.1:7442";

pub fn run(global: &GlobalArgs, args: UpArgs) -> anyhow::Result<()> {
    let agent_args = AgentArgs {
        join: vec![args.listen.clone()],
        listen: args.agent_listen.clone(),
        advertise: None,
        // None: the agent's node address (127.0.0.1 here), port 7443, if free.
        metrics_listen: args.agent_metrics_listen.clone(),
        node: args.node.clone(),
    };
    let worker = super::agent::config(global, &agent_args)?;
    let mut node = NodeConfig::new(1, global.data_dir.join("controller"));
    node.initial_members = vec![1];
    let controller = ControllerConfig {
        node,
        peers: BTreeMap::from([(1, args.listen.clone())]),
        orchestrator: OrchestratorConfig::default(),
        network: super::controller::cluster_network(&args.network)?,
    };
    let metrics_listen = super::controller::metrics_listen(
        &args.listen,
        Some(args.metrics_listen.as_deref().unwrap_or(UP_METRICS)),
    );
    super::server_runtime(None)?.block_on(async {
        let metrics = super::controller::metrics_endpoint(
            metrics_listen.as_deref(),
            &args.listen,
            args.metrics_listen.is_some(),
        )
        .await?;
        let controller_listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {} (controller)", args.listen))?;
        let agent_listener = tokio::net::TcpListener::bind(&args.agent_listen)
            .await
            .with_context(|| format!("cannot listen on {} (agent)", args.agent_listen))?;
        let (stop, stopped) = watch::channel(false);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut controller = tokio::spawn(tug_controller::run_with_metrics(
            controller,
            controller_listener,
            metrics,
            until(stopped.clone()),
        ));
        let mut agent = tokio::spawn(tug_agent::worker::run(
            worker,
            agent_listener,
            until(stopped),
        ));
        tracing::info!(controller = %args.listen, agent = %args.agent_listen, "cluster up");
        let failed = tokio::select! {
            () = super::agent::stop_requested() => None,
            r = &mut controller => Some(match r {
                Ok(Ok(())) => anyhow!("the controller stopped on its own"),
                Ok(Err(e)) => anyhow::Error::from(e).context("the controller failed"),
                Err(e) => anyhow!("the controller task failed: {e}"),
            }),
            r = &mut agent => Some(match r {
                Ok(Ok(())) => anyhow!("the agent stopped on its own"),
                Ok(Err(e)) => anyhow::Error::from(e).context("the agent failed"),
                Err(e) => anyhow!("the agent task failed: {e}"),
            }),
        };
        let _ = stop.send(true);
        // The agent first (it may still report to the controller), then the controller.
        if !agent.is_finished() {
            let _ = agent.await;
        }
        if !controller.is_finished() {
            let _ = controller.await;
        }
        match failed {
            Some(err) => Err(err),
            None => Ok(()),
        }
    })
}
