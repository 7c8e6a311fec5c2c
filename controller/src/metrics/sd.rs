//! Prometheus HTTP service discovery (`http_sd_configs`): every controller's and every agent's
//! `/metrics` endpoint, one target group each, labelled `node`, `role` and `zone`, so one
//! Prometheus job finds the whole cluster through any controller.
//!
//! Controllers' endpoints follow one rule: a replica's metrics are on the host of its peer
//! address, at the metrics port of the replica answering (every replica of a cluster is started
//! with the same `--metrics-listen` port); the answering replica lists its own advertised
//! address. Agents register theirs (`NodeDescription.metrics_address`).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tug_api::v1::NodeState;

use crate::state::Store;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub address: String,
    pub node: String,
    pub role: &'static str,
    pub zone: String,
}

/// The host part of `host:port` (IPv6 hosts keep their brackets).
pub fn host_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(host, _)| host)
}

/// The controllers that are members (by id), at `host-of-peer:metrics_port`; `own` is this
/// replica's id and advertised metrics address.
pub fn controller_targets(
    peers: &BTreeMap<u64, String>,
    members: &[u64],
    metrics_port: u16,
    own: (u64, &str),
) -> Vec<Target> {
    peers
        .iter()
        .filter(|(id, _)| members.is_empty() || members.contains(id))
        .map(|(id, peer)| Target {
            address: if *id == own.0 {
                own.1.to_string()
            } else {
                format!("{}:{metrics_port}", host_of(peer))
            },
            node: format!("controller-{id}"),
            role: "controller",
            zone: String::new(),
        })
        .collect()
}

/// Every registered agent that serves metrics and is not down.
pub fn agent_targets(store: &Store) -> Vec<Target> {
    store
        .nodes()
        .filter(|n| n.state() != NodeState::Down)
        .filter_map(|n| {
            let d = n.description.as_ref()?;
            (!d.metrics_address.is_empty()).then(|| Target {
                address: d.metrics_address.clone(),
                node: d.name.clone(),
                role: "agent",
                zone: d.labels.get("zone").cloned().unwrap_or_default(),
            })
        })
        .collect()
}

/// The JSON document Prometheus expects: `[{"targets": [...], "labels": {...}}, ...]`.
pub fn document(targets: &[Target]) -> Vec<u8> {
    let groups: Vec<Value> = targets
        .iter()
        .map(|t| {
            json!({
                "targets": [t.address],
                "labels": {"node": t.node, "role": t.role, "zone": t.zone},
            })
        })
        .collect();
    serde_json::to_vec(&Value::Array(groups)).unwrap_or_else(|_| b"[]".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tug_api::v1::NodeDescription;

    #[test]
    fn controllers_and_agents_are_listed_with_labels() -> Result<(), Box<dyn std::error::Error>> {
        let peers = BTreeMap::from([
            (1, "10.0.0.1:7440".to_string()),
            (2, "10.0.0.2:7440".to_string()),
            (3, "10.0.0.3:7440".to_string()),
        ]);
        let controllers = controller_targets(&peers, &[1, 2], 7442, (2, "10.0.0.2:9000"));
        assert_eq!(
            controllers
                .iter()
                .map(|t| t.address.as_str())
                .collect::<Vec<_>>(),
            ["10.0.0.1:7442", "10.0.0.2:9000"],
            "members only; this replica at its own address"
        );
        let mut store = Store::new(10);
        let desc = |name: &str, metrics: &str| NodeDescription {
            name: name.into(),
            address: "x:7441".into(),
            metrics_address: metrics.into(),
            labels: HashMap::from([("zone".to_string(), "z1".to_string())]),
            ..Default::default()
        };
        store.register_node(2, desc("a1", "10.0.1.1:7443"), 0, None)?;
        store.register_node(3, desc("a2", ""), 0, None)?;
        let agents = agent_targets(&store);
        assert_eq!(agents.len(), 1, "an agent without metrics is not a target");
        let doc: Value =
            serde_json::from_slice(&document(&[controllers[0].clone(), agents[0].clone()]))?;
        assert_eq!(doc[0]["targets"][0], "10.0.0.1:7442");
        assert_eq!(doc[0]["labels"]["role"], "controller");
        assert_eq!(doc[1]["labels"]["node"], "a1");
        assert_eq!(doc[1]["labels"]["zone"], "z1");
        assert_eq!(doc[1]["labels"]["role"], "agent");
        assert_eq!(host_of("[::1]:7440"), "[::1]");
        Ok(())
    }
}
