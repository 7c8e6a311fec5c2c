//! Rolling updates: which outdated tasks to stop and which slots get a new task in this pass.
//!
//! Start-first (maxSurge > 0): a slot gets its new task while the old one still runs, as long as
//! at most maxSurge slots run two; the old one stops once the new one is available (running, and
//! healthy if it has a health check). Stop-first (or maxSurge 0): the old task stops first, while
//! no more than maxUnavailable slots would be without an available task; its slot is refilled
//! with the new spec once it has stopped. An old task that is not available anyway stops at once.

use tug_api::v1::{Task, UpdatePolicy, update_policy::Order};

/// A slot whose live task runs an outdated spec.
#[derive(Debug)]
pub(super) struct Slot<'a> {
    pub slot: u32,
    pub old: Vec<&'a Task>,
    /// Its live task of the current spec, if it has one already.
    pub new: Option<&'a Task>,
}

#[derive(Debug, PartialEq)]
pub(super) enum Step<'a> {
    Stop(&'a Task),
    Start(u32),
}

pub(super) fn steps<'a>(
    outdated: &[Slot<'a>],
    update: &UpdatePolicy,
    replicas: usize,
    mut available_slots: usize,
    available: impl Fn(&Task) -> bool,
) -> Vec<Step<'a>> {
    let mut out = Vec::new();
    let surge = update.max_surge as usize;
    let mut unavailable = update.max_unavailable as usize;
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    let start_first = surge > 0 && update.order() != Order::StopFirst;
    let mut surging = outdated.iter().filter(|s| s.new.is_some()).count();
    let min_available = replicas.saturating_sub(unavailable);
    for slot in outdated {
        if let Some(new) = slot.new {
            if available(new) {
                out.extend(slot.old.iter().map(|t| Step::Stop(t)));
            }
            continue;
        }
        if slot.old.iter().all(|t| !available(t)) {
            // Nothing to keep available here: replace it now.
            out.extend(slot.old.iter().map(|t| Step::Stop(t)));
            continue;
        }
        if start_first {
            if surging < surge {
                surging += 1;
                out.push(Step::Start(slot.slot));
            }
        } else if available_slots > min_available {
            available_slots -= 1;
            out.extend(slot.old.iter().map(|t| Step::Stop(t)));
        }
    }
    out
}
