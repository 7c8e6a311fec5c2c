//! Replicas over real gRPC on loopback: the peer transport, the Control API on every replica,
//! forwarding of writes to the leader, reads, watches, failover when the leader's server stops,
//! and a full disk (a small tmpfs, mounted and unmounted by the test).

use std::collections::BTreeMap;
use std::error::Error;
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tug_api::v1::control_client::ControlClient;
use tug_api::v1::{
    ApplyRequest, ClusterStatusRequest, DeleteRequest, GetRequest, ListRequest, ReadOptions,
    Service, WatchRequest, apply_result, watch_event,
};
use tug_controller::raft::NodeConfig;
use tug_controller::testing::{self, fast_config};
use tug_controller::{ControllerConfig, ServerError, run};

type TestResult = Result<(), Box<dyn Error>>;

const WAIT: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

struct Replica {
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Replica {
    /// Stops the server and the node (like a process exiting) and waits until they are down.
    async fn stop(&mut self) -> Result<(), Box<dyn Error>> {
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

/// Starts replicas `1..=n` (only those in `start`) of an `n`-member cluster on loopback.
async fn cluster(base: &Path, n: u64, start: &[u64]) -> Result<Vec<Replica>, Box<dyn Error>> {
    cluster_with(base, n, start, |_| {}).await
}

async fn cluster_with(
    base: &Path,
    n: u64,
    start: &[u64],
    tweak: impl Fn(&mut NodeConfig),
) -> Result<Vec<Replica>, Box<dyn Error>> {
    let mut replicas = Vec::new();
    for (id, (cfg, listener)) in prepare(base, n, tweak).await? {
        if start.contains(&id) {
            replicas.push(launch(cfg, listener));
        }
    }
    Ok(replicas)
}

/// Listeners and configs of an `n`-member cluster on loopback (listeners bound first, so the
/// peer maps hold real ports).
async fn prepare(
    base: &Path,
    n: u64,
    tweak: impl Fn(&mut NodeConfig),
) -> Result<BTreeMap<u64, (ControllerConfig, TcpListener)>, Box<dyn Error>> {
    let mut listeners = BTreeMap::new();
    for id in 1..=n {
        listeners.insert(id, TcpListener::bind("127.0.0.1:0").await?);
    }
    let mut peers = BTreeMap::new();
    for (id, listener) in &listeners {
        peers.insert(*id, listener.local_addr()?.to_string());
    }
    let mut prepared = BTreeMap::new();
    for (id, listener) in listeners {
        let mut node = fast_config(id, &base.join(format!("node-{id}")));
        node.initial_members = (1..=n).collect();
        tweak(&mut node);
        let cfg = ControllerConfig {
            node,
            peers: peers.clone(),
            orchestrator: Default::default(),
            network: Default::default(),
        };
        prepared.insert(id, (cfg, listener));
    }
    Ok(prepared)
}

fn launch(cfg: ControllerConfig, listener: TcpListener) -> Replica {
    let addr = cfg.peers.get(&cfg.node.id).cloned().unwrap_or_default();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(cfg, listener, async move {
        let _ = stopped.await;
    }));
    Replica {
        addr,
        stop: Some(stop),
        task,
    }
}

async fn client(addr: &str) -> Result<ControlClient<Channel>, Box<dyn Error>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(ControlClient::new(channel))
}

fn service(name: &str, image: &str) -> Service {
    testing::service(name, image, 2)
}

fn apply(name: &str, image: &str) -> ApplyRequest {
    ApplyRequest {
        services: vec![service(name, image)],
    }
}

/// Waits until replica `via` reports a leader; returns its id.
async fn wait_for_leader(addr: &str) -> Result<u64, Box<dyn Error>> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(mut c) = client(addr).await
            && let Ok(status) = c.cluster_status(ClusterStatusRequest {}).await
            && status.get_ref().leader_id != 0
        {
            return Ok(status.get_ref().leader_id);
        }
        if Instant::now() > deadline {
            return Err(format!("no leader reported by {addr} within {WAIT:?}").into());
        }
        sleep(Duration::from_millis(50)).await;
    }
}

