//! Manifests: the YAML operators write (`apiVersion: tug.dev/v1`, `kind: Service`), parsed and
//! validated with errors that name the file, line, column and field, and converted to the wire
//! types of `tug.v1`. A set of files is valid as a whole or not at all.

mod checked;
pub mod duration;
pub mod names;
pub mod quantity;
pub mod service;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use duration::HumanDuration;
pub use quantity::{Cpu, Memory};
pub use service::ServiceManifest;

use crate::v1;

/// One problem in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    /// 1-based; 0 when the problem has no single place (e.g. an unreadable file).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// Every problem found; nothing from these files may be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ManifestErrors {}

/// A valid manifest and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub file: String,
    pub line: usize,
    pub manifest: ServiceManifest,
}

/// Parse every document of `text` (named `file` in errors). Empty documents are skipped.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<Loaded>, ManifestErrors> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        match Option::<ServiceManifest>::deserialize(document) {
            Ok(Some(manifest)) => loaded.push(Loaded {
                file: file.to_string(),
                line: 0,
                manifest,
            }),
            Ok(None) => {}
            Err(e) => {
                // After an error the rest of the file cannot be trusted (and a syntax error
                // would be reported again for every later document): one error per file.
                errors.push(yaml_error(file, &e));
                break;
            }
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ManifestErrors(errors))
    }
}

/// Load files and directories (their `*.yaml` / `*.yml`, sorted, not recursive). All or nothing:
/// any error anywhere, or the same object twice, fails the whole set.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Loaded>, ManifestErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match expand(path) {
            Ok(found) => files.extend(found),
            Err(e) => errors.push(e),
        }
    }
    let mut loaded: Vec<Loaded> = Vec::new();
    for file in files {
        let name = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => match parse_str(&name, &text) {
                Ok(l) => loaded.extend(l),
                Err(ManifestErrors(e)) => errors.extend(e),
            },
            Err(e) => errors.push(ManifestError {
                file: name,
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    for (i, a) in loaded.iter().enumerate() {
        if let Some(b) = loaded[..i].iter().find(|b| {
            b.manifest.metadata.name == a.manifest.metadata.name
                && b.manifest.metadata.namespace == a.manifest.metadata.namespace
        }) {
            errors.push(ManifestError {
                file: a.file.clone(),
                line: 0,
                column: 0,
                message: format!(
                    "service {}/{} is also defined in {}",
                    a.manifest.metadata.namespace.0, a.manifest.metadata.name.0, b.file
                ),
            });
        }
    }
    if loaded.is_empty() && errors.is_empty() {
        errors.push(ManifestError {
            file: paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            line: 0,
            column: 0,
            message: "no manifests found".into(),
        });
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ManifestErrors(errors))
    }
}

fn expand(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let err = |message: String| ManifestError {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| err(format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// serde_yaml's message without its trailing " at line L column C", plus that place.
fn yaml_error(file: &str, e: &serde_yaml_ng::Error) -> ManifestError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let mut message = e.to_string();
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    ManifestError {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

impl ServiceManifest {
    /// The wire form sent to the controller.
    pub fn to_proto(&self) -> v1::Service {
        use service::{Probe, Protocol, RestartPolicy, UpdateOrder, VolumeSource};
        let s = &self.spec;
        v1::Service {
            metadata: Some(v1::ObjectMeta {
                name: self.metadata.name.0.clone(),
                namespace: self.metadata.namespace.0.clone(),
                labels: self.metadata.labels.clone().into_iter().collect(),
                ..Default::default()
            }),
            spec: Some(
                v1::ServiceSpec {
                    image: s.image.clone(),
                    replicas: s.replicas,
                    command: s.command.clone(),
                    args: s.args.clone(),
                    env: s
                        .env
                        .iter()
                        .map(|e| v1::EnvVar {
                            name: e.name.clone(),
                            value: e.value.clone(),
                        })
                        .collect(),
                    ports: s
                        .ports
                        .iter()
                        .map(|p| v1::PortSpec {
                            name: p.name.clone().unwrap_or_default(),
                            container_port: p.container_port.into(),
                            host_port: p.host_port.map(u32::from).unwrap_or(0),
                            protocol: match p.protocol {
                                Protocol::Tcp => v1::port_spec::Protocol::Tcp,
                                Protocol::Udp => v1::port_spec::Protocol::Udp,
                            }
                            .into(),
                        })
                        .collect(),
                    resources: Some(v1::Resources {
                        cpu_millis: s.resources.cpu.map(|c| c.0).unwrap_or(0),
                        memory_bytes: s.resources.memory.map(|m| m.0).unwrap_or(0),
                    }),
                    volumes: s
                        .volumes
                        .iter()
                        .map(|v| v1::VolumeMount {
                            source: Some(match &v.source {
                                VolumeSource::HostPath(p) => {
                                    v1::volume_mount::Source::HostPath(p.clone())
                                }
                                VolumeSource::Name(n) => {
                                    v1::volume_mount::Source::Named(n.0.clone())
                                }
                            }),
                            container_path: v.container_path.clone(),
                            read_only: v.read_only,
                        })
                        .collect(),
                    restart_policy: match s.restart_policy {
                        RestartPolicy::Always => v1::RestartPolicy::Always,
                        RestartPolicy::OnFailure => v1::RestartPolicy::OnFailure,
                        RestartPolicy::Never => v1::RestartPolicy::Never,
                    }
                    .into(),
                    health_check: s.health_check.as_ref().map(|h| {
                        Box::new(v1::HealthCheck {
                            probe: Some(match &h.probe {
                                Probe::Exec { command } => {
                                    v1::health_check::Probe::Exec(v1::health_check::Exec {
                                        command: command.clone(),
                                    })
                                }
                                Probe::Http { path, port } => {
                                    v1::health_check::Probe::Http(v1::health_check::Http {
                                        path: path.clone(),
                                        port: (*port).into(),
                                    })
                                }
                                Probe::Tcp { port } => {
                                    v1::health_check::Probe::Tcp(v1::health_check::Tcp {
                                        port: (*port).into(),
                                    })
                                }
                            }),
                            interval_ms: h.interval.as_millis(),
                            timeout_ms: h.timeout.as_millis(),
                            retries: h.retries,
                        })
                    }),
                    stop_grace_period_ms: s.stop_grace_period.as_millis(),
                    placement: Some(v1::Placement {
                        constraints: s
                            .placement
                            .constraints
                            .iter()
                            .cloned()
                            .map(String::from)
                            .collect(),
                        spread: s.placement.spread.clone().unwrap_or_default(),
                        binpack: s.placement.strategy == service::PlacementStrategy::Binpack,
                    }),
                    update: Some(v1::UpdatePolicy {
                        max_surge: s.update.max_surge,
                        max_unavailable: s.update.max_unavailable,
                        order: match s.update.order {
                            UpdateOrder::StopFirst => v1::update_policy::Order::StopFirst,
                            UpdateOrder::StartFirst => v1::update_policy::Order::StartFirst,
                        }
                        .into(),
                    }),
                }
                .into(),
            ),
            previous_spec: None,
        }
    }
}

#[cfg(test)]
mod tests;
