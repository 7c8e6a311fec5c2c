//! The operator's client commands: `apply`, `get`, `delete`, `cluster status`, `controller
//! add-member` / `remove-member` (and `describe`, in its own module). Each talks to any
//! controller of `--controller ADDR[,ADDR]` (or `TUG_CONTROLLER`), trying the next address when
//! one cannot be reached.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};
use tug_api::v1::control_client::ControlClient;
use tug_api::v1::{
    self, AddMemberRequest, ApplyRequest, ClusterStatusRequest, DeleteRequest, GetRequest,
    ListRequest, Member, ReadOptions, RemoveMemberRequest, apply_result,
};

use crate::args::{GlobalArgs, ObjectArgs, OutputFormat};
use crate::output::table;

/// Where a client goes without `--controller`.
const DEFAULT_CONTROLLER: &str = "127.0.0.1:7440";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longer than a controller's own write timeout, so its clear error arrives first.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn addresses(global: &GlobalArgs) -> Vec<String> {
    let addrs: Vec<String> = global
        .controller
        .iter()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if addrs.is_empty() {
        vec![DEFAULT_CONTROLLER.to_string()]
    } else {
        addrs
    }
}

pub(super) fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

/// Runs `call` against the first controller that answers; an unreachable or unavailable one
/// gives way to the next address.
pub(super) async fn call<T, F, Fut>(addrs: &[String], call: F) -> anyhow::Result<T>
where
    F: Fn(ControlClient<Channel>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let mut last = None;
    for addr in addrs {
        let url = if addr.contains("://") {
            addr.clone()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(url)
            .with_context(|| format!("{addr:?} is not a controller address (HOST:PORT)"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(err) => {
                tracing::debug!(addr = %addr, cause = %err, "controller unreachable");
                last = Some(anyhow!("cannot reach the controller at {addr}"));
                continue;
            }
        };
        match call(ControlClient::new(channel)).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if status.code() == Code::Unavailable => {
                tracing::debug!(addr = %addr, ?status, "controller unavailable");
                last = Some(anyhow!("{addr}: {}", status.message()));
            }
            Err(status) => return Err(anyhow!("{}", status.message())),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no controller address given")))
}

/// One line (or block) to stdout; a closed pipe (`| head`) ends output quietly.
pub(super) fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}") {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow!("cannot write the output: {err}"))
        }
        _ => Ok(()),
    }
}

pub(super) fn check_kind(kind: Option<&str>) -> anyhow::Result<()> {
    match kind {
        Some("service" | "services" | "svc") => Ok(()),
        Some(other) => bail!("unknown kind {other:?}; known kinds: service"),
        None => bail!("name a kind (e.g. `service`) or give manifests with -f"),
    }
}

/// Loads manifests; invalid ones print every error (file:line:col: ...) and fail.
fn load(files: &[std::path::PathBuf]) -> anyhow::Result<Vec<v1::Service>> {
    match tug_api::manifest::load(files) {
        Ok(loaded) => Ok(loaded.iter().map(|l| l.manifest.to_proto()).collect()),
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            bail!(
                "{} error(s) in the manifests; nothing was applied",
                errors.0.len()
            )
        }
    }
}

pub fn apply(global: &GlobalArgs, files: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let services = load(files)?;
    let addrs = addresses(global);
    let response = block_on(call(&addrs, |mut c| {
        let request = ApplyRequest {
            services: services.clone(),
        };
        async move { c.apply(request).await }
    }))?;
    for result in &response.results {
        let outcome = match result.outcome() {
            apply_result::Outcome::Created => "created",
            apply_result::Outcome::Configured => "configured",
            apply_result::Outcome::Unchanged => "unchanged",
            apply_result::Outcome::Unspecified => "applied",
        };
        emit(&format!("service/{} {outcome}", result.name))?;
    }
    Ok(())
}

pub fn get(global: &GlobalArgs, args: &ObjectArgs) -> anyhow::Result<()> {
    match args.kind.as_deref() {
        Some("task" | "tasks") => return super::cluster::get_tasks(global, args),
        Some("node" | "nodes") => return super::cluster::nodes(global, args.output, args.stale),
        Some("service" | "services" | "svc") => {}
        Some(other) => bail!("unknown kind {other:?}; known kinds: service, task, node"),
        None => bail!("name a kind: service, task or node"),
    }
    let addrs = addresses(global);
    let read = Some(ReadOptions { stale: args.stale });
    match &args.name {
        Some(name) => {
            let request = GetRequest {
                namespace: args.namespace.clone().unwrap_or_default(),
                name: name.clone(),
                read,
            };
            let response = block_on(call(&addrs, |mut c| {
                let request = request.clone();
                async move { c.get(request).await }
            }))?;
            let service = response.service.unwrap_or_default();
            match args.output {
                Some(OutputFormat::Json) => emit(&serde_json::to_string_pretty(&service)?)?,
                Some(OutputFormat::Yaml) => emit(serde_yaml_ng::to_string(&service)?.trim_end())?,
                wide => emit(&services_table(&[service], wide))?,
            }
        }
        None => {
            let request = ListRequest {
                namespace: args.namespace.clone().unwrap_or_default(),
                label_selector: super::cluster::parse_selector(args.selector.as_deref())?,
                read,
            };
            let response = block_on(call(&addrs, |mut c| {
                let request = request.clone();
                async move { c.list(request).await }
            }))?;
            match args.output {
                Some(OutputFormat::Json) => emit(&serde_json::to_string_pretty(&response)?)?,
                Some(OutputFormat::Yaml) => emit(serde_yaml_ng::to_string(&response)?.trim_end())?,
                _ if response.services.is_empty() => eprintln!("No services found."),
                wide => emit(&services_table(&response.services, wide))?,
            }
        }
    }
    Ok(())
}

