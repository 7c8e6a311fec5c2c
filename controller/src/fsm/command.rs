//! The commands carried by normal log entries: one type byte, then the prost-encoded body.
//!
//! The type byte is append-only: a value, once released, keeps its meaning forever; new commands
//! take the next free value. A type this replica does not know stops it (its state would diverge),
//! unless the writer set [`IGNORE_UNKNOWN`], which marks a command older replicas may skip.

use prost::Message;
use prost::encoding::message;
use tug_api::v1::{NodeAvailability, NodeDescription, NodeState, Service, TaskStatusUpdate};

use crate::state::Plan;

/// Set on the type byte: replicas that do not know the type skip the entry instead of stopping.
pub const IGNORE_UNKNOWN: u8 = 0x80;

/// The first byte of a command entry. Append only: never renumber or reuse a value.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandType {
    /// Changes nothing; a barrier (its apply proves every earlier entry is applied).
    Noop = 0,
    /// Create-or-update a batch of services.
    ApplyServices = 1,
    /// Delete one service.
    DeleteService = 2,
    /// An agent registered (or re-registered) its node.
    RegisterNode = 3,
    /// The leader's liveness check marked a node down (or up).
    SetNodeState = 4,
    /// Drain or uncordon a node.
    SetNodeAvailability = 5,
    /// One reconcile pass: tasks created, placed, stopped, removed.
    ApplyPlan = 6,
    /// A batch of task status reports from one node.
    ReportStatus = 7,
    /// Set a service's replica count.
    ScaleService = 8,
    /// Make a service's previous spec current again.
    UndoService = 9,
    /// Forget a down node (`tug delete node NAME`), freeing its subnet.
    RemoveNode = 10,
}

impl CommandType {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Self::Noop,
            1 => Self::ApplyServices,
            2 => Self::DeleteService,
            3 => Self::RegisterNode,
            4 => Self::SetNodeState,
            5 => Self::SetNodeAvailability,
            6 => Self::ApplyPlan,
            7 => Self::ReportStatus,
            8 => Self::ScaleService,
            9 => Self::UndoService,
            10 => Self::RemoveNode,
            _ => return None,
        })
    }
}

/// Body of [`CommandType::RegisterNode`]. Time is fixed by the leader so apply is deterministic.
#[derive(Clone, PartialEq, Message)]
pub struct RegisterNodeBody {
    #[prost(message, optional, tag = "1")]
    pub node: Option<NodeDescription>,
    #[prost(uint64, tag = "2")]
    pub now_ms: u64,
    /// The leader's `--cluster-cidr` and node subnet prefix: fix the cluster network if no
    /// earlier registration did (empty: none given).
    #[prost(string, tag = "3")]
    pub cluster_cidr: String,
    #[prost(uint32, tag = "4")]
    pub node_prefix: u32,
}

/// Body of [`CommandType::SetNodeState`] and [`CommandType::SetNodeAvailability`].
#[derive(Clone, PartialEq, Message)]
pub struct NodeChangeBody {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "NodeState", tag = "2")]
    pub state: i32,
    #[prost(enumeration = "NodeAvailability", tag = "3")]
    pub availability: i32,
    #[prost(string, tag = "4")]
    pub message: String,
    #[prost(uint64, tag = "5")]
    pub now_ms: u64,
}

/// Body of [`CommandType::ReportStatus`].
#[derive(Clone, PartialEq, Message)]
pub struct ReportStatusBody {
    #[prost(string, tag = "1")]
    pub node: String,
    #[prost(message, repeated, tag = "2")]
    pub updates: Vec<TaskStatusUpdate>,
}

/// Body of [`CommandType::ScaleService`] and [`CommandType::UndoService`].
#[derive(Clone, PartialEq, Message)]
pub struct ServiceRefBody {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint32, tag = "3")]
    pub replicas: u32,
}

/// Body of [`CommandType::ApplyServices`].
#[derive(Clone, PartialEq, Message)]
pub struct ApplyServicesBody {
    #[prost(message, repeated, tag = "1")]
    pub services: Vec<Service>,
}

