//! The scheduler: where the replicas of a service go. A pure function of a [`ClusterView`] (nodes
//! with what is free on them) and a request (one service's spec, how many tasks): filter the
//! nodes that can take a task (ready, not drained, constraints, cpu/memory fit, host ports free),
//! then rank them (spread across nodes and a label such as `zone`, or bin-pack). Placements update
//! the view, so later placements of the same pass count earlier ones. Same input, same output.
//!
//! Placing `n` tasks over `N` nodes costs O(N) to filter plus O(n log N) to rank: nodes sit in a
//! heap keyed by their score and are re-scored lazily when popped.

mod filter;
mod view;

pub use filter::{Constraint, ConstraintError};
pub use view::{ClusterView, NodeSlot};

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use tug_api::v1::ServiceSpec;

use crate::state::ServiceKey;

/// Why one node cannot take a task; counted into the pending reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unfit {
    NotReady,
    Drained,
    Constraints,
    Cpu,
    Memory,
    Port,
}

impl Unfit {
    fn text(self) -> &'static str {
        match self {
            Unfit::NotReady => "not ready",
            Unfit::Drained => "drained",
            Unfit::Constraints => "not matching the placement constraints",
            Unfit::Cpu => "insufficient cpu",
            Unfit::Memory => "insufficient memory",
            Unfit::Port => "host port in use",
        }
    }
}

/// The outcome of placing the tasks of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placements {
    /// Node names, one per placed task, in placement order.
    pub nodes: Vec<String>,
    /// Why the rest could not be placed ("0/3 nodes available: 2 insufficient memory, 1
    /// drained"); empty when every task was placed.
    pub reason: String,
}

/// What one service asks of a node, derived from its spec.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub service: &'a ServiceKey,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// (protocol, host port) pairs the task publishes.
    pub host_ports: Vec<(i32, u32)>,
    pub constraints: Vec<Constraint>,
    pub spread_label: Option<&'a str>,
    pub binpack: bool,
}

impl<'a> Request<'a> {
    pub fn from_spec(
        service: &'a ServiceKey,
        spec: &'a ServiceSpec,
    ) -> Result<Self, ConstraintError> {
        let resources = spec.resources.unwrap_or_default();
        let placement = spec.placement.as_ref();
        let constraints = placement
            .map(|p| p.constraints.iter().map(|c| Constraint::parse(c)).collect())
            .transpose()?
            .unwrap_or_default();
        Ok(Request {
            service,
            cpu_millis: resources.cpu_millis,
            memory_bytes: resources.memory_bytes,
            host_ports: spec
                .ports
                .iter()
                .filter(|p| p.host_port != 0)
                .map(|p| (p.protocol, p.host_port))
                .collect(),
            constraints,
            spread_label: placement
                .map(|p| p.spread.as_str())
                .filter(|s| !s.is_empty()),
            binpack: placement.is_some_and(|p| p.binpack),
        })
    }
}

/// Places up to `count` tasks of `req`, updating `view` with each placement.
pub fn place(view: &mut ClusterView, req: &Request<'_>, count: usize) -> Placements {
    let mut unfit: BTreeMap<Unfit, usize> = BTreeMap::new();
    let mut groups = req
        .spread_label
        .map(|label| view.group_counts(label, req.service))
        .unwrap_or_default();
    let mut heap = BinaryHeap::new();
    if count > 0 {
        for (index, node) in view.nodes.iter().enumerate() {
            match filter::fits(node, req) {
                Ok(()) => heap.push(Reverse((score(view, &groups, index, req), index))),
                Err(why) => *unfit.entry(why).or_default() += 1,
            }
        }
    }
    let mut nodes = Vec::with_capacity(count.min(view.nodes.len() * 4));
    while nodes.len() < count {
        let Some(Reverse((key, index))) = heap.pop() else {
            break;
        };
        // Scores only grow as tasks are placed (spread), so a stale key is re-pushed.
        let fresh = score(view, &groups, index, req);
        if fresh != key {
            heap.push(Reverse((fresh, index)));
            continue;
        }
        if let Err(why) = filter::fits(&view.nodes[index], req) {
            *unfit.entry(why).or_default() += 1;
            continue;
        }
        view.assign(index, req);
        if let Some(label) = req.spread_label {
            *groups.entry(view.label_of(index, label)).or_default() += 1;
        }
        nodes.push(view.nodes[index].name.clone());
        heap.push(Reverse((score(view, &groups, index, req), index)));
    }
    let reason = if nodes.len() < count {
        let available = heap.len();
        let mut parts: Vec<String> = unfit
            .iter()
            .map(|(why, n)| format!("{n} {}", why.text()))
            .collect();
        if parts.is_empty() {
            parts.push("no nodes registered".into());
        }
        format!(
            "{available}/{} nodes available: {}",
            view.nodes.len(),
            parts.join(", ")
        )
    } else {
        String::new()
    };
    Placements { nodes, reason }
}

/// Lower is better. Spread: fewest replicas of this service in the node's spread-label group,
/// then on the node, then the least loaded node. Bin-pack: the most loaded node that fits.
/// The node's position (names are sorted) breaks ties, so the result is deterministic.
type Score = (u64, u64, u64);

fn score(
    view: &ClusterView,
    groups: &HashMap<String, u32>,
    index: usize,
    req: &Request<'_>,
) -> Score {
    let node = &view.nodes[index];
    let load = node.load_permille();
    if req.binpack {
        return (0, 1000u64.saturating_sub(load), 0);
    }
    let on_node = u64::from(view.count_on_node(index, req.service));
    let in_group = req.spread_label.map_or(0, |label| {
        u64::from(
            groups
                .get(&view.label_of(index, label))
                .copied()
                .unwrap_or(0),
        )
    });
    (in_group, on_node, load)
}

#[cfg(test)]
mod tests;
