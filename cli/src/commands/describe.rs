//! `tug describe service NAME [-n NS]`: one service's metadata and whole spec as aligned
//! `Key: value` lines, then its tasks: where each runs, its state, and for a task that fits
//! nowhere, why ("0/3 nodes available: 2 insufficient memory, 1 drained").

use std::fmt::Write as _;

use anyhow::bail;
use tug_api::v1::{
    self, GetRequest, ReadOptions, health_check, port_spec, update_policy, volume_mount,
};

use super::client::{addresses, block_on, call, check_kind, emit};
use crate::args::{GlobalArgs, ObjectArgs};

/// Width of the key column.
const KEY_WIDTH: usize = 20;

pub fn describe(global: &GlobalArgs, args: &ObjectArgs) -> anyhow::Result<()> {
    check_kind(args.kind.as_deref())?;
    let Some(name) = &args.name else {
        bail!("name the service to describe, e.g. `tug describe service web`");
    };
    let request = GetRequest {
        namespace: args.namespace.clone().unwrap_or_default(),
        name: name.clone(),
        read: Some(ReadOptions { stale: args.stale }),
    };
    let addrs = addresses(global);
    let response = block_on(call(&addrs, |mut c| {
        let request = request.clone();
        async move { c.get(request).await }
    }))?;
    let Some(service) = response.service else {
        bail!("the controller answered without the service");
    };
    let tasks = super::cluster::list_tasks(
        global,
        v1::ListTasksRequest {
            namespace: args.namespace.clone().unwrap_or_default(),
            service: name.clone(),
            read: Some(ReadOptions { stale: args.stale }),
            ..Default::default()
        },
    )?;
    let mut text = render(&service);
    text.push_str(&render_tasks(&service, &tasks));
    emit(text.trim_end())
}

/// The Tasks section: counts, pending reasons, then the task table.
fn render_tasks(service: &v1::Service, tasks: &[v1::Task]) -> String {
    let mut out = Lines::default();
    let spec = service.spec.clone().unwrap_or_default();
    let p = super::cluster::progress(&spec, tasks);
    let running = tasks
        .iter()
        .filter(|t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.state() == v1::TaskState::Running)
        })
        .filter(|t| t.desired_state() == v1::DesiredState::Running)
        .count();
    out.kv(
        0,
        "Replicas",
        format!(
            "{} desired, {running} running, {} updated and available",
            spec.replicas, p.updated_available
        ),
    );
    let mut reasons: Vec<String> = tasks
        .iter()
        .filter_map(|t| t.status.as_ref())
        .filter(|s| s.state() == v1::TaskState::Pending && !s.message.is_empty())
        .map(|s| s.message.clone())
        .collect();
    reasons.dedup();
    for reason in reasons {
        out.kv(0, "Pending", reason);
    }
    if tasks.is_empty() {
        out.kv(0, "Tasks", "<none>");
        return out.0;
    }
    out.heading(0, "Tasks");
    let mut text = out.0;
    for line in super::cluster::tasks_table(tasks).lines() {
        let _ = writeln!(text, "  {line}");
    }
    text
}

/// Aligned lines: `indent` levels of two spaces, then the key padded to the key column.
#[derive(Default)]
struct Lines(String);

impl Lines {
    fn kv(&mut self, indent: usize, key: &str, value: impl std::fmt::Display) {
        let pad = " ".repeat(indent * 2);
        let key = format!("{key}:");
        let width = KEY_WIDTH.saturating_sub(indent * 2);
        let _ = writeln!(self.0, "{pad}{key:<width$} {value}");
    }

    fn heading(&mut self, indent: usize, key: &str) {
        let pad = " ".repeat(indent * 2);
        let _ = writeln!(self.0, "{pad}{key}:");
    }

    fn item(&mut self, indent: usize, text: impl std::fmt::Display) {
        let pad = " ".repeat(indent * 2);
        let _ = writeln!(self.0, "{pad}{text}");
    }

    /// `key:` then one line per item, or `key: <none>`.
    fn list(&mut self, indent: usize, key: &str, items: &[String]) {
        if items.is_empty() {
            self.kv(indent, key, "<none>");
        } else {
            self.heading(indent, key);
            for item in items {
                self.item(indent + 1, item);
            }
        }
    }
}