/// Body of [`CommandType::DeleteService`].
#[derive(Clone, PartialEq, Message)]
pub struct DeleteServiceBody {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub name: String,
}

/// A write to the replicated state.
#[derive(Debug, Clone, PartialEq)]
// Built once per proposal and encoded at once: boxing the node description would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    Noop,
    /// Create or update each service (kubectl-apply semantics); all of the batch or none.
    ApplyServices(Vec<Service>),
    DeleteService {
        namespace: String,
        name: String,
    },
    RegisterNode {
        node: NodeDescription,
        now_ms: u64,
        /// `(cluster CIDR, node prefix)` from the leader's flags; empty CIDR: none.
        network: (String, u32),
    },
    SetNodeState {
        name: String,
        state: NodeState,
        message: String,
        now_ms: u64,
    },
    SetNodeAvailability {
        name: String,
        availability: NodeAvailability,
    },
    ApplyPlan(Plan),
    ReportStatus {
        node: String,
        updates: Vec<TaskStatusUpdate>,
    },
    ScaleService {
        namespace: String,
        name: String,
        replicas: u32,
    },
    UndoService {
        namespace: String,
        name: String,
    },
    RemoveNode {
        name: String,
    },
}

/// What a command entry decodes to.
#[derive(Debug, Clone, PartialEq)]
// Decoded once per entry and consumed at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Decoded {
    Command(Command),
    /// A type unknown to this replica that its writer marked [`IGNORE_UNKNOWN`].
    Skipped {
        type_byte: u8,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("empty command entry")]
    Empty,
    #[error(
        "unknown command type {0}: the log was written by a newer tug; upgrade this controller"
    )]
    UnknownType(u8),
    #[error("cannot decode the body of a {kind:?} command: {source}")]
    Body {
        kind: CommandType,
        #[source]
        source: prost::DecodeError,
    },
}

impl Command {
    pub fn command_type(&self) -> CommandType {
        match self {
            Self::Noop => CommandType::Noop,
            Self::ApplyServices(_) => CommandType::ApplyServices,
            Self::DeleteService { .. } => CommandType::DeleteService,
            Self::RegisterNode { .. } => CommandType::RegisterNode,
            Self::SetNodeState { .. } => CommandType::SetNodeState,
            Self::SetNodeAvailability { .. } => CommandType::SetNodeAvailability,
            Self::ApplyPlan(_) => CommandType::ApplyPlan,
            Self::ReportStatus { .. } => CommandType::ReportStatus,
            Self::ScaleService { .. } => CommandType::ScaleService,
            Self::UndoService { .. } => CommandType::UndoService,
            Self::RemoveNode { .. } => CommandType::RemoveNode,
        }
    }

