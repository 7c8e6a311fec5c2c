//! A service's tasks by slot, and whether an empty slot is filled now, later, or never.

use std::collections::BTreeMap;

use tug_api::v1::{ServiceSpec, Task, TaskState};

use super::{failure_backoff_ms, finished_for_good};

/// Tasks per slot, newest first.
pub(super) fn by_slot<'a>(tasks: &[&'a Task]) -> BTreeMap<u32, Vec<&'a Task>> {
    let mut slots: BTreeMap<u32, Vec<&Task>> = BTreeMap::new();
    for task in tasks {
        slots.entry(task.slot).or_default().push(task);
    }
    for in_slot in slots.values_mut() {
        in_slot.sort_by(|a, b| (b.create_revision, &b.id).cmp(&(a.create_revision, &a.id)));
    }
    slots
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refill {
    /// Its last task finished and the restart policy says that is the end (a batch job).
    Done,
    /// Fill it now; `attempt` counts failures in a row before this task.
    Now { attempt: u32 },
    /// Its last task failed: fill it at this wall-clock time (ms).
    At(u64),
}

/// Whether an empty slot (no live task), whose tasks are `in_slot` newest first, gets a task.
pub(super) fn refill(in_slot: &[&Task], spec: &ServiceSpec, now_ms: u64) -> Refill {
    let Some(latest) = in_slot.first() else {
        return Refill::Now { attempt: 0 };
    };
    let status = latest.status.clone().unwrap_or_default();
    match status.state() {
        TaskState::Exited | TaskState::Failed => {
            if finished_for_good(latest, spec.restart_policy()) {
                return Refill::Done;
            }
            let ready = status
                .updated_ms
                .saturating_add(failure_backoff_ms(latest.attempt));
            if now_ms >= ready {
                Refill::Now {
                    attempt: latest.attempt.saturating_add(1),
                }
            } else {
                Refill::At(ready)
            }
        }
        _ => Refill::Now { attempt: 0 },
    }
}
