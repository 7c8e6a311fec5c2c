//! What the scheduler sees of the cluster during one reconcile pass: every node with its
//! capacity, what the tasks placed on it hold, and how many replicas of each service it runs.

use std::collections::{HashMap, HashSet};

use tug_api::v1::{Node, NodeAvailability, NodeState, Task};

use super::Request;
use crate::state::{
    ServiceKey, Store, holds_resources, host_ports, normalize_namespace, requested,
};

/// One node as the scheduler sees it.
#[derive(Debug, Clone, Default)]
pub struct NodeSlot {
    pub name: String,
    pub labels: HashMap<String, String>,
    pub ready: bool,
    pub drained: bool,
    pub cpu_capacity: u64,
    pub memory_capacity: u64,
    pub cpu_used: u64,
    pub memory_used: u64,
    /// (protocol, host port) pairs in use.
    pub ports: HashSet<(i32, u32)>,
}

impl NodeSlot {
    pub fn from_node(node: &Node) -> NodeSlot {
        let desc = node.description.clone().unwrap_or_default();
        let capacity = desc.capacity.unwrap_or_default();
        NodeSlot {
            name: desc.name,
            labels: desc.labels,
            ready: node.state() == NodeState::Ready,
            drained: node.availability() == NodeAvailability::Drain,
            cpu_capacity: capacity.cpu_millis,
            memory_capacity: capacity.memory_bytes,
            ..NodeSlot::default()
        }
    }

    /// How full the node is, in thousandths of its scarcer resource.
    pub fn load_permille(&self) -> u64 {
        let ratio = |used: u64, cap: u64| {
            if cap == 0 {
                0
            } else {
                (u128::from(used) * 1000 / u128::from(cap)) as u64
            }
        };
        ratio(self.cpu_used, self.cpu_capacity).max(ratio(self.memory_used, self.memory_capacity))
    }
}

/// Every node (sorted by name) and the replicas of each service on each.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub nodes: Vec<NodeSlot>,
    by_name: HashMap<String, usize>,
    /// Live replicas of each service per node index, loaded per service when first needed.
    per_service: HashMap<ServiceKey, HashMap<usize, u32>>,
    /// Tasks released in this pass (their node went down): not counted when a service loads.
    released: HashSet<String>,
}

impl ClusterView {
    pub fn new(nodes: Vec<NodeSlot>) -> ClusterView {
        let mut nodes = nodes;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let by_name = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        ClusterView {
            nodes,
            by_name,
            per_service: HashMap::new(),
            released: HashSet::new(),
        }
    }

    /// The store's nodes with what their tasks hold: O(nodes), from the store's allocations.
    pub fn from_store(store: &Store) -> ClusterView {
        let nodes = store
            .nodes()
            .map(|node| {
                let mut slot = NodeSlot::from_node(node);
                if let Some(a) = store.allocation(&slot.name) {
                    slot.cpu_used = a.cpu_millis;
                    slot.memory_used = a.memory_bytes;
                    slot.ports = a.ports.keys().copied().collect();
                }
                slot
            })
            .collect();
        ClusterView::new(nodes)
    }

    /// Counts the replicas of `key` per node (once per pass and service), for spreading.
    pub fn load_service(&mut self, store: &Store, key: &ServiceKey) {
        if self.per_service.contains_key(key) {
            return;
        }
        let mut counts: HashMap<usize, u32> = HashMap::new();
        for task in store.tasks_of_service(&key.0, &key.1) {
            if holds_resources(task)
                && !self.released.contains(&task.id)
                && let Some(index) = self.index_of(&task.node)
            {
                *counts.entry(index).or_default() += 1;
            }
        }
        self.per_service.insert(key.clone(), counts);
    }

    pub fn index_of(&self, node: &str) -> Option<usize> {
        self.by_name.get(node).copied()
    }

    /// Releases what `task` held on its node (it is being stopped for good in this pass, e.g.
    /// lost with its node).
    pub fn release(&mut self, task: &Task) {
        let Some(index) = self.index_of(&task.node) else {
            return;
        };
        if !self.released.insert(task.id.clone()) {
            return;
        }
        let (cpu, memory) = requested(task);
        let node = &mut self.nodes[index];
        node.cpu_used = node.cpu_used.saturating_sub(cpu);
        node.memory_used = node.memory_used.saturating_sub(memory);
        for port in host_ports(task) {
            node.ports.remove(&port);
        }
        let key = (
            normalize_namespace(&task.namespace).to_string(),
            task.service.clone(),
        );
        if let Some(count) = self
            .per_service
            .get_mut(&key)
            .and_then(|m| m.get_mut(&index))
        {
            *count = count.saturating_sub(1);
        }
    }

    /// Accounts a new placement of `req` on node `index`.
    pub fn assign(&mut self, index: usize, req: &Request<'_>) {
        self.add(
            index,
            req.service,
            req.cpu_millis,
            req.memory_bytes,
            &req.host_ports,
        );
    }

    fn add(&mut self, index: usize, key: &ServiceKey, cpu: u64, memory: u64, ports: &[(i32, u32)]) {
        let node = &mut self.nodes[index];
        node.cpu_used += cpu;
        node.memory_used += memory;
        node.ports.extend(ports.iter().copied());
        *self
            .per_service
            .entry(key.clone())
            .or_default()
            .entry(index)
            .or_default() += 1;
    }

    pub fn count_on_node(&self, index: usize, service: &ServiceKey) -> u32 {
        self.per_service
            .get(service)
            .and_then(|m| m.get(&index))
            .copied()
            .unwrap_or(0)
    }

    /// Replicas of `service` per value of node label `label` (nodes without it form the group "").
    pub fn group_counts(&self, label: &str, service: &ServiceKey) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for (index, count) in self.per_service.get(service).into_iter().flatten() {
            *out.entry(self.label_of(*index, label)).or_default() += count;
        }
        out
    }

    pub fn label_of(&self, index: usize, label: &str) -> String {
        self.nodes[index]
            .labels
            .get(label)
            .cloned()
            .unwrap_or_default()
    }
}