    /// Type byte followed by the body. The bodies that carry objects (services, a plan, status
    /// updates) are written from the borrowed objects into a buffer sized for them: this runs
    /// for every write, on the thread that serves the API.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.command_type() as u8];
        match self {
            Self::Noop => {}
            Self::ApplyServices(services) => {
                // = ApplyServicesBody { services }, without copying them into one.
                out.reserve_exact(message::encoded_len_repeated(1, services));
                message::encode_repeated(1, services, &mut out);
            }
            Self::DeleteService { namespace, name } => {
                let body = DeleteServiceBody {
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                body.encode_raw(&mut out);
            }
            Self::RegisterNode {
                node,
                now_ms,
                network,
            } => RegisterNodeBody {
                node: Some(node.clone()),
                now_ms: *now_ms,
                cluster_cidr: network.0.clone(),
                node_prefix: network.1,
            }
            .encode_raw(&mut out),
            Self::SetNodeState {
                name,
                state,
                message,
                now_ms,
            } => NodeChangeBody {
                name: name.clone(),
                state: (*state).into(),
                message: message.clone(),
                now_ms: *now_ms,
                ..Default::default()
            }
            .encode_raw(&mut out),
            Self::SetNodeAvailability { name, availability } => NodeChangeBody {
                name: name.clone(),
                availability: (*availability).into(),
                ..Default::default()
            }
            .encode_raw(&mut out),
            Self::ApplyPlan(plan) => {
                out.reserve_exact(plan.encoded_len());
                plan.encode_raw(&mut out);
            }
            Self::ReportStatus { node, updates } => {
                // = ReportStatusBody { node, updates }, without copying them into one.
                out.reserve_exact(
                    prost::encoding::string::encoded_len(1, node)
                        + message::encoded_len_repeated(2, updates),
                );
                if !node.is_empty() {
                    prost::encoding::string::encode(1, node, &mut out);
                }
                message::encode_repeated(2, updates, &mut out);
            }
            Self::ScaleService {
                namespace,
                name,
                replicas,
            } => ServiceRefBody {
                namespace: namespace.clone(),
                name: name.clone(),
                replicas: *replicas,
            }
            .encode_raw(&mut out),
            Self::UndoService { namespace, name } => ServiceRefBody {
                namespace: namespace.clone(),
                name: name.clone(),
                replicas: 0,
            }
            .encode_raw(&mut out),
            Self::RemoveNode { name } => NodeChangeBody {
                name: name.clone(),
                ..Default::default()
            }
            .encode_raw(&mut out),
        }
        out
    }

