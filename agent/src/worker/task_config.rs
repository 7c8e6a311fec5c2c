//! A task's spec as a container: command and args, env, cgroup limits, volumes, annotations
//! that mark the container as the task's (`tug.task`, `tug.namespace`, `tug.service`), and the
//! runtime options. Pure but for creating named volume dirs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tug_api::v1::volume_mount::Source;
use tug_api::v1::{ServiceSpec, Task};

use super::launch::Launch;
use crate::runtime::cgroups::Resources;
use crate::runtime::spec::{ContainerConfig, VolumeMount};
use crate::runtime::state::RuntimeOptions;

/// The annotation naming the task a container runs; containers without it are not the
/// worker's (`tug run` makes containers in the same data dir).
pub const TASK_ANNOTATION: &str = "tug.task";

/// Grace between SIGTERM and SIGKILL when the spec gives none.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// The task's stop grace period.
pub(crate) fn grace(spec: Option<&ServiceSpec>) -> Duration {
    match spec.map(|s| s.stop_grace_period_ms) {
        Some(ms) if ms > 0 => Duration::from_millis(ms),
        _ => DEFAULT_GRACE,
    }
}

/// cgroup limits: millicores become a CFS quota over a 100 ms period; zero means unlimited.
pub(crate) fn resources(spec: &ServiceSpec) -> Resources {
    let r = spec.resources.unwrap_or_default();
    Resources {
        memory_limit: (r.memory_bytes > 0).then_some(r.memory_bytes),
        cpu_quota: (r.cpu_millis > 0).then(|| {
            (
                i64::try_from(r.cpu_millis.saturating_mul(100)).unwrap_or(i64::MAX),
                100_000,
            )
        }),
        ..Resources::default()
    }
}

/// Everything `launch::create` needs for `task`; `Err` is one sentence for the task's FAILED
/// status.
pub fn launch_of(
    task: &Task,
    data_dir: &Path,
    oci_runtime: Option<&PathBuf>,
) -> Result<Launch, String> {
    let spec = task
        .spec
        .as_ref()
        .ok_or_else(|| "the task has no spec".to_string())?;
    let mut volumes = Vec::new();
    for v in &spec.volumes {
        let source = match &v.source {
            Some(Source::HostPath(p)) => {
                let p = PathBuf::from(p);
                if !p.is_absolute() || !p.exists() {
                    return Err(format!(
                        "volume {}: host path {} does not exist on this node",
                        v.container_path,
                        p.display()
                    ));
                }
                p
            }
            Some(Source::Named(name)) => {
                tug_api::manifest::names::check_dns_label("volume name", name)
                    .map_err(|e| format!("volume {}: {e}", v.container_path))?;
                let p = data_dir.join("volumes").join(name);
                std::fs::create_dir_all(&p)
                    .map_err(|e| format!("create volume {}: {e}", p.display()))?;
                p
            }
            None => return Err(format!("volume {} has no source", v.container_path)),
        };
        volumes.push(VolumeMount {
            source,
            destination: v.container_path.clone(),
            read_only: v.read_only,
        });
    }
    let resources = resources(spec);
    resources
        .validate()
        .map_err(|e| format!("invalid resources: {e}"))?;
    let config = ContainerConfig {
        command: (!spec.command.is_empty()).then(|| spec.command.clone()),
        args: (!spec.args.is_empty()).then(|| spec.args.clone()),
        env: spec
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect(),
        workdir: None,
        user: None,
        hostname: hostname_of(task),
        volumes,
        resources: resources.clone(),
    };
    let annotations = BTreeMap::from([
        (TASK_ANNOTATION.to_string(), task.id.clone()),
        ("tug.namespace".to_string(), task.namespace.clone()),
        ("tug.service".to_string(), task.service.clone()),
        ("tug.image".to_string(), spec.image.clone()),
    ]);
    Ok(Launch {
        id: task.id.clone(),
        config,
        annotations,
        options: RuntimeOptions {
            cgroup_path: format!("tug/{}", task.id),
            resources,
            log_max_bytes: 10 << 20,
            log_max_files: 3,
            network_hook: None,
            oci_runtime: oci_runtime.cloned(),
        },
    })
}

/// A task's container host name: its id (host names are at most 64 bytes).
pub fn hostname_of(task: &Task) -> String {
    task.id.chars().take(63).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tug_api::v1::{EnvVar, Resources as ApiResources, VolumeMount as ApiVolume};

    #[test]
    fn a_task_spec_becomes_a_container() -> Result<(), Box<dyn std::error::Error>> {
        let data = tempfile::tempdir()?;
        let task = Task {
            id: "web.1.ab".into(),
            namespace: "shop".into(),
            service: "web".into(),
            spec: Some(
                ServiceSpec {
                    image: "busybox".into(),
                    command: vec!["httpd".into()],
                    args: vec!["-f".into()],
                    env: vec![EnvVar {
                        name: "A".into(),
                        value: "1".into(),
                    }],
                    resources: Some(ApiResources {
                        cpu_millis: 500,
                        memory_bytes: 64 << 20,
                    }),
                    volumes: vec![ApiVolume {
                        source: Some(Source::Named("data".into())),
                        container_path: "/data".into(),
                        read_only: true,
                    }],
                    stop_grace_period_ms: 2500,
                    ..Default::default()
                }
                .into(),
            ),
            ..Default::default()
        };
        let l = launch_of(&task, data.path(), None)?;
        assert_eq!(l.id, "web.1.ab");
        assert_eq!(l.config.command, Some(vec!["httpd".to_string()]));
        assert_eq!(l.config.args, Some(vec!["-f".to_string()]));
        assert_eq!(l.config.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(l.options.resources.cpu_quota, Some((50_000, 100_000)));
        assert_eq!(l.options.resources.memory_limit, Some(64 << 20));
        assert_eq!(l.config.volumes[0].source, data.path().join("volumes/data"));
        assert!(data.path().join("volumes/data").is_dir());
        assert_eq!(
            l.annotations.get(TASK_ANNOTATION).map(String::as_str),
            Some("web.1.ab")
        );
        assert_eq!(l.options.cgroup_path, "tug/web.1.ab");
        assert_eq!(grace(task.spec.as_deref()), Duration::from_millis(2500));
        assert_eq!(grace(None), DEFAULT_GRACE);

        let mut bad = task.clone();
        if let Some(s) = bad.spec.as_mut().map(tug_api::shared::Shared::make_mut) {
            s.volumes[0].source = Some(Source::HostPath("/no/such/dir/here".into()));
        }
        let err = launch_of(&bad, data.path(), None).err().unwrap_or_default();
        assert!(err.contains("does not exist"), "{err}");
        Ok(())
    }
}
