//! Converge planning: from the assigned set, the tasks that have a runner and the task
//! containers found on the node, what to do. Pure, so every case is a unit test; the worker
//! carries the actions out.

use std::collections::{BTreeMap, BTreeSet};

use tug_api::v1::{DesiredState, Task};

use super::assignments::Assigned;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Assigned, no runner yet: start one (it adopts a container that already runs).
    Supervise(Task),
    /// The controller changed what it wants of a supervised task.
    Update(Task),
    /// No longer assigned: the runner stops the container and removes it with its rootfs.
    Remove(String),
    /// A task container on the node that nothing assigns or supervises (known only once a
    /// COMPLETE set has arrived): remove it.
    RemoveOrphan(String),
}

/// `runners`: each supervised task's desired state as its runner knows it. `local`: ids of
/// containers on the node that carry the `tug.task` annotation.
pub(crate) fn plan(
    assigned: &Assigned,
    runners: &BTreeMap<String, DesiredState>,
    local: &BTreeSet<String>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for (id, task) in assigned.tasks() {
        match runners.get(id) {
            None => actions.push(Action::Supervise(task.clone())),
            // A task's spec never changes (a new spec is a new task); only its desired state.
            Some(desired) if *desired != task.desired_state() => {
                actions.push(Action::Update(task.clone()))
            }
            Some(_) => {}
        }
    }
    for id in runners.keys() {
        if !assigned.tasks().contains_key(id) {
            actions.push(Action::Remove(id.clone()));
        }
    }
    if assigned.is_complete() {
        for id in local {
            if !assigned.tasks().contains_key(id) && !runners.contains_key(id) {
                actions.push(Action::RemoveOrphan(id.clone()));
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use tug_api::v1::AssignmentsMessage;
    use tug_api::v1::assignments_message::Kind;

    fn task(id: &str, desired: DesiredState) -> Task {
        Task {
            id: id.into(),
            desired_state: desired.into(),
            ..Default::default()
        }
    }

    fn complete(tasks: Vec<Task>) -> Result<Assigned, super::super::error::SessionError> {
        let mut a = Assigned::default();
        a.apply(AssignmentsMessage {
            kind: Kind::Complete.into(),
            tasks,
            removed: vec![],
            revision: 1,
        })?;
        Ok(a)
    }

    #[test]
    fn new_changed_removed_and_orphaned_tasks() -> Result<(), Box<dyn std::error::Error>> {
        use DesiredState::{Running, Shutdown};
        let assigned = complete(vec![
            task("new", Running),
            task("same", Running),
            task("stop", Shutdown),
        ])?;
        let runners: BTreeMap<String, DesiredState> = [
            ("same".to_string(), Running),
            ("stop".to_string(), Running),
            ("gone".to_string(), Running),
        ]
        .into();
        let local: BTreeSet<String> = ["same", "gone", "orphan", "stop"].map(String::from).into();
        assert_eq!(
            plan(&assigned, &runners, &local),
            [
                Action::Supervise(task("new", Running)),
                Action::Update(task("stop", Shutdown)),
                Action::Remove("gone".into()),
                Action::RemoveOrphan("orphan".into()),
            ]
        );
        Ok(())
    }

    #[test]
    fn nothing_local_is_removed_before_a_complete_set() {
        let assigned = Assigned::restored([task("kept", DesiredState::Running)]);
        let local: BTreeSet<String> = ["kept", "unknown"].map(String::from).into();
        assert_eq!(
            plan(&assigned, &BTreeMap::new(), &local),
            [Action::Supervise(task("kept", DesiredState::Running))],
            "the restored set adopts what it names and leaves the rest alone"
        );
    }

    #[test]
    fn a_converged_node_needs_nothing() -> Result<(), Box<dyn std::error::Error>> {
        let assigned = complete(vec![task("a", DesiredState::Running)])?;
        let runners = [("a".to_string(), DesiredState::Running)].into();
        let local = ["a".to_string()].into();
        assert!(plan(&assigned, &runners, &local).is_empty());
        Ok(())
    }
}