fn services_table(services: &[v1::Service], wide: Option<OutputFormat>) -> String {
    let wide = wide == Some(OutputFormat::Wide);
    let mut header = vec![
        "NAME",
        "NAMESPACE",
        "IMAGE",
        "REPLICAS",
        "GENERATION",
        "REVISION",
    ];
    if wide {
        header.extend(["PORTS", "LABELS"]);
    }
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|svc| {
            let meta = svc.metadata.clone().unwrap_or_default();
            let spec = svc.spec.as_deref().cloned().unwrap_or_default();
            let mut row = vec![
                meta.name,
                meta.namespace,
                spec.image,
                spec.replicas.to_string(),
                meta.generation.to_string(),
                meta.revision.to_string(),
            ];
            if wide {
                let ports: Vec<String> = spec
                    .ports
                    .iter()
                    .map(|p| match p.host_port {
                        0 => p.container_port.to_string(),
                        host => format!("{host}:{}", p.container_port),
                    })
                    .collect();
                let mut labels: Vec<String> = meta
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                labels.sort();
                row.push(ports.join(","));
                row.push(labels.join(","));
            }
            row
        })
        .collect();
    table(&header, &rows)
}

pub fn delete(global: &GlobalArgs, args: &ObjectArgs) -> anyhow::Result<()> {
    if args.files.is_empty() && matches!(args.kind.as_deref(), Some("node" | "nodes")) {
        let Some(name) = &args.name else {
            bail!("name the node to remove");
        };
        return super::cluster::remove_node(global, name);
    }
    let targets: Vec<(String, String)> = if args.files.is_empty() {
        check_kind(args.kind.as_deref())?;
        let Some(name) = &args.name else {
            bail!("name the service to delete, or give manifests with -f");
        };
        vec![(args.namespace.clone().unwrap_or_default(), name.clone())]
    } else {
        load(&args.files)?
            .into_iter()
            .filter_map(|s| s.metadata)
            .map(|m| (m.namespace, m.name))
            .collect()
    };
    let addrs = addresses(global);
    let mut failed = 0;
    for (namespace, name) in targets {
        let request = DeleteRequest {
            namespace,
            name: name.clone(),
        };
        let result = block_on(call(&addrs, |mut c| {
            let request = request.clone();
            async move { c.delete(request).await }
        }));
        match result {
            Ok(_) => emit(&format!("service/{name} deleted"))?,
            Err(err) => {
                eprintln!("tug: {err:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} service(s) could not be deleted");
    }
    Ok(())
}

pub fn cluster_status(global: &GlobalArgs) -> anyhow::Result<()> {
    let addrs = addresses(global);
    let status = block_on(call(&addrs, |mut c| async move {
        c.cluster_status(ClusterStatusRequest {}).await
    }))?;
    emit(&members_table(&status.members))?;
    let leader = match status.leader_id {
        0 => "none".to_string(),
        id => id.to_string(),
    };
    emit(&format!(
        "leader: {leader}  term: {}  commit: {}  applied: {}",
        status.term, status.commit_index, status.applied_index
    ))
}

fn members_table(members: &[Member]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            let role = if m.is_leader {
                "leader"
            } else if m.voter {
                "follower"
            } else {
                "learner"
            };
            vec![m.id.to_string(), m.address.clone(), role.to_string()]
        })
        .collect();
    table(&["ID", "ADDRESS", "ROLE"], &rows)
}

/// `tug controller add-member --id N --address ADDR`.
pub fn add_member(global: &GlobalArgs, id: u64, address: &str) -> anyhow::Result<()> {
    let addrs = addresses(global);
    let request = AddMemberRequest {
        id,
        address: address.to_string(),
    };
    let response = block_on(call(&addrs, |mut c| {
        let request = request.clone();
        async move { c.add_member(request).await }
    }))?;
    emit(&format!(
        "controller {id} added at {address} (revision {})",
        response.revision
    ))?;
    emit(&members_table(&response.members))
}

/// `tug controller remove-member --id N`.
pub fn remove_member(global: &GlobalArgs, id: u64) -> anyhow::Result<()> {
    let addrs = addresses(global);
    let response = block_on(call(&addrs, |mut c| async move {
        c.remove_member(RemoveMemberRequest { id }).await
    }))?;
    emit(&format!(
        "controller {id} removed (revision {})",
        response.revision
    ))?;
    emit(&members_table(&response.members))
}
