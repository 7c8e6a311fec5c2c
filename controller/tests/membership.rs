//! Membership changes at run time over real gRPC on loopback: a fourth replica started empty
//! (`--join`) is added through the Control API and catches up by snapshot; its address reaches
//! the old replicas (whose peer maps never named it) through the conf change; then a follower
//! and the leader are removed and the cluster keeps accepting writes.

use std::collections::BTreeMap;
use std::error::Error;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tug_api::v1::control_client::ControlClient;
use tug_api::v1::{
    AddMemberRequest, ApplyRequest, ClusterStatusRequest, ClusterStatusResponse, GetRequest,
    ListRequest, ReadOptions, RemoveMemberRequest,
};
use tug_controller::testing::{self, fast_config};
use tug_controller::{ControllerConfig, ServerError, run};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

const WAIT: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

struct Replica {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Replica {
    async fn stop(&mut self) -> TestResult {
        self.stop.take();
        timeout(WAIT, &mut self.task).await???;
        Ok(())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn launch(cfg: ControllerConfig, listener: TcpListener) -> Replica {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(cfg, listener, async move {
        let _ = stopped.await;
    }));
    Replica {
        stop: Some(stop),
        task,
    }
}

async fn client(addr: &str) -> TestResult<ControlClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(ControlClient::new(channel))
}

fn apply(name: &str) -> ApplyRequest {
    ApplyRequest {
        services: vec![testing::service(name, "busybox", 1)],
    }
}

async fn status(addr: &str) -> TestResult<ClusterStatusResponse> {
    Ok(client(addr)
        .await?
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner())
}

/// Waits until the replica at `addr` reports a leader that `ok` accepts.
async fn wait_for_leader(addr: &str, ok: impl Fn(u64) -> bool) -> TestResult<u64> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(s) = status(addr).await
            && s.leader_id != 0
            && ok(s.leader_id)
        {
            return Ok(s.leader_id);
        }
        if Instant::now() > deadline {
            return Err(format!("no suitable leader reported by {addr} within {WAIT:?}").into());
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Services the replica at `addr` holds right now (a stale read).
async fn stale_count(addr: &str) -> TestResult<usize> {
    Ok(client(addr)
        .await?
        .list(ListRequest {
            read: Some(ReadOptions { stale: true }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .services
        .len())
}

async fn wait_for_count(addr: &str, want: usize) -> TestResult {
    let deadline = Instant::now() + WAIT;
    loop {
        let have = stale_count(addr).await?;
        if have == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{addr} has {have} of {want} services after {WAIT:?}").into());
        }
        sleep(Duration::from_millis(50)).await;
    }
}

fn voters(s: &ClusterStatusResponse) -> Vec<u64> {
    s.members.iter().filter(|m| m.voter).map(|m| m.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_at_run_time_over_grpc() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut listeners = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    for id in 1..=4u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addrs.insert(id, listener.local_addr()?.to_string());
        listeners.insert(id, listener);
    }
    let addr = |id: u64| addrs.get(&id).cloned().unwrap_or_default();
    // Replicas 1-3 know only each other: 4's address must reach them through the conf change.
    let founders: BTreeMap<u64, String> =
        addrs.range(1..=3).map(|(k, v)| (*k, v.clone())).collect();
    let mut replicas = BTreeMap::new();
    let founder = |id: u64| {
        let mut node = fast_config(id, &dir.path().join(format!("node-{id}")));
        node.initial_members = vec![1, 2, 3];
        node.snapshot_threshold = 5;
        node.snapshot_catch_up_entries = 0;
        ControllerConfig {
            node,
            peers: founders.clone(),
            orchestrator: Default::default(),
            network: Default::default(),
        }
    };
    for id in 1..=3u64 {
        let listener = listeners.remove(&id).ok_or("no listener")?;
        replicas.insert(id, launch(founder(id), listener));
    }
    let leader = wait_for_leader(&addr(1), |_| true).await?;
    let mut c = client(&addr(leader)).await?;
    for i in 0..12 {
        c.apply(apply(&format!("svc-{i}"))).await?;
    }

    // Replica 4 starts empty and waits to be added (`--join`).
    let mut node = fast_config(4, &dir.path().join("node-4"));
    node.initial_members = Vec::new();
    let cfg = ControllerConfig {
        node,
        peers: addrs.clone(),
        orchestrator: Default::default(),
        network: Default::default(),
    };
    let listener = listeners.remove(&4).ok_or("no listener")?;
    replicas.insert(4, launch(cfg, listener));
    assert!(voters(&status(&addr(4)).await?).is_empty());

    // Added through a follower (forwarded to the leader).
    let follower = [1, 2, 3]
        .into_iter()
        .find(|id| *id != leader)
        .ok_or("no follower")?;
    let added = client(&addr(follower))
        .await?
        .add_member(AddMemberRequest {
            id: 4,
            address: addr(4),
        })
        .await?
        .into_inner();
    assert_eq!(voters_of(&added.members), vec![1, 2, 3, 4]);
    assert!(added.revision > 12);
    let again = client(&addr(leader))
        .await?
        .add_member(AddMemberRequest {
            id: 4,
            address: addr(4),
        })
        .await;
    assert_eq!(again.err().map(|s| s.code()), Some(Code::AlreadyExists));

    // It catches up (by snapshot: the log behind it was compacted).
    wait_for_count(&addr(4), 12).await?;
    // Every old replica learned its address from the conf change.
    for id in 1..=3 {
        let s = status(&addr(id)).await?;
        let four = s.members.iter().find(|m| m.id == 4).ok_or("4 not listed")?;
        assert_eq!(four.address, addr(4), "replica {id}: {s:?}");
    }
    // A write through the new member is forwarded and replicated back to it.
    client(&addr(4)).await?.apply(apply("via-4")).await?;
    wait_for_count(&addr(4), 13).await?;

    // A founder restarted with its old peer map, after the conf change naming 4 was compacted
    // into a snapshot, still knows 4's address (saved in its data dir).
    for i in 0..6 {
        client(&addr(4))
            .await?
            .apply(apply(&format!("more-{i}")))
            .await?;
    }
    if let Some(mut old) = replicas.remove(&follower) {
        old.stop().await?;
    }
    let listener = TcpListener::bind(addr(follower)).await?;
    replicas.insert(follower, launch(founder(follower), listener));
    wait_for_count(&addr(follower), 19).await?;
    let s = status(&addr(follower)).await?;
    assert!(
        s.members
            .iter()
            .any(|m| m.id == 4 && m.voter && m.address == addr(4)),
        "{s:?}"
    );

    // Removing the leader hands leadership over first (asked through another replica).
    let removed = client(&addr(4))
        .await?
        .remove_member(RemoveMemberRequest { id: leader })
        .await?
        .into_inner();
    let rest: Vec<u64> = [1, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    assert_eq!(voters_of(&removed.members), rest);
    let new_leader = wait_for_leader(&addr(4), |l| l != leader).await?;
    assert!(rest.contains(&new_leader));
    if let Some(mut old) = replicas.remove(&leader) {
        old.stop().await?;
    }
    client(&addr(4)).await?.apply(apply("after-leader")).await?;

    // Then a follower (neither 4 nor the new leader), asked through the new leader.
    let gone = rest
        .iter()
        .copied()
        .find(|id| *id != 4 && *id != new_leader)
        .ok_or("no follower to remove")?;
    let removed = client(&addr(new_leader))
        .await?
        .remove_member(RemoveMemberRequest { id: gone })
        .await?
        .into_inner();
    let two: Vec<u64> = rest.iter().copied().filter(|id| *id != gone).collect();
    assert_eq!(voters_of(&removed.members), two);
    if let Some(mut old) = replicas.remove(&gone) {
        old.stop().await?;
    }
    let missing = client(&addr(4))
        .await?
        .remove_member(RemoveMemberRequest { id: gone })
        .await;
    assert_eq!(missing.err().map(|s| s.code()), Some(Code::NotFound));

    // The two left still take writes and read them back linearizably from either.
    for id in &two {
        client(&addr(*id))
            .await?
            .apply(apply(&format!("after-{id}")))
            .await?;
    }
    for id in &two {
        let got = client(&addr(*id))
            .await?
            .get(GetRequest {
                namespace: String::new(),
                name: "after-leader".into(),
                read: None,
            })
            .await?
            .into_inner();
        assert!(got.service.is_some());
        assert_eq!(voters(&status(&addr(*id)).await?), two);
    }
    wait_for_count(&addr(4), 22).await?;
    for replica in replicas.values_mut() {
        replica.stop().await?;
    }
    Ok(())
}

fn voters_of(members: &[tug_api::v1::Member]) -> Vec<u64> {
    members.iter().filter(|m| m.voter).map(|m| m.id).collect()
}
