//! Nodes in the store: registered by their agents, marked down by the leader's liveness check,
//! drained and uncordoned by the operator. Heartbeats never reach here (they live in the leader's
//! memory); only transitions do.

use std::sync::Arc;
use tug_api::v1::{Node, NodeAvailability, NodeDescription, NodeState};

use super::store::{Store, StoreError};
use super::subnets::ClusterNetwork;
use super::watch::{EventKind, Object};

impl Store {
    pub fn get_node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name).map(Arc::as_ref)
    }

    /// Every node, ordered by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().map(Arc::as_ref)
    }

    /// The cluster's container address plan, once a registration fixed it.
    pub fn cluster_network(&self) -> Option<ClusterNetwork> {
        self.subnets.network()
    }

    /// Creates the node or refreshes its description, and marks it ready. The operator's drain
    /// and the node's subnet survive a re-registration. `network` (the leader's flags) fixes the
    /// cluster network if no registration did yet; a node without a subnet gets the lowest free
    /// one. Nothing changes when none is free.
    pub(crate) fn register_node(
        &mut self,
        index: u64,
        description: NodeDescription,
        now_ms: u64,
        network: Option<ClusterNetwork>,
    ) -> Result<Node, StoreError> {
        if description.name.is_empty() {
            return Err(StoreError::NodeWithoutName);
        }
        let old_subnet = self
            .nodes
            .get(&description.name)
            .map(|n| n.subnet.clone())
            .unwrap_or_default();
        let subnet = if !old_subnet.is_empty() {
            old_subnet
        } else if !description.container_network {
            String::new()
        } else if let Some(network) = network.or(self.subnets.network()) {
            // Settling first is harmless if the allocation fails: the first registration cannot
            // find the pool full.
            self.subnets.settle(network);
            self.subnets.allocate(&description.name)?.to_string()
        } else {
            String::new()
        };
        let node = match self.nodes.get(&description.name) {
            Some(old) => Node {
                description: Some(description),
                state: NodeState::Ready.into(),
                state_changed_ms: if old.state() == NodeState::Ready {
                    old.state_changed_ms
                } else {
                    now_ms
                },
                message: String::new(),
                revision: index,
                subnet,
                ..(**old).clone()
            },
            None => Node {
                description: Some(description),
                state: NodeState::Ready.into(),
                availability: NodeAvailability::Active.into(),
                create_revision: index,
                revision: index,
                state_changed_ms: now_ms,
                message: String::new(),
                subnet,
            },
        };
        Ok(self.put_node(index, node))
    }

    /// Moves a node to `state` (ready or down) with a reason. Unchanged if it is there already.
    pub(crate) fn set_node_state(
        &mut self,
        index: u64,
        name: &str,
        state: NodeState,
        message: String,
        now_ms: u64,
    ) -> Result<Node, StoreError> {
        let old = self
            .nodes
            .get(name)
            .ok_or_else(|| StoreError::NodeNotFound(name.to_string()))?;
        if old.state() == state {
            return Ok((**old).clone());
        }
        let node = Node {
            state: state.into(),
            state_changed_ms: now_ms,
            message,
            revision: index,
            ..(**old).clone()
        };
        Ok(self.put_node(index, node))
    }

    pub(crate) fn set_node_availability(
        &mut self,
        index: u64,
        name: &str,
        availability: NodeAvailability,
    ) -> Result<Node, StoreError> {
        let old = self
            .nodes
            .get(name)
            .ok_or_else(|| StoreError::NodeNotFound(name.to_string()))?;
        if old.availability() == availability {
            return Ok((**old).clone());
        }
        let node = Node {
            availability: availability.into(),
            revision: index,
            ..(**old).clone()
        };
        Ok(self.put_node(index, node))
    }

    /// Forgets a down node: its tasks go (the reconciler replaces the wanted ones) and its
    /// subnet is free again. A ready node is refused: its agent would register it again.
    pub(crate) fn remove_node(&mut self, index: u64, name: &str) -> Result<Node, StoreError> {
        let node = self
            .nodes
            .get(name)
            .ok_or_else(|| StoreError::NodeNotFound(name.to_string()))?;
        if node.state() != NodeState::Down {
            let state = match node.state() {
                NodeState::Ready => "ready",
                _ => "not down",
            };
            return Err(StoreError::NodeNotDown(name.to_string(), state));
        }
        let ids: Vec<String> = self
            .tasks_by_node
            .get(name)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default();
        self.remove_tasks(index, ids);
        let node = self
            .nodes
            .remove(name)
            .map(Arc::unwrap_or_clone)
            .ok_or_else(|| StoreError::NodeNotFound(name.to_string()))?;
        self.subnets.release(name, &node.subnet);
        let mut gone = node.clone();
        gone.revision = index;
        self.publish(EventKind::Delete, Object::Node(Arc::new(gone)), index);
        Ok(node)
    }

    fn put_node(&mut self, index: u64, node: Node) -> Node {
        let name = node.description.as_ref().map_or("", |d| d.name.as_str());
        let shared = Arc::new(node.clone());
        self.nodes.insert(name.to_string(), Arc::clone(&shared));
        self.publish(EventKind::Put, Object::Node(shared), index);
        node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: &str) -> NodeDescription {
        NodeDescription {
            name: name.into(),
            address: "10.0.0.1:7441".into(),
            ..Default::default()
        }
    }

    #[test]
    fn registration_marks_ready_and_keeps_the_drain() -> Result<(), StoreError> {
        let mut store = Store::new(100);
        let n = store.register_node(2, desc("a"), 1000, None)?;
        assert_eq!(
            (n.state(), n.availability(), n.create_revision),
            (NodeState::Ready, NodeAvailability::Active, 2)
        );
        store.set_node_availability(3, "a", NodeAvailability::Drain)?;
        let n = store.set_node_state(4, "a", NodeState::Down, "missed heartbeats".into(), 2000)?;
        assert_eq!((n.state(), n.state_changed_ms), (NodeState::Down, 2000));
        let n = store.register_node(5, desc("a"), 3000, None)?;
        assert_eq!(
            (n.state(), n.availability(), n.state_changed_ms),
            (NodeState::Ready, NodeAvailability::Drain, 3000)
        );
        assert_eq!((n.create_revision, n.revision), (2, 5));
        Ok(())
    }

    #[test]
    fn unknown_nodes_and_nameless_registrations_are_refused() {
        let mut store = Store::new(100);
        assert_eq!(
            store.set_node_availability(2, "x", NodeAvailability::Drain),
            Err(StoreError::NodeNotFound("x".into()))
        );
        assert_eq!(
            store.register_node(2, desc(""), 0, None),
            Err(StoreError::NodeWithoutName)
        );
        assert_eq!(store.nodes().count(), 0);
    }
}