fn render(service: &v1::Service) -> String {
    let mut out = Lines::default();
    let meta = service.metadata.clone().unwrap_or_default();
    out.kv(0, "Name", &meta.name);
    out.kv(0, "Namespace", &meta.namespace);
    let mut labels: Vec<String> = meta
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    labels.sort();
    if labels.is_empty() {
        out.kv(0, "Labels", "<none>");
    } else {
        out.kv(0, "Labels", labels.join(", "));
    }
    out.kv(0, "Generation", meta.generation);
    out.kv(0, "Revision", meta.revision);
    out.kv(0, "Created at revision", meta.create_revision);
    match &service.spec {
        Some(spec) => {
            out.heading(0, "Spec");
            render_spec(&mut out, spec);
        }
        None => out.kv(0, "Spec", "<none>"),
    }
    out.0
}

fn render_spec(out: &mut Lines, spec: &v1::ServiceSpec) {
    out.kv(1, "Image", &spec.image);
    out.kv(1, "Replicas", spec.replicas);
    out.kv(1, "Command", words(&spec.command));
    out.kv(1, "Args", words(&spec.args));
    let env: Vec<String> = spec
        .env
        .iter()
        .map(|e| format!("{}={}", e.name, e.value))
        .collect();
    out.list(1, "Env", &env);
    let ports: Vec<String> = spec.ports.iter().map(port).collect();
    out.list(1, "Ports", &ports);
    let resources = spec.resources.unwrap_or_default();
    out.kv(
        1,
        "Resources",
        format!(
            "cpu {}, memory {}",
            cpu(resources.cpu_millis),
            memory(resources.memory_bytes)
        ),
    );
    let volumes: Vec<String> = spec.volumes.iter().map(volume).collect();
    out.list(1, "Volumes", &volumes);
    let restart = match spec.restart_policy() {
        v1::RestartPolicy::Always => "Always",
        v1::RestartPolicy::OnFailure => "OnFailure",
        v1::RestartPolicy::Never => "Never",
        v1::RestartPolicy::Unspecified => "<default>",
    };
    out.kv(1, "Restart policy", restart);
    match &spec.health_check {
        Some(check) => {
            out.heading(1, "Health check");
            health(out, check);
        }
        None => out.kv(1, "Health check", "<none>"),
    }
    out.kv(
        1,
        "Stop grace period",
        match spec.stop_grace_period_ms {
            0 => "<default>".to_string(),
            ms => duration(ms),
        },
    );
    let placement = spec.placement.clone().unwrap_or_default();
    out.heading(1, "Placement");
    out.list(2, "Constraints", &placement.constraints);
    out.kv(
        2,
        "Spread",
        if placement.spread.is_empty() {
            "<none>"
        } else {
            placement.spread.as_str()
        },
    );
    let update = spec.update.unwrap_or_default();
    out.heading(1, "Update");
    out.kv(2, "Max surge", update.max_surge);
    out.kv(2, "Max unavailable", update.max_unavailable);
    let order = match update.order() {
        update_policy::Order::StopFirst => "stop-first",
        update_policy::Order::StartFirst => "start-first",
        update_policy::Order::Unspecified => "<default>",
    };
    out.kv(2, "Order", order);
}

fn health(out: &mut Lines, check: &v1::HealthCheck) {
    let probe = match &check.probe {
        Some(health_check::Probe::Exec(exec)) => format!("exec {}", words(&exec.command)),
        Some(health_check::Probe::Http(http)) => format!("http GET :{}{}", http.port, http.path),
        Some(health_check::Probe::Tcp(tcp)) => format!("tcp :{}", tcp.port),
        None => "<none>".to_string(),
    };
    out.kv(2, "Probe", probe);
    out.kv(2, "Interval", duration(check.interval_ms));
    out.kv(2, "Timeout", duration(check.timeout_ms));
    out.kv(2, "Retries", check.retries);
}

