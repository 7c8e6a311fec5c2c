//! The cluster's network map, kept by every replica for the agents' `Network` streams: each
//! node's subnet and address (peers: host-gw routes, VXLAN tunnels) and each service's ready
//! endpoints (service DNS). Built once from the store, then kept current from its changes;
//! a burst of changes is published as one map at most every [`THROTTLE`].

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tug_api::v1::{
    DesiredState, NetworkMap, NetworkPeer, Node, ServiceEndpoints, Task, TaskHealth, TaskState,
};

use crate::raft::NodeHandle;
use crate::state::{EventKind, Object, Store, WatchError, WatchEvent, normalize_namespace};

/// The shortest time between two published maps.
const THROTTLE: Duration = Duration::from_millis(100);

/// Readers of the current map; cheap to clone.
#[derive(Debug, Clone)]
pub struct NetworkWatch(watch::Receiver<Arc<NetworkMap>>);

impl NetworkWatch {
    pub fn subscribe(&self) -> watch::Receiver<Arc<NetworkMap>> {
        self.0.clone()
    }

    /// Starts keeping the map of `handle`'s store until `stopping` turns true.
    pub fn spawn(handle: NodeHandle, mut stopping: watch::Receiver<bool>) -> NetworkWatch {
        let (tx, rx) = watch::channel(Arc::new(NetworkMap::default()));
        tokio::spawn(async move {
            tokio::select! {
                () = keep(handle, tx) => {}
                _ = stopping.wait_for(|s| *s) => {}
            }
        });
        NetworkWatch(rx)
    }
}

async fn keep(handle: NodeHandle, tx: watch::Sender<Arc<NetworkMap>>) {
    loop {
        let mut watcher = match handle.watch(0) {
            Ok(w) => w,
            Err(WatchError::Closed) => return,
            Err(_) => {
                tokio::time::sleep(THROTTLE).await;
                continue;
            }
        };
        let mut map = MapState::from_store(&handle.store().read());
        tx.send_replace(Arc::new(map.build()));
        let mut last = Instant::now();
        let mut dirty = false;
        loop {
            let deadline = last + THROTTLE;
            tokio::select! {
                ev = watcher.next() => match ev {
                    Ok(ev) => dirty |= map.apply(&ev),
                    Err(WatchError::Closed) => return,
                    Err(err) => {
                        tracing::debug!(cause = %err, "network map resyncs");
                        break;
                    }
                },
                () = tokio::time::sleep_until(deadline), if dirty => {
                    if map.cluster_cidr.is_empty() {
                        // The first registration fixes it.
                        if let Some(n) = handle.store().read().cluster_network() {
                            map.cluster_cidr = n.cidr.to_string();
                        }
                    }
                    tx.send_replace(Arc::new(map.build()));
                    last = Instant::now();
                    dirty = false;
                }
            }
        }
    }
}

/// The map's parts, keyed so changes apply in place.
#[derive(Debug, Default)]
struct MapState {
    cluster_cidr: String,
    peers: BTreeMap<String, NetworkPeer>,
    /// (namespace, service) → task id → address.
    endpoints: BTreeMap<(String, String), BTreeMap<String, String>>,
    revision: u64,
}

impl MapState {
    fn from_store(store: &Store) -> MapState {
        let mut map = MapState {
            cluster_cidr: store
                .cluster_network()
                .map(|n| n.cidr.to_string())
                .unwrap_or_default(),
            revision: store.revision(),
            ..Default::default()
        };
        for node in store.nodes() {
            map.put_node(node);
        }
        for task in store.tasks() {
            map.put_task(task);
        }
        map
    }

    /// Applies one change; whether the map changed.
    fn apply(&mut self, ev: &WatchEvent) -> bool {
        self.revision = ev.revision;
        match (&ev.object, ev.kind) {
            (Object::Node(node), EventKind::Put) => self.put_node(node),
            (Object::Node(node), EventKind::Delete) => {
                let name = node.description.as_ref().map_or("", |d| d.name.as_str());
                self.peers.remove(name).is_some()
            }
            (Object::Task(task), EventKind::Put) => self.put_task(task),
            (Object::Task(task), EventKind::Delete) => self.remove_task(task),
            (Object::Service(_), _) => false,
        }
    }

    fn put_node(&mut self, node: &Node) -> bool {
        let Some(desc) = node.description.as_ref() else {
            return false;
        };
        let Some(peer) = peer_of(node) else {
            return self.peers.remove(&desc.name).is_some();
        };
        self.peers.insert(desc.name.clone(), peer.clone()) != Some(peer)
    }

    fn put_task(&mut self, task: &Task) -> bool {
        let key = service_key(task);
        match endpoint_of(task) {
            Some(address) => {
                let eps = self.endpoints.entry(key).or_default();
                eps.insert(task.id.clone(), address.clone()) != Some(address)
            }
            None => self.remove_task(task),
        }
    }

    fn remove_task(&mut self, task: &Task) -> bool {
        let key = service_key(task);
        let Some(eps) = self.endpoints.get_mut(&key) else {
            return false;
        };
        let removed = eps.remove(&task.id).is_some();
        if eps.is_empty() {
            self.endpoints.remove(&key);
        }
        removed
    }

