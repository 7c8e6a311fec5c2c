//! `kind: Service` manifests: what an operator writes, validated while it is parsed so every
//! error carries its line and column.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize};

use super::checked;
use super::duration::HumanDuration;
use super::names::{check_dns_label, check_env_name, check_label_key, check_label_value};
use super::quantity::{Cpu, Memory};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiVersion {
    #[serde(rename = "tug.dev/v1")]
    V1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Service,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceManifest {
    pub api_version: ApiVersion,
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: ServiceSpec,
}

/// A DNS-1123 label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked::string(
            d,
            |s| check_dns_label("name", s).map(|()| Name(s.to_string())),
            "a name",
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: Name,
    #[serde(default = "default_namespace")]
    pub namespace: Name,
    #[serde(default, deserialize_with = "labels")]
    pub labels: BTreeMap<String, String>,
}

fn default_namespace() -> Name {
    Name("default".into())
}

fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let map = BTreeMap::<String, String>::deserialize(d)?;
    for (k, v) in &map {
        check_label_key(k)
            .and_then(|()| check_label_value(k, v))
            .map_err(serde::de::Error::custom)?;
    }
    Ok(map)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(deserialize_with = "image")]
    pub image: String,
    #[serde(default = "one", deserialize_with = "replicas")]
    pub replicas: u32,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default, deserialize_with = "env")]
    pub env: Vec<EnvVar>,
    #[serde(default, deserialize_with = "ports")]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    #[serde(default = "ten_seconds")]
    pub stop_grace_period: HumanDuration,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub update: UpdatePolicy,
}

fn one() -> u32 {
    1
}

fn ten_seconds() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}

fn image<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked::string(
        d,
        |s| match oci_spec::distribution::Reference::try_from(s) {
            Ok(_) => Ok(s.to_string()),
            Err(e) => Err(format!("invalid image reference {s:?}: {e}")),
        },
        "an image reference",
    )
}

fn replicas<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    checked::integer(
        d,
        |n| {
            u32::try_from(n)
                .map_err(|_| format!("replicas must be between 0 and {}, got {n}", u32::MAX))
        },
        "a number of replicas",
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    #[serde(deserialize_with = "env_name")]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

fn env_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked::string(
        d,
        |s| check_env_name(s).map(|()| s.to_string()),
        "an environment variable name",
    )
}

fn env<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EnvVar>, D::Error> {
    let vars = Vec::<EnvVar>::deserialize(d)?;
    let mut seen = BTreeSet::new();
    for v in &vars {
        if !seen.insert(&v.name) {
            return Err(serde::de::Error::custom(format!(
                "environment variable {:?} is set twice",
                v.name
            )));
        }
    }
    Ok(vars)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Port {
    #[serde(default, deserialize_with = "opt_port_name")]
    pub name: Option<String>,
    #[serde(deserialize_with = "port_number")]
    pub container_port: u16,
    #[serde(default, deserialize_with = "opt_port_number")]
    pub host_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

fn port_number<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    checked::integer(
        d,
        |n| match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("port {n} is out of range 1-65535")),
        },
        "a port number",
    )
}

fn opt_port_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    port_number(d).map(Some)
}

fn opt_port_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked::string(
        d,
        |s| check_dns_label("port name", s).map(|()| Some(s.to_string())),
        "a port name",
    )
}

fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Port>, D::Error> {
    let ports = Vec::<Port>::deserialize(d)?;
    let (mut container, mut host, mut names) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for p in &ports {
        let proto = if p.protocol == Protocol::Tcp {
            "TCP"
        } else {
            "UDP"
        };
        if !container.insert((p.container_port, p.protocol)) {
            return Err(serde::de::Error::custom(format!(
                "duplicate port: containerPort {}/{proto} is listed twice",
                p.container_port
            )));
        }
        if let Some(h) = p.host_port
            && !host.insert((h, p.protocol))
        {
            return Err(serde::de::Error::custom(format!(
                "duplicate port: hostPort {h}/{proto} is listed twice"
            )));
        }
        if let Some(n) = &p.name
            && !names.insert(n.clone())
        {
            return Err(serde::de::Error::custom(format!(
                "duplicate port name {n:?}"
            )));
        }
    }
    Ok(ports)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub cpu: Option<Cpu>,
    #[serde(default)]
    pub memory: Option<Memory>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", try_from = "RawVolume")]
pub struct Volume {
    pub source: VolumeSource,
    pub container_path: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VolumeSource {
    /// A directory of the node.
    HostPath(String),
    /// A named volume kept in the agent's data dir; it outlives containers.
    Name(Name),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawVolume {
    #[serde(default)]
    name: Option<Name>,
    #[serde(default)]
    host_path: Option<String>,
    container_path: String,
    #[serde(default)]
    read_only: bool,
}

impl TryFrom<RawVolume> for Volume {
    type Error = String;
    fn try_from(v: RawVolume) -> Result<Volume, String> {
        if !v.container_path.starts_with('/') {
            return Err(format!(
                "volume containerPath {:?} must be an absolute path",
                v.container_path
            ));
        }
        let source = match (v.name, v.host_path) {
            (Some(n), None) => VolumeSource::Name(n),
            (None, Some(h)) if h.starts_with('/') => VolumeSource::HostPath(h),
            (None, Some(h)) => {
                return Err(format!("volume hostPath {h:?} must be an absolute path"));
            }
            _ => {
                return Err(format!(
                    "volume at {:?} needs exactly one of name or hostPath",
                    v.container_path
                ));
            }
        };
        Ok(Volume {
            source,
            container_path: v.container_path,
            read_only: v.read_only,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Probe {
    Exec { command: Vec<String> },
    Http { path: String, port: u16 },
    Tcp { port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawHealthCheck")]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    pub retries: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    #[serde(default)]
    exec: Option<RawExec>,
    #[serde(default)]
    http: Option<RawHttp>,
    #[serde(default)]
    tcp: Option<RawTcp>,
    #[serde(default)]
    interval: Option<HumanDuration>,
    #[serde(default)]
    timeout: Option<HumanDuration>,
    #[serde(default)]
    retries: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    command: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default = "slash")]
    path: String,
    #[serde(deserialize_with = "port_number")]
    port: u16,
}

fn slash() -> String {
    "/".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    #[serde(deserialize_with = "port_number")]
    port: u16,
}

impl TryFrom<RawHealthCheck> for HealthCheck {
    type Error = String;
    fn try_from(h: RawHealthCheck) -> Result<HealthCheck, String> {
        let probe = match (h.exec, h.http, h.tcp) {
            (Some(e), None, None) if !e.command.is_empty() => Probe::Exec { command: e.command },
            (Some(_), None, None) => {
                return Err("healthCheck.exec.command must not be empty".into());
            }
            (None, Some(h), None) if h.path.starts_with('/') => Probe::Http {
                path: h.path,
                port: h.port,
            },
            (None, Some(h), None) => {
                return Err(format!(
                    "healthCheck.http.path {:?} must start with '/'",
                    h.path
                ));
            }
            (None, None, Some(t)) => Probe::Tcp { port: t.port },
            _ => return Err("healthCheck needs exactly one of exec, http or tcp".into()),
        };
        let interval = h
            .interval
            .unwrap_or(HumanDuration(std::time::Duration::from_secs(10)));
        let timeout = h
            .timeout
            .unwrap_or(HumanDuration(std::time::Duration::from_secs(1)));
        if interval.0.is_zero() || timeout.0.is_zero() {
            return Err("healthCheck interval and timeout must be more than zero".into());
        }
        if timeout > interval {
            return Err(format!(
                "healthCheck timeout {timeout} is longer than its interval {interval}"
            ));
        }
        Ok(HealthCheck {
            probe,
            interval,
            timeout,
            retries: h.retries.unwrap_or(3).max(1),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Constraint {
    pub key: String,
    pub equal: bool,
    pub value: String,
}

impl<'de> Deserialize<'de> for Constraint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked::string(d, Constraint::parse, "a constraint such as zone==a")
    }
}

impl Constraint {
    pub fn parse(s: &str) -> Result<Constraint, String> {
        let (key, equal, value) = if let Some((k, v)) = s.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = s.split_once("!=") {
            (k, false, v)
        } else {
            return Err(format!(
                "invalid constraint {s:?}: write LABEL==VALUE or LABEL!=VALUE"
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        check_label_key(key)
            .and_then(|()| check_label_value(key, value))
            .map_err(|e| format!("invalid constraint {s:?}: {e}"))?;
        Ok(Constraint {
            key: key.into(),
            equal,
            value: value.into(),
        })
    }
}

impl From<Constraint> for String {
    fn from(c: Constraint) -> String {
        format!("{}{}{}", c.key, if c.equal { "==" } else { "!=" }, c.value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Spread replicas across the values of this node label.
    #[serde(default)]
    pub spread: Option<String>,
    /// Spread replicas across nodes (the default) or pack them onto the fewest nodes.
    #[serde(default)]
    pub strategy: PlacementStrategy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementStrategy {
    #[default]
    Spread,
    Binpack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    StopFirst,
    #[default]
    StartFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawUpdate")]
pub struct UpdatePolicy {
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub order: UpdateOrder,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            max_surge: 1,
            max_unavailable: 0,
            order: UpdateOrder::StartFirst,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawUpdate {
    #[serde(default)]
    max_surge: Option<u32>,
    #[serde(default)]
    max_unavailable: Option<u32>,
    #[serde(default)]
    order: UpdateOrder,
}

impl TryFrom<RawUpdate> for UpdatePolicy {
    type Error = String;
    fn try_from(u: RawUpdate) -> Result<UpdatePolicy, String> {
        let d = UpdatePolicy::default();
        let p = UpdatePolicy {
            max_surge: u.max_surge.unwrap_or(d.max_surge),
            max_unavailable: u.max_unavailable.unwrap_or(d.max_unavailable),
            order: u.order,
        };
        if p.max_surge == 0 && p.max_unavailable == 0 {
            return Err("update: maxSurge and maxUnavailable cannot both be 0 (the rollout could never make progress)".into());
        }
        Ok(p)
    }
}