/// `["a", "b c"]` as `a "b c"`; none as `<none>`.
fn words(items: &[String]) -> String {
    if items.is_empty() {
        return "<none>".into();
    }
    items
        .iter()
        .map(|w| {
            if w.is_empty() || w.chars().any(|c| c.is_whitespace() || c == '"') {
                format!("{w:?}")
            } else {
                w.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn port(p: &v1::PortSpec) -> String {
    let protocol = match p.protocol() {
        port_spec::Protocol::Udp => "UDP",
        port_spec::Protocol::Tcp | port_spec::Protocol::Unspecified => "TCP",
    };
    let mut text = format!("{}/{protocol}", p.container_port);
    if !p.name.is_empty() {
        text = format!("{} {text}", p.name);
    }
    if p.host_port != 0 {
        let _ = write!(text, " (published on the node's port {})", p.host_port);
    }
    text
}

fn volume(v: &v1::VolumeMount) -> String {
    let source = match &v.source {
        Some(volume_mount::Source::HostPath(path)) => format!("host path {path}"),
        Some(volume_mount::Source::Named(name)) => format!("volume {name}"),
        None => "<no source>".to_string(),
    };
    let mode = if v.read_only { "ro" } else { "rw" };
    format!("{source} -> {} ({mode})", v.container_path)
}

fn cpu(millis: u64) -> String {
    match millis {
        0 => "unlimited".into(),
        m if m.is_multiple_of(1000) => (m / 1000).to_string(),
        m => format!("{m}m"),
    }
}

fn memory(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    if bytes == 0 {
        return "unlimited".into();
    }
    for (unit, size) in UNITS {
        if bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

fn duration(ms: u64) -> String {
    match ms {
        0 => "0s".into(),
        ms if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        ms if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        ms if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_and_durations_read_like_manifests() {
        assert_eq!(cpu(500), "500m");
        assert_eq!(cpu(2000), "2");
        assert_eq!(memory(128 << 20), "128Mi");
        assert_eq!(memory(1000), "1000");
        assert_eq!(duration(1500), "1500ms");
        assert_eq!(duration(30_000), "30s");
        assert_eq!(duration(120_000), "2m");
        assert_eq!(
            words(&["sh".into(), "-c".into(), "echo hi".into()]),
            "sh -c \"echo hi\""
        );
    }

    #[test]
    fn a_service_renders_its_metadata_and_spec() {
        let service = v1::Service {
            metadata: Some(v1::ObjectMeta {
                name: "web".into(),
                namespace: "default".into(),
                labels: [("app".to_string(), "web".to_string())].into(),
                create_revision: 3,
                revision: 7,
                generation: 2,
            }),
            spec: Some(
                v1::ServiceSpec {
                    image: "nginx:1.25".into(),
                    replicas: 3,
                    ..Default::default()
                }
                .into(),
            ),
            previous_spec: None,
        };
        let text = render(&service);
        for want in [
            "Name:                web",
            "Labels:              app=web",
            "Generation:          2",
            "Revision:            7",
            "Created at revision: 3",
            "  Image:             nginx:1.25",
            "  Replicas:          3",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        let task = |slot: u32, node: &str, state: v1::TaskState, message: &str| v1::Task {
            id: format!("web.{slot}.x"),
            namespace: "default".into(),
            service: "web".into(),
            slot,
            node: node.into(),
            spec: service.spec.clone(),
            desired_state: v1::DesiredState::Running.into(),
            status: Some(v1::TaskStatus {
                state: state.into(),
                message: message.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let reason = "0/2 nodes available: 2 insufficient memory";
        let tasks = [
            task(1, "n1", v1::TaskState::Running, ""),
            task(2, "", v1::TaskState::Pending, reason),
            task(3, "", v1::TaskState::Pending, reason),
        ];
        let text = render_tasks(&service, &tasks);
        for want in [
            format!(
                "{:<20} 3 desired, 1 running, 1 updated and available",
                "Replicas:"
            ),
            format!("{:<20} {reason}", "Pending:"),
            "Tasks:".to_string(),
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "{want:?} missing from:\n{text}"
            );
        }
        assert_eq!(
            text.matches(reason).count(),
            3,
            "once as the reason, twice in the table"
        );
    }
}
