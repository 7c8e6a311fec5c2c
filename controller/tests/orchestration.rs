//! The controller as an orchestrator, over real gRPC: three replicas on loopback, three simulated
//! agents (tug_e2e::sim_agent: the real node protocol, no containers) each talking to a
//! different replica. Placement, scaling, node loss and return, drain, rolling update across a
//! leader failure, pending reasons, delete.

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tonic::transport::{Channel, Endpoint};
use tug_api::shared::Shared;
use tug_api::v1::control_client::ControlClient;
use tug_api::v1::{
    ApplyRequest, ClusterStatusRequest, DeleteRequest, DesiredState, GetRequest, ListNodesRequest,
    ListTasksRequest, NodeAvailability, NodeState, Resources, RolloutUndoRequest, ScaleRequest,
    Service, SetNodeAvailabilityRequest, Task, TaskState, UpdatePolicy, update_policy,
};
use tug_controller::orchestrator::OrchestratorConfig;
use tug_controller::testing::{self, fast_config};
use tug_controller::{ControllerConfig, ServerError, run};
use tug_e2e::sim_agent::{SimAgent, SimAgentConfig};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

const WAIT: Duration = Duration::from_secs(30);

struct Replica {
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_cluster(dir: &std::path::Path) -> TestResult<Vec<Replica>> {
    let mut listeners = BTreeMap::new();
    for id in 1..=3u64 {
        listeners.insert(id, TcpListener::bind("127.0.0.1:0").await?);
    }
    let peers: BTreeMap<u64, String> = listeners
        .iter()
        .map(|(id, l)| Ok((*id, l.local_addr()?.to_string())))
        .collect::<Result<_, std::io::Error>>()?;
    let mut replicas = Vec::new();
    for (id, listener) in listeners {
        let mut node = fast_config(id, &dir.join(format!("node-{id}")));
        node.initial_members = vec![1, 2, 3];
        let cfg = ControllerConfig {
            node,
            peers: peers.clone(),
            orchestrator: OrchestratorConfig {
                heartbeat_period: Duration::from_millis(200),
                // Full passes go in several chunks, each committed before the next.
                pass_chunk: 2,
                // Sweeps over every service run all along, a chunk at a time between the
                // passes over what changed.
                resync: Duration::from_millis(300),
                ..OrchestratorConfig::default()
            },
            network: Default::default(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(cfg, listener, async move {
            let _ = stopped.await;
        }));
        replicas.push(Replica {
            addr: peers[&id].clone(),
            stop: Some(stop),
            task,
        });
    }
    Ok(replicas)
}

async fn channel(addr: &str) -> TestResult<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy())
}

async fn control(addrs: &[String]) -> TestResult<ControlClient<Channel>> {
    for addr in addrs {
        let mut c = ControlClient::new(channel(addr).await?);
        if let Ok(s) = c.cluster_status(ClusterStatusRequest {}).await
            && s.get_ref().leader_id != 0
        {
            return Ok(c);
        }
    }
    Err("no controller with a leader".into())
}

fn service(name: &str, image: &str, replicas: u32) -> Service {
    let mut svc = testing::service(name, image, replicas);
    if let Some(spec) = svc.spec.as_mut().map(Shared::make_mut) {
        spec.resources = Some(Resources {
            cpu_millis: 100,
            memory_bytes: 64 << 20,
        });
        spec.update = Some(UpdatePolicy {
            max_surge: 1,
            max_unavailable: 0,
            order: update_policy::Order::StartFirst.into(),
        });
    }
    svc
}

async fn tasks(addrs: &[String], svc: &str) -> TestResult<Vec<Task>> {
    let mut c = control(addrs).await?;
    Ok(c.list_tasks(ListTasksRequest {
        service: svc.into(),
        ..Default::default()
    })
    .await?
    .into_inner()
    .tasks)
}

