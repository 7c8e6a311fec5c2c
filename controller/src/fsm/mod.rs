//! The state machine: applies committed log entries, in order, to the [`Store`].
//!
//! Apply is deterministic: the result depends only on the entry and its index (which becomes
//! the objects' revision), never on time, randomness or which replica runs it. An entry that
//! cannot be decoded is a fatal error (the log or this binary is wrong, and continuing would
//! diverge); a command the store refuses is an ordinary result that every replica reaches alike.

pub mod command;
pub mod snapshot;

pub use command::{Command, CommandError, CommandType, Decoded, IGNORE_UNKNOWN};
pub use snapshot::SnapshotError;

use tug_api::v1::Node;

use crate::state::{ClusterNetwork, PlanResult, ServiceResult, SharedStore, Store, StoreError};

/// What applying one command did.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandResult {
    Noop,
    /// One result per service of the batch, in request order.
    Services(Vec<ServiceResult>),
    Deleted {
        found: bool,
    },
    /// One service scaled or rolled back.
    Service(ServiceResult),
    Node(Box<Node>),
    Plan(PlanResult),
    /// How many status reports changed something.
    Statuses(usize),
    /// A command type this replica does not know, marked skippable by its writer.
    Skipped,
}

#[derive(Debug, thiserror::Error)]
pub enum FsmError {
    #[error("cannot apply the log entry at index {index}: {source}")]
    Command {
        index: u64,
        #[source]
        source: CommandError,
    },
    #[error("cannot restore the state snapshot at index {index}: {source}")]
    Snapshot {
        index: u64,
        #[source]
        source: SnapshotError,
    },
    #[error(
        "snapshot at index {index} describes revision {revision}, which is ahead of its own index"
    )]
    SnapshotAhead { index: u64, revision: u64 },
}

/// The state machine over a shared store.
#[derive(Debug, Clone)]
pub struct Fsm {
    store: SharedStore,
}

impl Fsm {
    pub fn new(store: SharedStore) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Applies the command entry at `index`. The outer error is fatal; the inner one is the
    /// command's deterministic refusal.
    pub fn apply(
        &self,
        index: u64,
        data: &[u8],
    ) -> Result<Result<CommandResult, StoreError>, FsmError> {
        let decoded =
            Command::decode(data).map_err(|source| FsmError::Command { index, source })?;
        let mut store = self.store.write();
        store.hold_changes();
        let result = match decoded {
            Decoded::Skipped { type_byte } => {
                tracing::warn!(
                    index,
                    type_byte,
                    "skipping a command type this controller does not know"
                );
                Ok(CommandResult::Skipped)
            }
            Decoded::Command(command) => apply_command(&mut store, index, command),
        };
        store.advance(index);
        store.release_changes();
        Ok(result)
    }

    /// Records an entry that carries no command (a new leader's empty entry, a conf change).
    pub fn apply_empty(&self, index: u64) {
        self.store.write().advance(index);
    }

    /// The whole state, serialized.
    pub fn snapshot(&self) -> Vec<u8> {
        snapshot::encode(&self.store.read())
    }

    /// Objects in the state (what a snapshot of it holds).
    pub fn object_count(&self) -> usize {
        self.store.read().object_count()
    }

    /// The state to snapshot, taken quickly; encode it with [`snapshot::encode_shared`].
    pub fn shared_state(&self) -> crate::state::SharedState {
        self.store.read().shared()
    }

    /// Replaces the state with a snapshot taken at log index `index`.
    pub fn restore(&self, index: u64, data: &[u8]) -> Result<(), FsmError> {
        let restored =
            snapshot::decode(data).map_err(|source| FsmError::Snapshot { index, source })?;
        if restored.revision > index {
            return Err(FsmError::SnapshotAhead {
                index,
                revision: restored.revision,
            });
        }
        self.store.write().replace(index, restored);
        Ok(())
    }
}