    pub fn decode(data: &[u8]) -> Result<Decoded, CommandError> {
        let (&byte, body) = data.split_first().ok_or(CommandError::Empty)?;
        let Some(kind) = CommandType::from_byte(byte & !IGNORE_UNKNOWN) else {
            if byte & IGNORE_UNKNOWN != 0 {
                return Ok(Decoded::Skipped { type_byte: byte });
            }
            return Err(CommandError::UnknownType(byte));
        };
        let body_err = |source| CommandError::Body { kind, source };
        let command = match kind {
            CommandType::Noop => Self::Noop,
            CommandType::ApplyServices => {
                Self::ApplyServices(ApplyServicesBody::decode(body).map_err(body_err)?.services)
            }
            CommandType::DeleteService => {
                let b = DeleteServiceBody::decode(body).map_err(body_err)?;
                Self::DeleteService {
                    namespace: b.namespace,
                    name: b.name,
                }
            }
            CommandType::RegisterNode => {
                let b = RegisterNodeBody::decode(body).map_err(body_err)?;
                Self::RegisterNode {
                    node: b.node.unwrap_or_default(),
                    now_ms: b.now_ms,
                    network: (b.cluster_cidr, b.node_prefix),
                }
            }
            CommandType::SetNodeState => {
                let b = NodeChangeBody::decode(body).map_err(body_err)?;
                Self::SetNodeState {
                    state: b.state(),
                    name: b.name,
                    message: b.message,
                    now_ms: b.now_ms,
                }
            }
            CommandType::SetNodeAvailability => {
                let b = NodeChangeBody::decode(body).map_err(body_err)?;
                Self::SetNodeAvailability {
                    availability: b.availability(),
                    name: b.name,
                }
            }
            CommandType::ApplyPlan => Self::ApplyPlan(Plan::decode(body).map_err(body_err)?),
            CommandType::ReportStatus => {
                let b = ReportStatusBody::decode(body).map_err(body_err)?;
                Self::ReportStatus {
                    node: b.node,
                    updates: b.updates,
                }
            }
            CommandType::ScaleService => {
                let b = ServiceRefBody::decode(body).map_err(body_err)?;
                Self::ScaleService {
                    namespace: b.namespace,
                    name: b.name,
                    replicas: b.replicas,
                }
            }
            CommandType::UndoService => {
                let b = ServiceRefBody::decode(body).map_err(body_err)?;
                Self::UndoService {
                    namespace: b.namespace,
                    name: b.name,
                }
            }
            CommandType::RemoveNode => Self::RemoveNode {
                name: NodeChangeBody::decode(body).map_err(body_err)?.name,
            },
        };
        Ok(Decoded::Command(command))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tug_api::v1::{ObjectMeta, ServiceSpec};

    #[test]
    fn type_bytes_never_change() {
        assert_eq!(CommandType::Noop as u8, 0);
        assert_eq!(CommandType::ApplyServices as u8, 1);
        assert_eq!(CommandType::DeleteService as u8, 2);
        assert_eq!(CommandType::RegisterNode as u8, 3);
        assert_eq!(CommandType::SetNodeState as u8, 4);
        assert_eq!(CommandType::SetNodeAvailability as u8, 5);
        assert_eq!(CommandType::ApplyPlan as u8, 6);
        assert_eq!(CommandType::ReportStatus as u8, 7);
        assert_eq!(CommandType::ScaleService as u8, 8);
        assert_eq!(CommandType::UndoService as u8, 9);
        assert_eq!(CommandType::RemoveNode as u8, 10);
    }

    #[test]
    fn commands_round_trip() -> Result<(), CommandError> {
        let commands = [
            Command::Noop,
            Command::ApplyServices(vec![Service {
                metadata: Some(ObjectMeta {
                    name: "web".into(),
                    ..Default::default()
                }),
                spec: Some(
                    ServiceSpec {
                        image: "nginx".into(),
                        replicas: 2,
                        ..Default::default()
                    }
                    .into(),
                ),
                previous_spec: None,
            }]),
            Command::DeleteService {
                namespace: "prod".into(),
                name: "db".into(),
            },
            Command::RegisterNode {
                node: NodeDescription {
                    name: "n1".into(),
                    ..Default::default()
                },
                now_ms: 5,
                network: ("10.88.0.0/16".into(), 24),
            },
            Command::SetNodeState {
                name: "n1".into(),
                state: NodeState::Down,
                message: "gone".into(),
                now_ms: 9,
            },
            Command::SetNodeAvailability {
                name: "n1".into(),
                availability: NodeAvailability::Drain,
            },
            Command::ApplyPlan(Plan {
                remove: vec!["t".into()],
                ..Default::default()
            }),
            Command::ReportStatus {
                node: "n1".into(),
                updates: vec![TaskStatusUpdate {
                    task_id: "t".into(),
                    ..Default::default()
                }],
            },
            Command::ScaleService {
                namespace: "a".into(),
                name: "b".into(),
                replicas: 7,
            },
            Command::UndoService {
                namespace: "a".into(),
                name: "b".into(),
            },
            Command::RemoveNode { name: "n1".into() },
        ];
        for command in commands {
            let bytes = command.encode();
            assert_eq!(bytes[0], command.command_type() as u8);
            // The bodies written field by field are the messages' own encodings.
            let body = match &command {
                Command::ApplyServices(services) => Some(
                    ApplyServicesBody {
                        services: services.clone(),
                    }
                    .encode_to_vec(),
                ),
                Command::ReportStatus { node, updates } => Some(
                    ReportStatusBody {
                        node: node.clone(),
                        updates: updates.clone(),
                    }
                    .encode_to_vec(),
                ),
                _ => None,
            };
            if let Some(body) = body {
                assert_eq!(bytes[1..], body[..]);
            }
            assert_eq!(Command::decode(&bytes)?, Decoded::Command(command));
        }
        Ok(())
    }

    #[test]
    fn unknown_types_stop_unless_marked_ignorable() {
        assert!(matches!(
            Command::decode(&[0x42, 1, 2]),
            Err(CommandError::UnknownType(0x42))
        ));
        assert!(matches!(
            Command::decode(&[0x42 | IGNORE_UNKNOWN, 1, 2]),
            Ok(Decoded::Skipped { type_byte: 0xc2 })
        ));
        assert!(matches!(Command::decode(&[]), Err(CommandError::Empty)));
        assert!(matches!(
            Command::decode(&[1, 0xff]),
            Err(CommandError::Body {
                kind: CommandType::ApplyServices,
                ..
            })
        ));
    }
}
