//! Read-only views of the store that the API serves: filtered task lists, and nodes with what is
//! allocated on them. Pure functions of the store.

use tug_api::v1::{ListTasksRequest, NodeInfo, Resources, Task};

pub use crate::state::task_state;
use crate::state::{Store, normalize_namespace};

/// Tasks matching the request's filters, ordered by namespace, service, slot, newest first, then
/// id.
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
            &a.id,
        )
            .cmp(&(
                &b.namespace,
                &b.service,
                b.slot,
                std::cmp::Reverse(b.create_revision),
                &b.id,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Plan, Store};
    use tug_api::v1::{NodeDescription, ObjectMeta, Service, ServiceSpec, TaskState, TaskStatus};

    fn service(ns: &str, name: &str, app: &str) -> Service {
        Service {
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: ns.into(),
                labels: [("app".to_string(), app.to_string())].into(),
                ..Default::default()
            }),
            spec: Some(
                ServiceSpec {
                    image: "x".into(),
                    replicas: 1,
                    ..Default::default()
                }
                .into(),
            ),
            previous_spec: None,
        }
    }

    fn task(id: &str, ns: &str, svc: &str, node: &str, state: TaskState) -> Task {
        Task {
            id: id.into(),
            namespace: ns.into(),
            service: svc.into(),
            slot: 1,
            node: node.into(),
            spec: Some(
                ServiceSpec {
                    resources: Some(Resources {
                        cpu_millis: 100,
                        memory_bytes: 1000,
                    }),
                    ..Default::default()
                }
                .into(),
            ),
            status: Some(TaskStatus {
                state: state.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn tasks_filter_by_service_node_namespace_and_labels_and_nodes_sum_allocations()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut store = Store::new(100);
        store.apply_services(
            2,
            vec![
                service("", "web", "web"),
                service("", "api", "api"),
                service("prod", "web", "web"),
            ],
        )?;
        store.register_node(
            3,
            NodeDescription {
                name: "n1".into(),
                ..Default::default()
            },
            0,
            None,
        )?;
        store.apply_plan(
            4,
            Plan {
                create: vec![
                    task("w1", "", "web", "n1", TaskState::Running),
                    task("w2", "", "web", "n2", TaskState::Running),
                    task("a1", "", "api", "n1", TaskState::Stopped),
                    task("p1", "prod", "web", "n1", TaskState::Running),
                ],
                ..Default::default()
            },
        );
        let ids = |req: ListTasksRequest| -> Vec<String> {
            tasks(&store, &req).into_iter().map(|t| t.id).collect()
        };
        assert_eq!(
            ids(ListTasksRequest {
                service: "web".into(),
                ..Default::default()
            }),
            vec!["w1", "w2"]
        );
        assert_eq!(
            ids(ListTasksRequest {
                node: "n1".into(),
                ..Default::default()
            }),
            vec!["a1", "w1", "p1"]
        );
        assert_eq!(
            ids(ListTasksRequest {
                label_selector: [("app".to_string(), "web".to_string())].into(),
                ..Default::default()
            }),
            vec!["w1", "w2", "p1"]
        );
        assert_eq!(
            ids(ListTasksRequest {
                namespace: "prod".into(),
                ..Default::default()
            }),
            vec!["p1"]
        );
        let infos = nodes(&store);
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].tasks, 2, "the stopped task holds nothing");
        assert_eq!(
            infos[0].allocated,
            Some(Resources {
                cpu_millis: 200,
                memory_bytes: 2000
            })
        );
        Ok(())
    }
}