fn apply_command(
    store: &mut Store,
    index: u64,
    command: Command,
) -> Result<CommandResult, StoreError> {
    match command {
        Command::Noop => Ok(CommandResult::Noop),
        Command::ApplyServices(services) => store
            .apply_services(index, services)
            .map(CommandResult::Services),
        Command::DeleteService { namespace, name } => Ok(CommandResult::Deleted {
            found: store.delete_service(index, &namespace, &name),
        }),
        Command::RegisterNode {
            node,
            now_ms,
            network: (cidr, prefix),
        } => {
            let network = if cidr.is_empty() {
                None
            } else {
                let prefix = u8::try_from(prefix).unwrap_or(u8::MAX);
                Some(ClusterNetwork::parse(&cidr, prefix)?)
            };
            store
                .register_node(index, node, now_ms, network)
                .map(|n| CommandResult::Node(Box::new(n)))
        }
        Command::RemoveNode { name } => store
            .remove_node(index, &name)
            .map(|n| CommandResult::Node(Box::new(n))),
        Command::SetNodeState {
            name,
            state,
            message,
            now_ms,
        } => store
            .set_node_state(index, &name, state, message, now_ms)
            .map(|n| CommandResult::Node(Box::new(n))),
        Command::SetNodeAvailability { name, availability } => store
            .set_node_availability(index, &name, availability)
            .map(|n| CommandResult::Node(Box::new(n))),
        Command::ApplyPlan(plan) => Ok(CommandResult::Plan(store.apply_plan(index, plan))),
        Command::ReportStatus { node, updates } => Ok(CommandResult::Statuses(
            store.apply_statuses(index, &node, updates),
        )),
        Command::ScaleService {
            namespace,
            name,
            replicas,
        } => store
            .scale_service(index, &namespace, &name, replicas)
            .map(CommandResult::Service),
        Command::UndoService { namespace, name } => store
            .undo_service(index, &namespace, &name)
            .map(CommandResult::Service),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ApplyOutcome;
    use snapshot::Encodings;
    use std::collections::HashMap;
    use tug_api::v1::Service;

    fn service(name: &str, image: &str) -> Service {
        crate::testing::service(name, image, 0)
    }

    fn services(fsm: &Fsm) -> Vec<Service> {
        fsm.store()
            .read()
            .list_services(None, &HashMap::new())
            .into_iter()
            .cloned()
            .collect()
    }

    #[test]
    fn the_same_log_gives_the_same_state() -> Result<(), Box<dyn std::error::Error>> {
        let log = [
            Command::ApplyServices(vec![service("a", "x"), service("b", "y")]),
            Command::Noop,
            Command::ApplyServices(vec![service("a", "x2")]),
            Command::DeleteService {
                namespace: String::new(),
                name: "b".into(),
            },
        ];
        let replicas = [
            Fsm::new(SharedStore::new(10)),
            Fsm::new(SharedStore::new(10)),
        ];
        for fsm in &replicas {
            for (i, command) in log.iter().enumerate() {
                fsm.apply(i as u64 + 2, &command.encode())??;
            }
        }
        assert_eq!(services(&replicas[0]), services(&replicas[1]));
        assert_eq!(replicas[0].store().read().revision(), 5);
        Ok(())
    }

    /// The store hashes its objects (each map with its own random seed); a snapshot still comes
    /// out the same from a replica that applied the log and from one restored from a snapshot,
    /// whose maps were filled in another order.
    #[test]
    fn the_same_state_gives_the_same_snapshot() -> Result<(), Box<dyn std::error::Error>> {
        let applied = Fsm::new(SharedStore::new(10));
        let names: Vec<String> = (0..300).rev().map(|i| format!("svc-{i:03}")).collect();
        for (i, chunk) in names.chunks(7).enumerate() {
            let batch = chunk.iter().map(|n| service(n, "img")).collect();
            applied.apply(i as u64 + 2, &Command::ApplyServices(batch).encode())??;
        }
        let revision = applied.store().read().revision();
        let snapshot = applied.snapshot();
        let restored = Fsm::new(SharedStore::new(10));
        restored.restore(revision, &snapshot)?;
        assert_eq!(restored.snapshot(), snapshot);
        assert_eq!(services(&restored), services(&applied));
        Ok(())
    }

    /// A snapshot copies the bytes of the objects the last one holds that did not change, and
    /// comes out exactly as one encoded whole.
    #[test]
    fn a_snapshot_copies_what_did_not_change_since_the_last()
    -> Result<(), Box<dyn std::error::Error>> {
        let fsm = Fsm::new(SharedStore::new(10));
        let one_replica = |name: &str, image: &str| {
            let mut svc = service(name, image);
            if let Some(spec) = svc.spec.as_mut().map(tug_api::shared::Shared::make_mut) {
                spec.replicas = 1;
            }
            svc
        };
        let batch = (0..50)
            .map(|i| one_replica(&format!("svc-{i:02}"), "img"))
            .collect();
        fsm.apply(2, &Command::ApplyServices(batch).encode())??;
        // Their tasks (pending: there are no nodes).
        let plan = crate::reconcile::reconcile(
            &fsm.store().read(),
            1_000,
            &crate::reconcile::ReconcileConfig::default(),
            &mut |svc: &str, slot: u32| format!("{svc}.{slot}.t"),
        )
        .plan;
        assert_eq!(plan.create.len(), 50);
        fsm.apply(3, &Command::ApplyPlan(plan).encode())??;

        let first = snapshot::encode_shared(&fsm.shared_state(), &Encodings::default());
        assert_eq!(first.reused, 0);
        assert_eq!(first.encodings.len(), 100);

        // One service changed, one deleted, three new (sorting before, among and after the
        // others); the tasks stay as they are.
        let changed = ["svc-00", "new", "svc-25a", "zz"]
            .iter()
            .map(|name| one_replica(name, if *name == "svc-00" { "img2" } else { "img" }))
            .collect();
        fsm.apply(4, &Command::ApplyServices(changed).encode())??;
        fsm.apply(
            5,
            &Command::DeleteService {
                namespace: String::new(),
                name: "svc-01".into(),
            }
            .encode(),
        )??;
        let state = fsm.shared_state();
        let second = snapshot::encode_shared(&state, &first.encodings);
        // 48 services and the 50 tasks copied.
        assert_eq!(second.reused, 98);
        let whole = snapshot::encode_shared(&state, &Encodings::default());
        assert_eq!(whole.reused, 0);
        assert_eq!(second.data, whole.data);
        assert_eq!(second.data.as_ref(), fsm.snapshot().as_slice());

        // And it restores to the same state.
        let restored = Fsm::new(SharedStore::new(10));
        restored.restore(5, &second.data)?;
        assert_eq!(services(&restored), services(&fsm));
        assert_eq!(restored.store().read().task_count(), 50);

        // A third snapshot copies every object from the second (the first's buffer is gone).
        drop(first);
        let third = snapshot::encode_shared(&fsm.shared_state(), &second.encodings);
        assert_eq!(third.reused, 102);
        assert_eq!(third.data, whole.data);
        Ok(())
    }

    fn register(fsm: &Fsm, index: u64, name: &str) -> Result<String, Box<dyn std::error::Error>> {
        let command = Command::RegisterNode {
            node: tug_api::v1::NodeDescription {
                name: name.into(),
                address: "10.0.0.1:7441".into(),
                container_network: name != "plain",
                ..Default::default()
            },
            now_ms: 0,
            network: ("10.88.0.0/23".into(), 24),
        };
        match fsm.apply(index, &command.encode())? {
            Ok(CommandResult::Node(node)) => Ok(node.subnet),
            Ok(other) => Err(format!("unexpected result {other:?}").into()),
            Err(e) => Err(e.into()),
        }
    }

    #[test]
    fn subnets_are_allocated_kept_freed_and_survive_a_snapshot()
    -> Result<(), Box<dyn std::error::Error>> {
        let fsm = Fsm::new(SharedStore::new(10));
        assert_eq!(register(&fsm, 2, "a")?, "10.88.0.0/24");
        assert_eq!(register(&fsm, 3, "b")?, "10.88.1.0/24");
        // Re-registering keeps the subnet.
        assert_eq!(register(&fsm, 4, "a")?, "10.88.0.0/24");
        // The CIDR holds two: a third node is refused, and nothing changes.
        let err = register(&fsm, 5, "c").err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.starts_with("no free /24 subnet left in the cluster CIDR")),
            "{err:?}"
        );
        assert!(fsm.store().read().get_node("c").is_none());
        // A ready node cannot be removed; a down one can, and its subnet is free again.
        let remove = |index| fsm.apply(index, &Command::RemoveNode { name: "b".into() }.encode());
        assert!(matches!(remove(6)?, Err(StoreError::NodeNotDown(..))));
        fsm.apply(
            7,
            &Command::SetNodeState {
                name: "b".into(),
                state: tug_api::v1::NodeState::Down,
                message: "gone".into(),
                now_ms: 1,
            }
            .encode(),
        )??;
        assert!(matches!(remove(8)?, Ok(CommandResult::Node(_))));
        assert!(fsm.store().read().get_node("b").is_none());

        // A snapshot keeps the plan and the taken subnets.
        let restored = Fsm::new(SharedStore::new(10));
        restored.restore(8, &fsm.snapshot())?;
        assert_eq!(
            restored.store().read().cluster_network(),
            ClusterNetwork::parse("10.88.0.0/23", 24).ok()
        );
        assert_eq!(register(&restored, 9, "c")?, "10.88.1.0/24");
        assert_eq!(register(&restored, 10, "a")?, "10.88.0.0/24");
        // The CIDR is full again, but a node without a container network still registers.
        assert_eq!(register(&restored, 11, "plain")?, "");
        Ok(())
    }

    #[test]
    fn results_say_created_configured_unchanged() -> Result<(), FsmError> {
        let fsm = Fsm::new(SharedStore::new(10));
        let apply = |index, image: &str| {
            fsm.apply(
                index,
                &Command::ApplyServices(vec![service("web", image)]).encode(),
            )
        };
        let outcome = |r: Result<CommandResult, StoreError>| match r {
            Ok(CommandResult::Services(v)) => v.first().map(|r| (r.outcome, r.generation)),
            _ => None,
        };
        assert_eq!(outcome(apply(2, "a")?), Some((ApplyOutcome::Created, 1)));
        assert_eq!(outcome(apply(3, "a")?), Some((ApplyOutcome::Unchanged, 1)));
        assert_eq!(outcome(apply(4, "b")?), Some((ApplyOutcome::Configured, 2)));
        Ok(())
    }

    #[test]
    fn an_undecodable_entry_is_fatal() {
        let fsm = Fsm::new(SharedStore::new(10));
        assert!(matches!(
            fsm.apply(7, &[0x33]),
            Err(FsmError::Command { index: 7, .. })
        ));
    }

    #[test]
    fn snapshot_round_trips_and_restore_replaces() -> Result<(), Box<dyn std::error::Error>> {
        let fsm = Fsm::new(SharedStore::new(10));
        let _ = fsm.apply(
            2,
            &Command::ApplyServices(vec![service("a", "x"), service("b", "y")]).encode(),
        )?;
        let snap = fsm.snapshot();

        let other = Fsm::new(SharedStore::new(10));
        let _ = other.apply(
            2,
            &Command::ApplyServices(vec![service("zzz", "q")]).encode(),
        )?;
        let mut watcher = other.store().read().watch(0)?;
        other.restore(2, &snap)?;
        assert_eq!(services(&fsm), services(&other));
        assert_eq!(other.store().read().revision(), 2);
        assert!(matches!(
            watcher.try_next(),
            Some(Err(crate::state::WatchError::Reset { revision: 2 }))
        ));
        Ok(())
    }

    #[test]
    fn a_corrupt_snapshot_is_refused() {
        let fsm = Fsm::new(SharedStore::new(10));
        let mut snap = snapshot::encode_empty(4);
        assert!(fsm.restore(3, &snap).is_err(), "revision ahead of index");
        snap.truncate(snap.len() - 1);
        assert!(fsm.restore(4, &snap).is_err());
        assert!(fsm.restore(4, b"garbage!!").is_err());
    }
}
