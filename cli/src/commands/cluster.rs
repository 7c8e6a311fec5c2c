//! The operator's cluster commands: `get tasks|nodes`, `nodes`, `drain`, `uncordon`, `scale`,
//! `rollout status|undo`. Thin: each is one or two Control calls and a table.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use tug_api::v1::{
    self, DesiredState, GetRequest, ListNodesRequest, ListTasksRequest, NodeAvailability,
    ReadOptions, RemoveNodeRequest, RolloutUndoRequest, ScaleRequest, SetNodeAvailabilityRequest,
    Task, TaskHealth, TaskState,
};

use tug_controller::state::{is_terminal, same_template};

use super::client::{addresses, block_on, call, emit};
use crate::args::{GlobalArgs, ObjectArgs, OutputFormat};
use crate::output::{bytes, table};

/// `k=v,k2=v2` into a map.
pub(super) fn parse_selector(text: Option<&str>) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for part in text
        .unwrap_or("")
        .split(',')
        .filter(|p| !p.trim().is_empty())
    {
        let Some((k, v)) = part.split_once('=') else {
            bail!("selector {part:?} is not KEY=VALUE (e.g. -l app=web)");
        };
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

pub(super) fn list_tasks(
    global: &GlobalArgs,
    request: ListTasksRequest,
) -> anyhow::Result<Vec<Task>> {
    let addrs = addresses(global);
    let response = block_on(call(&addrs, |mut c| {
        let request = request.clone();
        async move { c.list_tasks(request).await }
    }))?;
    Ok(response.tasks)
}

pub fn get_tasks(global: &GlobalArgs, args: &ObjectArgs) -> anyhow::Result<()> {
    let request = ListTasksRequest {
        namespace: args.namespace.clone().unwrap_or_default(),
        service: args
            .service
            .clone()
            .or(args.name.clone())
            .unwrap_or_default(),
        node: args.node.clone().unwrap_or_default(),
        label_selector: parse_selector(args.selector.as_deref())?,
        read: Some(ReadOptions { stale: args.stale }),
    };
    let tasks = list_tasks(global, request)?;
    match args.output {
        Some(OutputFormat::Json) => emit(&serde_json::to_string_pretty(&tasks)?),
        Some(OutputFormat::Yaml) => emit(serde_yaml_ng::to_string(&tasks)?.trim_end()),
        _ if tasks.is_empty() => {
            eprintln!("No tasks found.");
            Ok(())
        }
        _ => emit(&tasks_table(&tasks)),
    }
}

pub(super) fn tasks_table(tasks: &[Task]) -> String {
    let now = now_ms();
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let status = t.status.clone().unwrap_or_default();
            vec![
                t.id.clone(),
                format!("{}/{}", t.namespace, t.service),
                t.node.clone(),
                status.address.clone(),
                desired(t.desired_state()).into(),
                state(status.state()).into(),
                health(status.health()).into(),
                status.restart_count.to_string(),
                ago(now, status.updated_ms),
                status.message,
            ]
        })
        .collect();
    table(
        &[
            "ID", "SERVICE", "NODE", "ADDRESS", "DESIRED", "STATE", "HEALTH", "RESTARTS",
            "UPDATED", "MESSAGE",
        ],
        &rows,
    )
}

