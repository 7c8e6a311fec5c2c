use std::collections::HashMap;

use super::*;

fn node(name: &str, zone: &str, cpu: u64, memory: u64) -> NodeSlot {
    NodeSlot {
        name: name.into(),
        labels: HashMap::from([("zone".to_string(), zone.to_string())]),
        ready: true,
        cpu_capacity: cpu,
        memory_capacity: memory,
        ..NodeSlot::default()
    }
}

fn key(name: &str) -> ServiceKey {
    ("default".into(), name.into())
}

fn request(service: &ServiceKey) -> Request<'_> {
    Request {
        service,
        cpu_millis: 100,
        memory_bytes: 100,
        host_ports: vec![],
        constraints: vec![],
        spread_label: None,
        binpack: false,
    }
}

fn counts(nodes: &[String]) -> HashMap<&str, usize> {
    let mut out = HashMap::new();
    for n in nodes {
        *out.entry(n.as_str()).or_default() += 1;
    }
    out
}

#[test]
fn spreads_evenly_and_deterministically() {
    let web = key("web");
    let make = || {
        ClusterView::new(vec![
            node("c", "a", 4000, 1 << 30),
            node("a", "a", 4000, 1 << 30),
            node("b", "b", 4000, 1 << 30),
        ])
    };
    let mut view = make();
    let placed = place(&mut view, &request(&web), 6);
    assert_eq!(placed.reason, "");
    let c = counts(&placed.nodes);
    assert_eq!((c["a"], c["b"], c["c"]), (2, 2, 2));
    let again = place(&mut make(), &request(&web), 6);
    assert_eq!(placed, again, "same input, same placements");
    // Three more land one per node: earlier placements of the pass count.
    let more = place(&mut view, &request(&web), 3);
    let c = counts(&more.nodes);
    assert_eq!((c["a"], c["b"], c["c"]), (1, 1, 1));
}

#[test]
fn spreads_across_a_label_first() {
    let web = key("web");
    let mut view = ClusterView::new(vec![
        node("a1", "a", 4000, 1 << 30),
        node("a2", "a", 4000, 1 << 30),
        node("a3", "a", 4000, 1 << 30),
        node("b1", "b", 4000, 1 << 30),
    ]);
    let req = Request {
        spread_label: Some("zone"),
        ..request(&web)
    };
    let placed = place(&mut view, &req, 4);
    let on_b = placed.nodes.iter().filter(|n| *n == "b1").count();
    assert_eq!(on_b, 2, "zone b gets half: {:?}", placed.nodes);
}

#[test]
fn binpack_fills_one_node_first() {
    let web = key("web");
    let mut view = ClusterView::new(vec![
        node("a", "a", 1000, 1 << 30),
        node("b", "a", 1000, 1 << 30),
    ]);
    let req = Request {
        binpack: true,
        cpu_millis: 400,
        ..request(&web)
    };
    let placed = place(&mut view, &req, 3);
    assert_eq!(placed.nodes, vec!["a", "a", "b"]);
}

#[test]
fn resources_ports_and_constraints_filter_with_a_reason() -> Result<(), ConstraintError> {
    let web = key("web");
    let mut small = node("small", "a", 4000, 100);
    small.memory_used = 50;
    let mut drained = node("drained", "a", 4000, 1 << 30);
    drained.drained = true;
    let mut down = node("down", "a", 4000, 1 << 30);
    down.ready = false;
    let mut view = ClusterView::new(vec![small, drained, down, node("ok", "b", 4000, 1 << 30)]);
    let req = Request {
        host_ports: vec![(1, 80)],
        ..request(&web)
    };
    let placed = place(&mut view, &req, 2);
    assert_eq!(
        placed.nodes,
        vec!["ok"],
        "the second replica would reuse port 80"
    );
    assert_eq!(
        placed.reason,
        "0/4 nodes available: 1 not ready, 1 drained, 1 insufficient memory, 1 host port in use"
    );
    let req = Request {
        constraints: vec![Constraint::parse("zone==a")?],
        ..request(&web)
    };
    let placed = place(&mut view, &req, 1);
    assert!(placed.nodes.is_empty());
    assert!(
        placed
            .reason
            .contains("1 not matching the placement constraints")
    );
    assert!(Constraint::parse("zone").is_err());
    assert!(Constraint::parse("!=x").is_err());
    Ok(())
}

#[test]
fn no_nodes_is_a_clear_reason() {
    let web = key("web");
    let placed = place(&mut ClusterView::new(vec![]), &request(&web), 1);
    assert_eq!(placed.reason, "0/0 nodes available: no nodes registered");
}

#[test]
fn a_big_cluster_places_quickly_and_evenly() {
    let web = key("web");
    let nodes = (0..2000)
        .map(|i| node(&format!("n{i:05}"), &format!("z{}", i % 3), 64_000, 1 << 40))
        .collect();
    let mut view = ClusterView::new(nodes);
    let placed = place(&mut view, &request(&web), 20_000);
    assert_eq!(placed.nodes.len(), 20_000);
    let c = counts(&placed.nodes);
    assert!(c.values().all(|n| *n == 10), "10 per node");
}