fn name_of(svc: Option<&Service>) -> String {
    svc.and_then(|s| s.metadata.as_ref())
        .map(|m| m.name.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_over_grpc_forward_read_watch_and_fail_over() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut replicas = cluster(dir.path(), 3, &[1, 2, 3]).await?;
    let leader = wait_for_leader(&replicas[0].addr).await?;
    let leader_idx = usize::try_from(leader - 1)?;
    let follower_idx = (leader_idx + 1) % 3;

    // A write sent to a follower is forwarded to the leader.
    let mut follower = client(&replicas[follower_idx].addr).await?;
    let applied = follower
        .apply(apply("web", "busybox:1"))
        .await?
        .into_inner();
    assert_eq!(applied.results.len(), 1);
    assert_eq!(applied.results[0].outcome(), apply_result::Outcome::Created);
    assert_eq!(applied.results[0].namespace, "default");
    let created_at = applied.revision;
    assert!(created_at > 0);
    let again = follower
        .apply(apply("web", "busybox:1"))
        .await?
        .into_inner();
    assert_eq!(again.results[0].outcome(), apply_result::Outcome::Unchanged);
    let changed = follower
        .apply(apply("web", "busybox:2"))
        .await?
        .into_inner();
    assert_eq!(
        changed.results[0].outcome(),
        apply_result::Outcome::Configured
    );
    assert_eq!(changed.results[0].generation, 2);

    // Every replica sees it with a linearizable read, right away.
    for replica in &replicas {
        let mut c = client(&replica.addr).await?;
        let got = c
            .get(GetRequest {
                namespace: String::new(),
                name: "web".into(),
                read: None,
            })
            .await?
            .into_inner();
        let spec = got.service.as_ref().and_then(|s| s.spec.as_deref());
        assert_eq!(spec.map(|s| s.image.as_str()), Some("busybox:2"));
        assert!(got.revision >= changed.revision);
        let listed = c
            .list(ListRequest {
                read: Some(ReadOptions { stale: true }),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert!(listed.services.len() <= 1);
    }

    // Delete through a follower; then it is gone everywhere.
    let deleted = follower
        .delete(DeleteRequest {
            namespace: "default".into(),
            name: "web".into(),
        })
        .await?
        .into_inner();
    assert!(deleted.deleted);
    let mut leader_client = client(&replicas[leader_idx].addr).await?;
    let missing = leader_client
        .get(GetRequest {
            namespace: "default".into(),
            name: "web".into(),
            read: None,
        })
        .await;
    match missing {
        Err(status) => {
            assert_eq!(status.code(), Code::NotFound);
            assert!(status.message().contains("\"web\" not found"), "{status:?}");
        }
        Ok(found) => return Err(format!("deleted service still there: {found:?}").into()),
    }
    let again = follower
        .delete(DeleteRequest {
            namespace: "default".into(),
            name: "web".into(),
        })
        .await;
    assert_eq!(again.map_err(|s| s.code()).err(), Some(Code::NotFound));

    // A watch from the first revision replays the changes in order.
    let mut stream = follower
        .watch(WatchRequest {
            from_revision: created_at,
            namespace: String::new(),
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = timeout(WAIT, stream.message())
            .await??
            .ok_or("the watch ended early")?;
        seen.push((
            event.kind(),
            name_of(event.service.as_ref()),
            event.revision,
        ));
    }
    assert_eq!(seen[0].0, watch_event::Kind::Put);
    assert_eq!(seen[0].2, created_at);
    assert_eq!(seen[1].0, watch_event::Kind::Put);
    assert_eq!(seen[1].2, changed.revision);
    assert_eq!(seen[2].0, watch_event::Kind::Delete);
    assert_eq!(seen[2].2, deleted.revision);
    assert!(seen.iter().all(|(_, name, _)| name == "web"));

    // Stop the leader's server: writes continue through the others.
    replicas[leader_idx].stop().await?;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader_idx).collect();
    let deadline = Instant::now() + WAIT;
    let mut via = client(&replicas[survivors[0]].addr).await?;
    let after = loop {
        match via.apply(apply("after-failover", "busybox:3")).await {
            Ok(applied) => break applied.into_inner(),
            Err(status) if Instant::now() < deadline => {
                tracing::info!(?status, "write during failover failed; retrying");
                sleep(Duration::from_millis(100)).await;
            }
            Err(status) => return Err(status.into()),
        }
    };
    assert_eq!(after.results[0].outcome(), apply_result::Outcome::Created);
    for i in survivors {
        let mut c = client(&replicas[i].addr).await?;
        let status = c
            .cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner();
        assert_ne!(status.leader_id, leader);
        assert_eq!(status.members.len(), 3);
        let got = c
            .get(GetRequest {
                namespace: String::new(),
                name: "after-failover".into(),
                read: None,
            })
            .await?
            .into_inner();
        assert_eq!(name_of(got.service.as_ref()), "after-failover");
    }
    for replica in &mut replicas {
        if replica.stop.is_some() {
            replica.stop().await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_a_quorum_fails_with_a_clear_error() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut replicas = cluster(dir.path(), 3, &[1]).await?;
    let mut c = client(&replicas[0].addr).await?;
    let started = Instant::now();
    let result = c.apply(apply("web", "busybox:1")).await;
    assert!(started.elapsed() < WAIT);
    match result {
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(
                status
                    .message()
                    .contains("no leader elected yet (cluster of 3, 1 reachable)"),
                "{status:?}"
            );
        }
        Ok(applied) => return Err(format!("applied without a quorum: {applied:?}").into()),
    }
    // Nothing was written; a stale read answers from this replica.
    let listed = c
        .list(ListRequest {
            read: Some(ReadOptions { stale: true }),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(listed.services.is_empty());
    replicas[0].stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_resyncs_then_streams() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut replicas = cluster_with(dir.path(), 1, &[1], |cfg| cfg.watch_history = 2).await?;
    wait_for_leader(&replicas[0].addr).await?;
    let mut c = client(&replicas[0].addr).await?;
    let mut first = 0;
    for i in 0..5 {
        let applied = c
            .apply(apply(&format!("svc-{i}"), "busybox"))
            .await?
            .into_inner();
        if i == 0 {
            first = applied.revision;
        }
    }
    let mut stream = c
        .watch(WatchRequest {
            from_revision: first,
            namespace: String::new(),
        })
        .await?
        .into_inner();
    let mut resynced = Vec::new();
    loop {
        let event = timeout(WAIT, stream.message())
            .await??
            .ok_or("the watch ended early")?;
        match event.kind() {
            watch_event::Kind::Resync => resynced.push(name_of(event.service.as_ref())),
            watch_event::Kind::ResyncDone => break,
            other => return Err(format!("expected a resync, got {other:?}").into()),
        }
    }
    assert_eq!(resynced, ["svc-0", "svc-1", "svc-2", "svc-3", "svc-4"]);
    let later = c.apply(apply("svc-5", "busybox")).await?.into_inner();
    let event = timeout(WAIT, stream.message())
        .await??
        .ok_or("the watch ended early")?;
    assert_eq!(event.kind(), watch_event::Kind::Put);
    assert_eq!(name_of(event.service.as_ref()), "svc-5");
    assert_eq!(event.revision, later.revision);
    replicas[0].stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_compacted_entries_gets_a_snapshot_over_grpc() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut prepared = prepare(dir.path(), 3, |cfg| {
        cfg.snapshot_threshold = 10;
        cfg.snapshot_catch_up_entries = 0;
    })
    .await?;
    let (late_cfg, late_listener) = prepared.remove(&3).ok_or("no replica 3")?;
    let mut replicas: Vec<Replica> = prepared
        .into_values()
        .map(|(cfg, listener)| launch(cfg, listener))
        .collect();
    wait_for_leader(&replicas[0].addr).await?;
    let mut c = client(&replicas[0].addr).await?;
    for i in 0..40 {
        c.apply(apply(&format!("svc-{i}"), "busybox")).await?;
    }
    // Replica 3 starts after the log it missed was compacted away: only a snapshot helps.
    replicas.push(launch(late_cfg, late_listener));
    let mut late = client(&replicas[2].addr).await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let listed = late
            .list(ListRequest {
                read: Some(ReadOptions { stale: true }),
                ..Default::default()
            })
            .await?
            .into_inner();
        if listed.services.len() == 40 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "replica 3 has {} of 40 services after {WAIT:?}",
                listed.services.len()
            )
            .into());
        }
        sleep(Duration::from_millis(50)).await;
    }
    for replica in &mut replicas {
        replica.stop().await?;
    }
    Ok(())
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped (also on failure).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Result<SmallDisk, Box<dyn Error>> {
        let dir = tempfile::Builder::new().prefix("tug-disk-").tempdir()?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tug-test-disk",
            ])
            .arg(dir.path())
            .output()?;
        if !out.status.success() {
            return Err(format!("mount tmpfs: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> Result<std::path::PathBuf, Box<dyn Error>> {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 << 10];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_cleanly_and_they_work_again_once_there_is_room() -> TestResult {
    init_tracing();
    let disk = SmallDisk::mount("32m")?;
    let tweak = |cfg: &mut NodeConfig| {
        cfg.disk_reserve_bytes = 4 << 20;
        cfg.segment_bytes = 1 << 20;
    };
    let mut replicas = cluster_with(disk.path(), 1, &[1], tweak).await?;
    wait_for_leader(&replicas[0].addr).await?;
    let mut c = client(&replicas[0].addr).await?;
    c.apply(apply("before", "busybox")).await?;

    let filler = disk.fill()?;
    let refused = c.apply(apply("during", "busybox")).await;
    match refused {
        Err(status) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(
                status.message().contains("the controller's disk is full")
                    && status.message().contains("nothing was written"),
                "{status:?}"
            );
        }
        Ok(applied) => return Err(format!("applied on a full disk: {applied:?}").into()),
    }
    // The replica keeps serving reads, and nothing of the refused write is there.
    let names = |listed: tug_api::v1::ListResponse| -> Vec<String> {
        listed.services.iter().map(|s| name_of(Some(s))).collect()
    };
    let listed = c.list(ListRequest::default()).await?.into_inner();
    assert_eq!(names(listed), ["before"]);

    std::fs::remove_file(&filler)?;
    c.apply(apply("after", "busybox")).await?;
    replicas[0].stop().await?;
    drop(replicas);

    // Restarted from its disk: exactly the writes that were accepted.
    let mut replicas = cluster_with(disk.path(), 1, &[1], tweak).await?;
    wait_for_leader(&replicas[0].addr).await?;
    let mut c = client(&replicas[0].addr).await?;
    let listed = c.list(ListRequest::default()).await?.into_inner();
    assert_eq!(names(listed), ["after", "before"]);
    replicas[0].stop().await?;
    Ok(())
}
