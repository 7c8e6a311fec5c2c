//! The commands carried by normal log entries: one type byte, then the prost-encoded body.
//!
//! The type byte is append-only: a value, once released, keeps its meaning forever; new commands
//! take the next free value. A type this replica does not know stops it (its state would diverge),
//! unless the writer set [`IGNORE_UNKNOWN`], which marks a command older replicas may skip.

use prost::Message;
use tug_api::v1::Service;

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
}

impl CommandType {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Noop),
            1 => Some(Self::ApplyServices),
            2 => Some(Self::DeleteService),
            _ => None,
        }
    }
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
pub enum Command {
    Noop,
    /// Create or update each service (kubectl-apply semantics); all of the batch or none.
    ApplyServices(Vec<Service>),
    DeleteService {
        namespace: String,
        name: String,
    },
}

/// What a command entry decodes to.
#[derive(Debug, Clone, PartialEq)]
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
        }
    }

    /// Type byte followed by the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.command_type() as u8];
        match self {
            Self::Noop => {}
            Self::ApplyServices(services) => {
                let body = ApplyServicesBody {
                    services: services.clone(),
                };
                body.encode_raw(&mut out);
            }
            Self::DeleteService { namespace, name } => {
                let body = DeleteServiceBody {
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                body.encode_raw(&mut out);
            }
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
                spec: Some(ServiceSpec {
                    image: "nginx".into(),
                    replicas: 2,
                    ..Default::default()
                }),
            }]),
            Command::DeleteService {
                namespace: "prod".into(),
                name: "db".into(),
            },
        ];
        for command in commands {
            let bytes = command.encode();
            assert_eq!(bytes[0], command.command_type() as u8);
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
