//! Read-only views of the store that the API serves: filtered task lists, and nodes with what is
//! allocated on them. Pure functions of the store.

use tug_api::v1::{ListTasksRequest, NodeInfo, Resources, Task};

pub use crate::state::task_state;
use crate::state::{Store, normalize_namespace};

/// Tasks matching the request's filters, ordered by namespace, service, slot, then newest first.
pub fn tasks(store: &Store, req: &ListTasksRequest) -> Vec<Task> {
    let candidates: Vec<&Task> = if !req.service.is_empty() {
        store.tasks_of_service(&req.namespace, &req.service)
    } else if !req.node.is_empty() {
        store.tasks_of_node(&req.node)
    } else {
        store.tasks().collect()
    };
    let mut out: Vec<Task> = candidates
        .into_iter()
        .filter(|t| req.node.is_empty() || t.node == req.node)
        .filter(|t| req.namespace.is_empty() || t.namespace == normalize_namespace(&req.namespace))
        .filter(|t| {
            if req.label_selector.is_empty() {
                return true;
            }
            let labels = store
                .get_service(&t.namespace, &t.service)
                .and_then(|s| s.metadata.as_ref())
                .map(|m| &m.labels);
            req.label_selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .cloned()
        .collect();
    out.sort_by(|a, b| {
        (
            &a.namespace,
            &a.service,
            a.slot,
            std::cmp::Reverse(a.create_revision),
        )
            .cmp(&(
                &b.namespace,
                &b.service,
                b.slot,
                std::cmp::Reverse(b.create_revision),
            ))
    });
    out
}

/// Every node with the resources and number of the tasks it holds.
pub fn nodes(store: &Store) -> Vec<NodeInfo> {
    store
        .nodes()
        .map(|node| {
            let name = node.description.as_ref().map_or("", |d| d.name.as_str());
            let alloc = store.allocation(name).cloned().unwrap_or_default();
            let (cpu, memory, count) = (alloc.cpu_millis, alloc.memory_bytes, alloc.tasks);
            NodeInfo {
                node: Some(node.clone()),
                allocated: Some(Resources {
                    cpu_millis: cpu,
                    memory_bytes: memory,
                }),
                tasks: count,
            }
        })
        .collect()
}