pub fn nodes(global: &GlobalArgs, output: Option<OutputFormat>, stale: bool) -> anyhow::Result<()> {
    let addrs = addresses(global);
    let response = block_on(call(&addrs, |mut c| async move {
        c.list_nodes(ListNodesRequest {
            read: Some(ReadOptions { stale }),
        })
        .await
    }))?;
    match output {
        Some(OutputFormat::Json) => return emit(&serde_json::to_string_pretty(&response.nodes)?),
        Some(OutputFormat::Yaml) => {
            return emit(serde_yaml_ng::to_string(&response.nodes)?.trim_end());
        }
        _ => {}
    }
    if response.nodes.is_empty() {
        eprintln!("No nodes registered.");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = response
        .nodes
        .iter()
        .map(|info| {
            let node = info.node.clone().unwrap_or_default();
            let desc = node.description.clone().unwrap_or_default();
            let cap = desc.capacity.unwrap_or_default();
            let alloc = info.allocated.unwrap_or_default();
            let mut labels: Vec<String> = desc
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            vec![
                desc.name,
                match node.state() {
                    v1::NodeState::Ready => "ready".into(),
                    v1::NodeState::Down => "down".into(),
                    v1::NodeState::Unspecified => "unknown".into(),
                },
                match node.availability() {
                    NodeAvailability::Drain => "drain".into(),
                    _ => "active".into(),
                },
                desc.address,
                node.subnet,
                format!("{}/{}", cpu(alloc.cpu_millis), cpu(cap.cpu_millis)),
                format!("{}/{}", bytes(alloc.memory_bytes), bytes(cap.memory_bytes)),
                info.tasks.to_string(),
                labels.join(","),
                node.message,
            ]
        })
        .collect();
    emit(&table(
        &[
            "NAME",
            "STATE",
            "AVAILABILITY",
            "ADDRESS",
            "SUBNET",
            "CPU",
            "MEMORY",
            "TASKS",
            "LABELS",
            "MESSAGE",
        ],
        &rows,
    ))
}

pub fn set_availability(
    global: &GlobalArgs,
    node: &str,
    availability: NodeAvailability,
) -> anyhow::Result<()> {
    let addrs = addresses(global);
    let request = SetNodeAvailabilityRequest {
        node: node.to_string(),
        availability: availability.into(),
    };
    block_on(call(&addrs, |mut c| {
        let request = request.clone();
        async move { c.set_node_availability(request).await }
    }))?;
    let what = match availability {
        NodeAvailability::Drain => "drained: its tasks move to other nodes",
        _ => "uncordoned: it takes new tasks again",
    };
    emit(&format!("node/{node} {what}"))
}

/// `tug delete node NAME`: forget a down node.
pub fn remove_node(global: &GlobalArgs, node: &str) -> anyhow::Result<()> {
    let addrs = addresses(global);
    let request = RemoveNodeRequest {
        node: node.to_string(),
    };
    block_on(call(&addrs, |mut c| {
        let request = request.clone();
        async move { c.remove_node(request).await }
    }))?;
    emit(&format!(
        "node/{node} removed: its subnet is free and the other nodes drop their routes to it"
    ))
}

pub fn scale(
    global: &GlobalArgs,
    namespace: Option<&str>,
    service: &str,
    replicas: u32,
) -> anyhow::Result<()> {
    let addrs = addresses(global);
    let request = ScaleRequest {
        namespace: namespace.unwrap_or_default().to_string(),
        name: service.to_string(),
        replicas,
    };
    block_on(call(&addrs, |mut c| {
        let request = request.clone();
        async move { c.scale(request).await }
    }))?;
    emit(&format!("service/{service} scaled to {replicas}"))
}

pub fn rollout_undo(
    global: &GlobalArgs,
    namespace: Option<&str>,
    service: &str,
) -> anyhow::Result<()> {
    let addrs = addresses(global);
    let request = RolloutUndoRequest {
        namespace: namespace.unwrap_or_default().to_string(),
        name: service.to_string(),
    };
    let response = block_on(call(&addrs, |mut c| {
        let request = request.clone();
        async move { c.rollout_undo(request).await }
    }))?;
    let generation = response.results.first().map_or(0, |r| r.generation);
    emit(&format!(
        "service/{service} rolled back (generation {generation})"
    ))
}

/// Where a rollout stands.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Progress {
    pub replicas: u32,
    /// Slots whose current-spec task is available.
    pub updated_available: u32,
    /// Live tasks of an older spec.
    pub old_live: u32,
    /// Current-spec tasks that failed.
    pub failed: Vec<String>,
}

impl Progress {
    pub fn done(&self) -> bool {
        self.updated_available >= self.replicas && self.old_live == 0
    }
}

pub(super) fn progress(spec: &v1::ServiceSpec, tasks: &[Task]) -> Progress {
    let mut p = Progress {
        replicas: spec.replicas,
        updated_available: 0,
        old_live: 0,
        failed: Vec::new(),
    };
    let mut slots = std::collections::BTreeSet::new();
    for t in tasks {
        let status = t.status.clone().unwrap_or_default();
        let live = t.desired_state() == DesiredState::Running && !is_terminal(status.state());
        let current = same_template(t.spec.as_deref(), Some(spec));
        if current && status.state() == TaskState::Failed {
            p.failed.push(format!("{}: {}", t.id, status.message));
        }
        if !live {
            continue;
        }
        if !current {
            p.old_live += 1;
            continue;
        }
        let healthy = matches!(
            status.health(),
            TaskHealth::Unspecified | TaskHealth::None | TaskHealth::Healthy
        );
        if status.state() == TaskState::Running && healthy && t.slot <= spec.replicas {
            slots.insert(t.slot);
        }
    }
    p.updated_available = slots.len() as u32;
    p
}