    fn build(&self) -> NetworkMap {
        NetworkMap {
            cluster_cidr: self.cluster_cidr.clone(),
            peers: self.peers.values().cloned().collect(),
            services: self
                .endpoints
                .iter()
                .map(|((namespace, name), eps)| {
                    let mut addresses: Vec<String> = eps.values().cloned().collect();
                    addresses.sort();
                    ServiceEndpoints {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        addresses,
                    }
                })
                .collect(),
            revision: self.revision,
        }
    }
}

fn service_key(task: &Task) -> (String, String) {
    (
        normalize_namespace(&task.namespace).to_string(),
        task.service.clone(),
    )
}

/// A node as a peer: it needs a subnet and an IPv4 address.
fn peer_of(node: &Node) -> Option<NetworkPeer> {
    let desc = node.description.as_ref()?;
    if node.subnet.is_empty() {
        return None;
    }
    let node_ip = if desc.node_ip.is_empty() {
        desc.address.parse::<SocketAddrV4>().ok()?.ip().to_string()
    } else {
        desc.node_ip.clone()
    };
    Some(NetworkPeer {
        name: desc.name.clone(),
        node_ip,
        subnet: node.subnet.clone(),
    })
}

/// The address DNS answers with for `task`: it runs, is wanted, has an address and is not known
/// to be unhealthy or still starting its health checks.
fn endpoint_of(task: &Task) -> Option<String> {
    let status = task.status.as_ref()?;
    let ready = status.state() == TaskState::Running
        && task.desired_state() == DesiredState::Running
        && !status.address.is_empty()
        && !matches!(
            status.health(),
            TaskHealth::Starting | TaskHealth::Unhealthy
        );
    ready.then(|| status.address.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tug_api::v1::{NodeDescription, TaskStatus};

    fn node(name: &str, address: &str, subnet: &str) -> Node {
        Node {
            description: Some(NodeDescription {
                name: name.into(),
                address: address.into(),
                ..Default::default()
            }),
            subnet: subnet.into(),
            ..Default::default()
        }
    }

    fn task(id: &str, state: TaskState, health: TaskHealth, address: &str) -> Task {
        Task {
            id: id.into(),
            service: "web".into(),
            desired_state: DesiredState::Running.into(),
            status: Some(TaskStatus {
                state: state.into(),
                health: health.into(),
                address: address.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn put(object: Object) -> WatchEvent {
        WatchEvent {
            kind: EventKind::Put,
            object,
            revision: 1,
        }
    }

    #[test]
    fn peers_need_a_subnet_and_an_ipv4_address() {
        let mut map = MapState::default();
        assert!(map.apply(&put(Object::Node(Arc::new(node(
            "a",
            "10.0.0.1:7441",
            "10.88.0.0/24"
        ))))));
        assert!(!map.apply(&put(Object::Node(Arc::new(node(
            "a",
            "10.0.0.1:7441",
            "10.88.0.0/24"
        ))))));
        assert!(!map.apply(&put(Object::Node(Arc::new(node("b", "10.0.0.2:7441", ""))))));
        assert!(!map.apply(&put(Object::Node(Arc::new(node(
            "c",
            "host:7441",
            "10.88.2.0/24"
        ))))));
        let mut with_ip = node("d", "host:7441", "10.88.3.0/24");
        if let Some(d) = with_ip.description.as_mut() {
            d.node_ip = "10.0.0.4".into();
        }
        assert!(map.apply(&put(Object::Node(Arc::new(with_ip.clone())))));
        let built = map.build();
        let ips: Vec<&str> = built.peers.iter().map(|p| p.node_ip.as_str()).collect();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.4"]);
        assert!(map.apply(&WatchEvent {
            kind: EventKind::Delete,
            object: Object::Node(Arc::new(with_ip)),
            revision: 2,
        }));
        assert_eq!(map.build().peers.len(), 1);
    }

    #[test]
    fn endpoints_are_running_wanted_addressed_and_not_unhealthy() {
        let mut map = MapState::default();
        let cases = [
            task("web.1", TaskState::Running, TaskHealth::None, "10.88.0.2"),
            task(
                "web.2",
                TaskState::Running,
                TaskHealth::Healthy,
                "10.88.0.3",
            ),
            task(
                "web.3",
                TaskState::Running,
                TaskHealth::Starting,
                "10.88.0.4",
            ),
            task(
                "web.4",
                TaskState::Running,
                TaskHealth::Unhealthy,
                "10.88.0.5",
            ),
            task("web.5", TaskState::Starting, TaskHealth::None, "10.88.0.6"),
            task("web.6", TaskState::Running, TaskHealth::None, ""),
        ];
        for t in cases {
            map.apply(&put(Object::Task(Arc::new(t))));
        }
        let mut stopping = task("web.1", TaskState::Running, TaskHealth::None, "10.88.0.2");
        stopping.desired_state = DesiredState::Shutdown.into();
        let built = map.build();
        assert_eq!(built.services.len(), 1);
        assert_eq!(built.services[0].addresses, ["10.88.0.2", "10.88.0.3"]);
        assert!(map.apply(&put(Object::Task(Arc::new(stopping)))));
        assert_eq!(map.build().services[0].addresses, ["10.88.0.3"]);
    }
}
