//! The node's assigned set (STYLE.md §4.3): a COMPLETE message replaces it, an INCREMENTAL one
//! upserts and removes. Pure: the worker turns the set into actions with `plan`.

use std::collections::BTreeMap;

use tug_api::v1::assignments_message::Kind;
use tug_api::v1::{AssignmentsMessage, Task};

use super::error::SessionError;

#[derive(Debug, Clone, Default)]
pub(crate) struct Assigned {
    tasks: BTreeMap<String, Task>,
    /// The revision of the last message applied: where a new stream resumes.
    revision: u64,
    /// Whether a COMPLETE set arrived in this process's life. Until then the set is only what
    /// was persisted, and nothing local may be removed for being absent from it.
    complete: bool,
}

impl Assigned {
    /// The set persisted by an earlier run of the worker: supervised at once, but not
    /// authoritative (no revision, not complete).
    pub(crate) fn restored(tasks: impl IntoIterator<Item = Task>) -> Assigned {
        Assigned {
            tasks: tasks.into_iter().map(|t| (t.id.clone(), t)).collect(),
            revision: 0,
            complete: false,
        }
    }

    pub(crate) fn apply(&mut self, msg: AssignmentsMessage) -> Result<(), SessionError> {
        match Kind::try_from(msg.kind) {
            Ok(Kind::Complete) => {
                self.tasks = msg.tasks.into_iter().map(|t| (t.id.clone(), t)).collect();
                self.complete = true;
            }
            Ok(Kind::Incremental) => {
                for id in &msg.removed {
                    self.tasks.remove(id);
                }
                for t in msg.tasks {
                    self.tasks.insert(t.id.clone(), t);
                }
            }
            Ok(Kind::Unspecified) | Err(_) => return Err(SessionError::UnknownKind(msg.kind)),
        }
        self.revision = msg.revision;
        Ok(())
    }

    pub(crate) fn tasks(&self) -> &BTreeMap<String, Task> {
        &self.tasks
    }

    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tug_api::v1::DesiredState;

    fn task(id: &str, desired: DesiredState) -> Task {
        Task {
            id: id.into(),
            namespace: "default".into(),
            desired_state: desired.into(),
            ..Default::default()
        }
    }

    fn msg(kind: Kind, tasks: Vec<Task>, removed: &[&str], revision: u64) -> AssignmentsMessage {
        AssignmentsMessage {
            kind: kind.into(),
            tasks,
            removed: removed.iter().map(|s| s.to_string()).collect(),
            revision,
        }
    }

    fn ids(a: &Assigned) -> Vec<&str> {
        a.tasks().keys().map(String::as_str).collect()
    }

    #[test]
    fn complete_replaces_and_incremental_upserts_and_removes() -> Result<(), SessionError> {
        let mut a = Assigned::restored([task("old.1.x", DesiredState::Running)]);
        assert!(!a.is_complete());
        let run = DesiredState::Running;
        a.apply(msg(
            Kind::Complete,
            vec![task("a.1.x", run), task("b.1.x", run)],
            &[],
            7,
        ))?;
        assert_eq!(
            ids(&a),
            ["a.1.x", "b.1.x"],
            "COMPLETE drops what it does not name"
        );
        assert!(a.is_complete());
        assert_eq!(a.revision(), 7);
        a.apply(msg(
            Kind::Incremental,
            vec![task("c.1.x", run), task("a.1.x", DesiredState::Shutdown)],
            &["b.1.x"],
            9,
        ))?;
        assert_eq!(ids(&a), ["a.1.x", "c.1.x"]);
        assert_eq!(
            a.tasks().get("a.1.x").map(|t| t.desired_state()),
            Some(DesiredState::Shutdown)
        );
        assert_eq!(a.revision(), 9);
        assert!(a.apply(msg(Kind::Unspecified, vec![], &[], 10)).is_err());
        assert_eq!(a.revision(), 9, "a bad message changes nothing");
        Ok(())
    }
}