pub fn rollout_status(
    global: &GlobalArgs,
    namespace: Option<&str>,
    service: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let addrs = addresses(global);
    let namespace = namespace.unwrap_or_default().to_string();
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let get = GetRequest {
            namespace: namespace.clone(),
            name: service.to_string(),
            read: None,
        };
        let svc = block_on(call(&addrs, |mut c| {
            let get = get.clone();
            async move { c.get(get).await }
        }))?
        .service
        .ok_or_else(|| anyhow!("the controller answered without the service"))?;
        let spec = svc.spec.unwrap_or_default();
        let tasks = list_tasks(
            global,
            ListTasksRequest {
                namespace: namespace.clone(),
                service: service.to_string(),
                ..Default::default()
            },
        )?;
        let p = progress(&spec, &tasks);
        if p.done() {
            return emit(&format!(
                "service/{service} successfully rolled out ({} of {} replicas updated and available)",
                p.updated_available, p.replicas
            ));
        }
        let line = format!(
            "Waiting for service/{service} rollout: {} of {} updated replicas available, {} old still running",
            p.updated_available, p.replicas, p.old_live
        );
        if line != last {
            emit(&line)?;
            for f in &p.failed {
                emit(&format!("  failed: {f}"))?;
            }
            last = line;
        }
        if Instant::now() >= deadline {
            bail!("service/{service} did not finish rolling out within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ago(now: u64, then: u64) -> String {
    if then == 0 {
        return "-".into();
    }
    let s = now.saturating_sub(then) / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

pub(super) fn state(s: TaskState) -> &'static str {
    match s {
        TaskState::Unspecified => "unknown",
        TaskState::Pending => "pending",
        TaskState::Assigned => "assigned",
        TaskState::Pulling => "pulling",
        TaskState::Starting => "starting",
        TaskState::Running => "running",
        TaskState::Exited => "exited",
        TaskState::Failed => "failed",
        TaskState::Lost => "lost",
        TaskState::Stopped => "stopped",
    }
}

fn desired(d: DesiredState) -> &'static str {
    match d {
        DesiredState::Running => "running",
        DesiredState::Shutdown => "shutdown",
        DesiredState::Unspecified => "-",
    }
}

fn health(h: TaskHealth) -> &'static str {
    match h {
        TaskHealth::Healthy => "healthy",
        TaskHealth::Unhealthy => "unhealthy",
        TaskHealth::Starting => "starting",
        TaskHealth::None | TaskHealth::Unspecified => "-",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tug_api::v1::TaskStatus;

    fn task(slot: u32, image: &str, state: TaskState, desired: DesiredState) -> Task {
        Task {
            id: format!("web.{slot}.{image}"),
            slot,
            spec: Some(
                v1::ServiceSpec {
                    image: image.into(),
                    replicas: 1,
                    ..Default::default()
                }
                .into(),
            ),
            desired_state: desired.into(),
            status: Some(TaskStatus {
                state: state.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rollout_progress_counts_updated_available_slots_and_old_ones() {
        let spec = v1::ServiceSpec {
            image: "b".into(),
            replicas: 2,
            ..Default::default()
        };
        let mid = [
            task(1, "b", TaskState::Running, DesiredState::Running),
            task(1, "a", TaskState::Running, DesiredState::Shutdown),
            task(2, "a", TaskState::Running, DesiredState::Running),
            task(2, "b", TaskState::Starting, DesiredState::Running),
        ];
        let p = progress(&spec, &mid);
        assert_eq!((p.updated_available, p.old_live, p.done()), (1, 1, false));
        let end = [
            task(1, "b", TaskState::Running, DesiredState::Running),
            task(2, "b", TaskState::Running, DesiredState::Running),
            task(2, "a", TaskState::Stopped, DesiredState::Shutdown),
        ];
        assert!(progress(&spec, &end).done());
    }

    #[test]
    fn selectors_parse_or_fail_clearly() -> anyhow::Result<()> {
        let s = parse_selector(Some("app=web, tier=front"))?;
        assert_eq!(s.get("tier").map(String::as_str), Some("front"));
        assert!(parse_selector(Some("app")).is_err());
        assert!(parse_selector(None)?.is_empty());
        Ok(())
    }
}
