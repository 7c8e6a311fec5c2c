//! `tug top nodes|services`: live usage without a Prometheus server. Agents send a usage
//! summary of their running tasks with their status reports; the leader keeps the latest in
//! memory and answers `Top`. Here it is summed per node (against the node's capacity) or per
//! service.

use std::collections::BTreeMap;

use serde::Serialize;
use tug_api::v1::{ListNodesRequest, ReadOptions, TaskUsageInfo, TopRequest};

use super::client::{addresses, block_on, call, emit};
use crate::args::{GlobalArgs, OutputFormat};
use crate::output::{bytes, table};

/// One row of `tug top nodes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub node: String,
    pub tasks: usize,
    pub cpu_millis: u64,
    pub cpu_capacity_millis: u64,
    pub memory_bytes: u64,
    pub memory_capacity_bytes: u64,
}

/// One row of `tug top services`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    pub namespace: String,
    pub service: String,
    pub tasks: usize,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// Usage per node; `capacity` (node -> (cpu millis, memory bytes)) adds nodes with no tasks.
pub fn by_node(tasks: &[TaskUsageInfo], capacity: &BTreeMap<String, (u64, u64)>) -> Vec<NodeRow> {
    let mut rows: BTreeMap<String, NodeRow> = capacity
        .iter()
        .map(|(node, (cpu, mem))| {
            let row = NodeRow {
                node: node.clone(),
                cpu_capacity_millis: *cpu,
                memory_capacity_bytes: *mem,
                ..NodeRow::default()
            };
            (node.clone(), row)
        })
        .collect();
    for t in tasks {
        let row = rows.entry(t.node.clone()).or_insert_with(|| NodeRow {
            node: t.node.clone(),
            ..NodeRow::default()
        });
        row.tasks += 1;
        row.cpu_millis += t.cpu_millis;
        row.memory_bytes += t.memory_bytes;
    }
    rows.into_values().collect()
}

/// Usage per service, optionally of one namespace.
pub fn by_service(tasks: &[TaskUsageInfo], namespace: Option<&str>) -> Vec<ServiceRow> {
    let mut rows: BTreeMap<(String, String), ServiceRow> = BTreeMap::new();
    for t in tasks
        .iter()
        .filter(|t| namespace.is_none_or(|ns| ns == t.namespace))
    {
        let row = rows
            .entry((t.namespace.clone(), t.service.clone()))
            .or_insert_with(|| ServiceRow {
                namespace: t.namespace.clone(),
                service: t.service.clone(),
                ..ServiceRow::default()
            });
        row.tasks += 1;
        row.cpu_millis += t.cpu_millis;
        row.memory_bytes += t.memory_bytes;
    }
    rows.into_values().collect()
}

fn percent(used: u64, of: u64) -> String {
    if of == 0 {
        "-".into()
    } else {
        format!("{:.0}%", used as f64 * 100.0 / of as f64)
    }
}

fn usage(global: &GlobalArgs) -> anyhow::Result<Vec<TaskUsageInfo>> {
    let addrs = addresses(global);
    Ok(block_on(call(
        &addrs,
        |mut c| async move { c.top(TopRequest {}).await },
    ))?
    .tasks)
}

fn print<T: Serialize>(
    rows: &[T],
    output: Option<OutputFormat>,
    table_text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    match output {
        Some(OutputFormat::Json) => emit(&serde_json::to_string_pretty(rows)?),
        Some(OutputFormat::Yaml) => emit(serde_yaml_ng::to_string(rows)?.trim_end()),
        _ => emit(table_text().trim_end()),
    }
}

pub fn nodes(global: &GlobalArgs, output: Option<OutputFormat>) -> anyhow::Result<()> {
    let tasks = usage(global)?;
    let addrs = addresses(global);
    let listed = block_on(call(&addrs, |mut c| async move {
        c.list_nodes(ListNodesRequest {
            read: Some(ReadOptions { stale: true }),
        })
        .await
    }))?;
    let capacity = listed
        .nodes
        .iter()
        .filter_map(|info| {
            let d = info.node.as_ref()?.description.as_ref()?;
            let cap = d.capacity.unwrap_or_default();
            Some((d.name.clone(), (cap.cpu_millis, cap.memory_bytes)))
        })
        .collect();
    let rows = by_node(&tasks, &capacity);
    print(&rows, output, || {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.node.clone(),
                    r.tasks.to_string(),
                    format!("{}m", r.cpu_millis),
                    percent(r.cpu_millis, r.cpu_capacity_millis),
                    bytes(r.memory_bytes),
                    percent(r.memory_bytes, r.memory_capacity_bytes),
                ]
            })
            .collect();
        table(
            &["NODE", "TASKS", "CPU", "CPU%", "MEMORY", "MEMORY%"],
            &cells,
        )
    })
}

pub fn services(
    global: &GlobalArgs,
    namespace: Option<&str>,
    output: Option<OutputFormat>,
) -> anyhow::Result<()> {
    let rows = by_service(&usage(global)?, namespace);
    if rows.is_empty() && output.is_none() {
        eprintln!("No running tasks have reported usage yet.");
        return Ok(());
    }
    print(&rows, output, || {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.namespace.clone(),
                    r.service.clone(),
                    r.tasks.to_string(),
                    format!("{}m", r.cpu_millis),
                    bytes(r.memory_bytes),
                ]
            })
            .collect();
        table(&["NAMESPACE", "SERVICE", "TASKS", "CPU", "MEMORY"], &cells)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(node: &str, ns: &str, svc: &str, cpu: u64, mem: u64) -> TaskUsageInfo {
        TaskUsageInfo {
            task_id: format!("{svc}.{cpu}"),
            namespace: ns.into(),
            service: svc.into(),
            node: node.into(),
            cpu_millis: cpu,
            memory_bytes: mem,
            reported_ms: 1,
        }
    }

    #[test]
    fn usage_is_summed_per_node_and_per_service() {
        let tasks = [
            t("n1", "default", "web", 100, 10),
            t("n1", "default", "db", 300, 30),
            t("n2", "shop", "web", 50, 5),
        ];
        let capacity = BTreeMap::from([
            ("n1".to_string(), (2000, 100)),
            ("n3".to_string(), (1000, 100)),
        ]);
        let nodes = by_node(&tasks, &capacity);
        assert_eq!(
            nodes
                .iter()
                .map(|r| (r.node.as_str(), r.tasks, r.cpu_millis, r.memory_bytes))
                .collect::<Vec<_>>(),
            [("n1", 2, 400, 40), ("n2", 1, 50, 5), ("n3", 0, 0, 0)]
        );
        assert_eq!(percent(400, 2000), "20%");
        assert_eq!(percent(1, 0), "-");
        let services = by_service(&tasks, None);
        assert_eq!(
            services
                .iter()
                .map(|r| (r.namespace.as_str(), r.service.as_str(), r.cpu_millis))
                .collect::<Vec<_>>(),
            [
                ("default", "db", 300),
                ("default", "web", 100),
                ("shop", "web", 50)
            ]
        );
        assert_eq!(by_service(&tasks, Some("shop")).len(), 1);
    }
}