/// Tasks each agent really runs now.
fn per_agent(agents: &[SimAgent]) -> Vec<usize> {
    agents.iter().map(|a| a.running().len()).collect()
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> TestResult<bool>) -> TestResult {
    let deadline = Instant::now() + WAIT;
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Running tasks of `svc` per node, as the controller reports them.
async fn running_per_node(addrs: &[String], svc: &str) -> TestResult<HashMap<String, usize>> {
    let mut out = HashMap::new();
    for t in tasks(addrs, svc).await? {
        if t.desired_state() == DesiredState::Running
            && t.status
                .as_ref()
                .is_some_and(|s| s.state() == TaskState::Running)
        {
            *out.entry(t.node).or_default() += 1;
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_scale_lose_drain_roll_and_delete() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut replicas = start_cluster(dir.path()).await?;
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    let _ = control(&addrs).await;
    wait_until("a leader", async || Ok(control(&addrs).await.is_ok())).await?;

    let mut agents = Vec::new();
    for (i, zone) in ["a", "b", "c"].iter().enumerate() {
        let mut cfg = SimAgentConfig::new(&format!("node-{}", i + 1));
        cfg.labels.insert("zone".into(), (*zone).into());
        // Each starts at a different replica.
        let mut channels = Vec::new();
        for k in 0..3 {
            channels.push(channel(&addrs[(i + k) % 3]).await?);
        }
        agents.push(SimAgent::start(channels, cfg));
    }
    wait_until("three ready nodes", async || {
        let nodes = control(&addrs)
            .await?
            .list_nodes(ListNodesRequest::default())
            .await?
            .into_inner()
            .nodes;
        Ok(nodes
            .iter()
            .filter(|n| {
                n.node
                    .as_ref()
                    .is_some_and(|n| n.state() == NodeState::Ready)
            })
            .count()
            == 3)
    })
    .await?;

    // 6 replicas: 2/2/2, really "running" on each agent.
    control(&addrs)
        .await?
        .apply(ApplyRequest {
            services: vec![service("web", "img:1", 6)],
        })
        .await?;
    wait_until("2/2/2", async || Ok(per_agent(&agents) == vec![2, 2, 2])).await?;
    wait_until("6 reported running", async || {
        Ok(running_per_node(&addrs, "web")
            .await?
            .values()
            .sum::<usize>()
            == 6)
    })
    .await?;

    // Scale to 9 and back to 3.
    let scale = |n| ScaleRequest {
        namespace: String::new(),
        name: "web".into(),
        replicas: n,
    };
    control(&addrs).await?.scale(scale(9)).await?;
    wait_until("3/3/3", async || Ok(per_agent(&agents) == vec![3, 3, 3])).await?;
    control(&addrs).await?.scale(scale(3)).await?;
    wait_until("1/1/1", async || Ok(per_agent(&agents) == vec![1, 1, 1])).await?;

    // A node goes silent: its task is lost and replaced on the others; back, its stale task
    // stops.
    agents[1].pause(true);
    wait_until("node-2 down and its task replaced", async || {
        let running = running_per_node(&addrs, "web").await?;
        Ok(!running.contains_key("node-2") && running.values().sum::<usize>() == 3)
    })
    .await?;
    let lost = tasks(&addrs, "web")
        .await?
        .into_iter()
        .filter(|t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.state() == TaskState::Lost)
        })
        .count();
    assert_eq!(lost, 1);
    agents[1].pause(false);
    wait_until("node-2 back, running nothing", async || {
        let nodes = control(&addrs)
            .await?
            .list_nodes(ListNodesRequest::default())
            .await?
            .into_inner()
            .nodes;
        let ready = nodes.iter().all(|n| {
            n.node
                .as_ref()
                .is_some_and(|n| n.state() == NodeState::Ready)
        });
        Ok(ready && agents[1].running().is_empty())
    })
    .await?;

    // Drain node-1: its task moves; uncordon.
    let set = |node: &str, a: NodeAvailability| SetNodeAvailabilityRequest {
        node: node.into(),
        availability: a.into(),
    };
    control(&addrs)
        .await?
        .set_node_availability(set("node-1", NodeAvailability::Drain))
        .await?;
    wait_until("node-1 drained", async || {
        let running = running_per_node(&addrs, "web").await?;
        Ok(agents[0].running().is_empty() && running.values().sum::<usize>() == 3)
    })
    .await?;
    control(&addrs)
        .await?
        .set_node_availability(set("node-1", NodeAvailability::Active))
        .await?;

    // Rolling update; the leader is stopped halfway; availability never drops below 3.
    control(&addrs).await?.scale(scale(6)).await?;
    wait_until("6 running", async || {
        Ok(running_per_node(&addrs, "web")
            .await?
            .values()
            .sum::<usize>()
            == 6)
    })
    .await?;
    control(&addrs)
        .await?
        .apply(ApplyRequest {
            services: vec![service("web", "img:2", 6)],
        })
        .await?;
    let mut killed = false;
    let deadline = Instant::now() + WAIT;
    loop {
        let all = tasks(&addrs, "web").await.unwrap_or_default();
        let live = |image: &str| {
            all.iter()
                .filter(|t| t.desired_state() == DesiredState::Running)
                .filter(|t| {
                    t.status
                        .as_ref()
                        .is_some_and(|s| s.state() == TaskState::Running)
                })
                .filter(|t| t.spec.as_deref().is_some_and(|s| s.image == image))
                .count()
        };
        let (old, new) = (live("img:1"), live("img:2"));
        if !all.is_empty() {
            assert!(
                old + new >= 6,
                "availability dropped: {old} old + {new} new"
            );
        }
        if new >= 2 && !killed {
            let leader = control(&addrs)
                .await?
                .cluster_status(ClusterStatusRequest {})
                .await?
                .into_inner()
                .leader_id;
            let r = &mut replicas[usize::try_from(leader - 1)?];
            r.stop.take();
            r.task.abort();
            killed = true;
        }
        if new == 6 && old == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rollout did not finish: {old} old, {new} new"
        );
        sleep(Duration::from_millis(30)).await;
    }
    assert!(killed);
    let alive: Vec<String> = replicas
        .iter()
        .filter(|r| r.stop.is_some())
        .map(|r| r.addr.clone())
        .collect();

    // Rollout undo: the previous spec comes back as a new generation, replica count kept.
    let undone = control(&alive)
        .await?
        .rollout_undo(RolloutUndoRequest {
            namespace: String::new(),
            name: "web".into(),
        })
        .await?
        .into_inner();
    assert_eq!(undone.results.len(), 1);
    wait_until("img:1 back on every replica", async || {
        let all = tasks(&alive, "web").await?;
        let live: Vec<&Task> = all
            .iter()
            .filter(|t| t.desired_state() == DesiredState::Running)
            .filter(|t| {
                t.status
                    .as_ref()
                    .is_some_and(|s| s.state() == TaskState::Running)
            })
            .collect();
        Ok(live.len() == 6
            && live
                .iter()
                .all(|t| t.spec.as_deref().is_some_and(|s| s.image == "img:1")))
    })
    .await?;
    let svc = control(&alive)
        .await?
        .get(GetRequest {
            namespace: String::new(),
            name: "web".into(),
            read: None,
        })
        .await?
        .into_inner()
        .service
        .unwrap_or_default();
    assert_eq!(
        svc.previous_spec.map(|s| s.image.clone()),
        Some("img:2".to_string()),
        "undo again would go back to img:2"
    );

    // What fits nowhere stays pending with the reason.
    let mut huge = service("huge", "img:1", 1);
    if let Some(spec) = huge.spec.as_mut().map(Shared::make_mut) {
        spec.resources = Some(Resources {
            cpu_millis: 100,
            memory_bytes: 1 << 40,
        });
    }
    control(&alive)
        .await?
        .apply(ApplyRequest {
            services: vec![huge],
        })
        .await?;
    wait_until("a pending reason", async || {
        let t = tasks(&alive, "huge").await?;
        Ok(t.len() == 1
            && t[0].status.as_ref().is_some_and(|s| {
                s.state() == TaskState::Pending
                    && s.message == "0/3 nodes available: 3 insufficient memory"
            }))
    })
    .await?;

    // Five services in one write: their pass goes in three chunks (`pass_chunk: 2`), each
    // planned and committed in turn, and every one is placed.
    let batch: Vec<String> = (0..5).map(|i| format!("batch-{i}")).collect();
    control(&alive)
        .await?
        .apply(ApplyRequest {
            services: batch.iter().map(|n| service(n, "img:1", 1)).collect(),
        })
        .await?;
    wait_until("every batch service running", async || {
        for name in &batch {
            if running_per_node(&alive, name)
                .await?
                .values()
                .sum::<usize>()
                != 1
            {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;

    // Delete: every task stops and is forgotten.
    for name in ["web", "huge"]
        .into_iter()
        .chain(batch.iter().map(String::as_str))
    {
        control(&alive)
            .await?
            .delete(DeleteRequest {
                namespace: String::new(),
                name: name.into(),
            })
            .await?;
    }
    wait_until("nothing runs", async || {
        Ok(per_agent(&agents) == vec![0, 0, 0] && tasks(&alive, "web").await?.is_empty())
    })
    .await?;
    for agent in agents {
        agent.stop().await;
    }
    Ok(())
}
