//! In-process Raft clusters on a fault-injecting network: elections, failover, partitions,
//! membership changes, snapshots, restarts, damaged logs, linearizable reads, and random
//! faults under concurrent writers.
//!
//! Timing: 20 ms ticks (elections in 200-400 ms). Bounds below are generous; nothing asserts
//! on speed.

use std::collections::BTreeSet;
use std::error::Error;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;
use tug_api::v1::{ObjectMeta, Service};
use tug_controller::fsm::{Command, CommandResult};
use tug_controller::raft::storage::{DiskStorage, StorageOptions};
use tug_controller::raft::{Applied, NodeHandle, ProposeError, ReadConsistency, ReadError};
use tug_controller::state::{ApplyOutcome, EventKind};
use tug_controller::testing::{self, LinkFaults, TestCluster, services};

type TestResult = Result<(), Box<dyn Error>>;

const WAIT: Duration = Duration::from_secs(15);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn service(name: &str, image: &str) -> Service {
    testing::service(name, image, 1)
}

fn apply(name: &str, image: &str) -> Command {
    Command::ApplyServices(vec![service(name, image)])
}

fn outcome(applied: &Applied) -> Option<(ApplyOutcome, u64)> {
    match &applied.result {
        CommandResult::Services(results) => results.first().map(|r| (r.outcome, r.generation)),
        _ => None,
    }
}

fn meta(handle: &NodeHandle, name: &str) -> Option<ObjectMeta> {
    handle
        .store()
        .read()
        .get_service("default", name)
        .and_then(|s| s.metadata.clone())
}

fn has(handle: &NodeHandle, name: &str) -> bool {
    meta(handle, name).is_some()
}

fn others(all: &[u64], but: u64) -> Vec<u64> {
    all.iter().copied().filter(|id| *id != but).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_exactly_one_leader() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, 1, |_| {})?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    let statuses: Vec<_> = [1, 2, 3]
        .iter()
        .map(|id| cluster.handle(*id).map(NodeHandle::status))
        .collect::<Result<_, _>>()?;
    let leaders: Vec<u64> = statuses
        .iter()
        .filter(|s| s.is_leader())
        .map(|s| s.id)
        .collect();
    assert_eq!(leaders, vec![leader]);
    let terms: BTreeSet<u64> = statuses.iter().map(|s| s.term).collect();
    assert_eq!(terms.len(), 1, "one term: {terms:?}");
    for s in &statuses {
        assert_eq!(s.voters, vec![1, 2, 3]);
        assert_eq!(s.leader_id, Some(leader));
    }
    // A follower refuses writes and names the leader to forward them to.
    let follower = others(&[1, 2, 3], leader)[0];
    let refused = cluster.handle(follower)?.propose(&Command::Noop).await;
    assert_eq!(
        refused.err(),
        Some(ProposeError::NotLeader {
            leader_id: Some(leader)
        })
    );
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_apply_identically_on_every_replica() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, 2, |_| {})?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    let h = cluster.handle(leader)?;

    let created = h.propose(&apply("web", "nginx:1")).await?;
    assert_eq!(outcome(&created), Some((ApplyOutcome::Created, 1)));
    let same = h.propose(&apply("web", "nginx:1")).await?;
    assert_eq!(outcome(&same), Some((ApplyOutcome::Unchanged, 1)));
    let changed = h.propose(&apply("web", "nginx:2")).await?;
    assert_eq!(outcome(&changed), Some((ApplyOutcome::Configured, 2)));
    assert!(created.index < same.index && same.index < changed.index);

    // Concurrent writers share Ready cycles; every one gets its own result.
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..20 {
        let h = h.clone();
        writers.spawn(async move { h.propose(&apply(&format!("svc-{i}"), "img")).await });
    }
    let mut indices = BTreeSet::new();
    while let Some(result) = writers.join_next().await {
        let applied = result??;
        assert_eq!(outcome(&applied).map(|o| o.0), Some(ApplyOutcome::Created));
        indices.insert(applied.index);
    }
    assert_eq!(indices.len(), 20, "distinct log indices");

    let deleted = h
        .propose(&Command::DeleteService {
            namespace: String::new(),
            name: "svc-0".into(),
        })
        .await?;
    assert_eq!(deleted.result, CommandResult::Deleted { found: true });
    let missing = h
        .propose(&Command::DeleteService {
            namespace: "default".into(),
            name: "nope".into(),
        })
        .await?;
    assert_eq!(missing.result, CommandResult::Deleted { found: false });
    let invalid = h
        .propose(&Command::ApplyServices(vec![service("", "x")]))
        .await;
    assert!(
        matches!(invalid, Err(ProposeError::Rejected(_))),
        "{invalid:?}"
    );

    let applied = cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    for id in [1, 2, 3] {
        let node = cluster.handle(id)?;
        let web = meta(node, "web").ok_or("web missing")?;
        assert_eq!(web.create_revision, created.index);
        assert_eq!(web.revision, changed.index);
        assert_eq!(web.generation, 2);
        assert!(!has(node, "svc-0"));
        assert_eq!(services(node).len(), 20);
        assert_eq!(node.store().read().revision(), applied);
    }
    cluster.shutdown().await?;
    Ok(())
}

/// The leader syncs its log off its loop while it goes on replicating (asynchronous append).
/// With one follower cut off, every commit needs the leader's own syncs to be reported to
/// raft: concurrent and single writes are all acknowledged while the log rotates under them
/// (tiny segments here, so Readies are made durable by rotations while a sync runs), and every
/// one is on every replica after the follower is back and after a restart of all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_one_follower_commits_every_write_through_log_rotations() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, 11, |cfg| {
        cfg.segment_bytes = 1024;
        cfg.snapshot_threshold = 1_000_000;
    })?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    let cut = others(&[1, 2, 3], leader)[0];
    cluster.net.isolate(cut);
    let h = cluster.handle(leader)?.clone();

    let mut names = Vec::new();
    for wave in 0..12 {
        let mut writers = tokio::task::JoinSet::new();
        for i in 0..8 {
            let (h, name) = (h.clone(), format!("w{wave}-{i}"));
            names.push(name.clone());
            writers.spawn(async move { h.propose(&apply(&name, "img")).await });
        }
        while let Some(result) = writers.join_next().await {
            result??;
        }
    }
    for i in 0..20 {
        let name = format!("one-{i}");
        h.propose(&apply(&name, "img")).await?;
        names.push(name);
    }
    let rotated = segments(&cluster.data_dir(leader))?.len();
    assert!(rotated > 3, "the leader's log rotated: {rotated} segments");

    cluster.net.heal();
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    cluster.restart_all(&[1, 2, 3], WAIT).await?;
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    for id in [1, 2, 3] {
        let node = cluster.handle(id)?;
        let missing: Vec<&String> = names.iter().filter(|n| !has(node, n)).collect();
        assert!(missing.is_empty(), "node {id} lacks {missing:?}");
    }
    cluster.shutdown().await?;
    Ok(())
}

/// A commit index is not sent in an empty append of its own but with the next one; when no
/// write follows, the leader sends it shortly after, well before a heartbeat would carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_apply_the_last_write_soon_after_writes_stop() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    // Heartbeats every second (ticks of 10 ms): only the leader's own notice can be quicker.
    let cluster = TestCluster::start(dir.path(), 3, 5, |cfg| {
        cfg.tick_interval = Duration::from_millis(10);
        cfg.heartbeat_ticks = 100;
        cfg.election_ticks = 200;
    })?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    let h = cluster.handle(leader)?;
    for round in 0..3 {
        let written = h.propose(&apply(&format!("last-{round}"), "img")).await?;
        for id in [1, 2, 3] {
            cluster
                .wait_applied(id, written.index, Duration::from_millis(500))
                .await?;
        }
        // Idle for more than the leader's delay, then write again.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_a_new_one_and_writes_continue() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, 3, |_| {})?;
    let old = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    cluster.propose(&apply("a", "x"), WAIT).await?;
    cluster.propose(&apply("b", "x"), WAIT).await?;

    cluster.kill(old).await?;
    let rest = others(&[1, 2, 3], old);
    let new = cluster.wait_for_leader(&rest, WAIT).await?;
    assert_ne!(new, old);
    cluster.propose(&apply("c", "x"), WAIT).await?;
    cluster.wait_converged(&rest, WAIT).await?;
    for id in &rest {
        let h = cluster.handle(*id)?;
        assert!(has(h, "a") && has(h, "b") && has(h, "c"), "node {id}");
    }

    // The old leader comes back as a follower and catches up.
    cluster.restart(old)?;
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    assert!(has(cluster.handle(old)?, "c"));
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_partition_cannot_commit_while_the_majority_does_and_healing_converges()
-> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, 4, |cfg| {
        cfg.proposal_timeout = Duration::from_secs(2);
    })?;
    let old = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    cluster.propose(&apply("before", "x"), WAIT).await?;

    // The leader alone on its side: it cannot commit, and says so within the timeout.
    cluster.net.isolate(old);
    let isolated = cluster.handle(old)?;
    let started = Instant::now();
    let err = isolated.propose(&apply("lost", "x")).await;
    assert!(
        matches!(
            err,
            Err(ProposeError::Timeout { .. } | ProposeError::LeadershipLost { .. })
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(6));

    // The majority elects a leader and keeps writing.
    let majority = others(&[1, 2, 3], old);
    let new = cluster.wait_for_leader(&majority, WAIT).await?;
    assert_ne!(new, old);
    cluster.handle(new)?.propose(&apply("during", "y")).await?;

    // The isolated node has stepped down and knows no leader: writes fail with no quorum.
    cluster
        .wait_until("the isolated leader to step down", WAIT, || {
            let s = isolated.status();
            (!s.is_leader() && s.leader_id.is_none()).then_some(())
        })
        .await?;
    let err = isolated.propose(&apply("lost-again", "x")).await;
    assert!(matches!(err, Err(ProposeError::NoLeader { .. })), "{err:?}");
    let message = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("no quorum"), "{message}");

    cluster.net.heal();
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    for id in [1, 2, 3] {
        let h = cluster.handle(id)?;
        assert!(has(h, "before") && has(h, "during"), "node {id}");
        assert!(!has(h, "lost") && !has(h, "lost-again"), "node {id}");
    }
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_five_node_cluster_commits_only_on_the_majority_side() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let all = [1, 2, 3, 4, 5];
    let cluster = TestCluster::start(dir.path(), 5, 5, |cfg| {
        cfg.proposal_timeout = Duration::from_secs(2);
    })?;
    let old = cluster.wait_for_leader(&all, WAIT).await?;
    let buddy = others(&all, old)[0];
    let minority = [old, buddy];
    let majority: Vec<u64> = all
        .iter()
        .copied()
        .filter(|id| !minority.contains(id))
        .collect();
    cluster.net.partition(&[&minority, &majority]);

    let err = cluster.handle(old)?.propose(&apply("minority", "x")).await;
    assert!(err.is_err(), "{err:?}");
    let new = cluster.wait_for_leader(&majority, WAIT).await?;
    cluster
        .handle(new)?
        .propose(&apply("majority", "y"))
        .await?;
    assert!(!has(cluster.handle(buddy)?, "majority"));

    cluster.net.heal();
    cluster.wait_converged(&all, WAIT).await?;
    for id in all {
        let h = cluster.handle(id)?;
        assert!(has(h, "majority") && !has(h, "minority"), "node {id}");
    }
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_taken_once_the_log_holds_enough_bytes() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 1, 6, |cfg| {
        cfg.snapshot_threshold = 1_000_000;
        cfg.snapshot_threshold_bytes = 500;
        cfg.snapshot_catch_up_entries = 0;
    })?;
    cluster.wait_for_leader(&[1], WAIT).await?;
    for i in 0..40 {
        cluster
            .propose(&apply(&format!("svc-{i}"), "x"), WAIT)
            .await?;
    }
    // 40 small entries are far from a million, but more than 500 bytes.
    let status = cluster.wait_snapshot(1, 2, WAIT).await?;
    assert!(status.first_index > 2, "log compacted: {status:?}");
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_take_their_first_snapshots_at_different_points() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, 7, |cfg| {
        cfg.snapshot_threshold = 30;
        cfg.snapshot_catch_up_entries = 0;
    })?;
    cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    // From the bootstrap snapshot at 1, the first is due at 31 on node 1, 41 on node 2 and
    // 51 on node 3 (a third of the interval later for each rank), whichever leads.
    for i in 0..56 {
        cluster
            .propose(&apply(&format!("svc-{i}"), "x"), WAIT)
            .await?;
    }
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    let mut taken = Vec::new();
    for (id, due) in [(1, 31), (2, 41), (3, 51)] {
        let status = cluster.wait_snapshot(id, 2, WAIT).await?;
        assert!(
            (due..due + 10).contains(&status.snapshot_index),
            "node {id}'s snapshot at {}, due at {due}",
            status.snapshot_index
        );
        taken.push(status.snapshot_index);
    }
    assert!(taken[0] < taken[1] && taken[1] < taken[2], "{taken:?}");
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_catches_up_from_a_snapshot() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, 6, |cfg| {
        cfg.snapshot_threshold = 5;
        cfg.snapshot_catch_up_entries = 0;
    })?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    for i in 0..20 {
        cluster
            .propose(&apply(&format!("svc-{i}"), "x"), WAIT)
            .await?;
    }
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    let before = cluster.wait_snapshot(leader, 5, WAIT).await?;
    assert!(
        before.first_index > 2,
        "log compacted, replay from 1 impossible: {before:?}"
    );

    cluster.start_node(4, Vec::new())?;
    let joined = cluster.handle(leader)?.add_voter(4).await?;
    assert_eq!(joined.voters, vec![1, 2, 3, 4]);
    cluster.wait_converged(&[1, 2, 3, 4], WAIT).await?;
    let new = cluster.handle(4)?;
    let status = new.status();
    assert!(
        status.snapshot_index >= before.snapshot_index,
        "node 4 installed the leader's snapshot: {status:?}"
    );
    assert_eq!(status.voters, vec![1, 2, 3, 4]);
    assert_eq!(services(new).len(), 20);

    // It takes part in the group from now on.
    cluster.propose(&apply("after", "x"), WAIT).await?;
    cluster.wait_converged(&[1, 2, 3, 4], WAIT).await?;
    assert!(has(cluster.handle(4)?, "after"));

    // Membership survives restarts: the new member's and an old member's.
    let old_member = others(&[1, 2, 3], leader)[0];
    for id in [4, old_member] {
        cluster.stop(id).await?;
        cluster.restart(id)?;
        assert_eq!(cluster.handle(id)?.status().voters, vec![1, 2, 3, 4]);
    }
    cluster.propose(&apply("restarted", "x"), WAIT).await?;
    cluster.wait_converged(&[1, 2, 3, 4], WAIT).await?;
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_leaves_the_group() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, 7, |_| {})?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    cluster.propose(&apply("a", "x"), WAIT).await?;
    let gone = others(&[1, 2, 3], leader)[0];
    let rest = others(&[1, 2, 3], gone);

    let refused = cluster.handle(leader)?.remove_voter(leader).await;
    assert!(
        matches!(refused, Err(ProposeError::MembershipChange(_))),
        "the leader does not remove itself: {refused:?}"
    );
    let membership = cluster.handle(leader)?.remove_voter(gone).await?;
    assert_eq!(membership.voters, rest);
    cluster
        .wait_until("the remaining members to apply the removal", WAIT, || {
            rest.iter()
                .all(|id| cluster.handle(*id).is_ok_and(|h| h.status().voters == rest))
                .then_some(())
        })
        .await?;

    cluster.kill(gone).await?;
    // Two voters now: both are needed, and both are there.
    cluster.propose(&apply("b", "x"), WAIT).await?;
    cluster.wait_converged(&rest, WAIT).await?;
    for id in &rest {
        assert!(has(cluster.handle(*id)?, "b"));
    }
    // Removing a node twice is refused by raft, not applied.
    let again = cluster
        .handle(cluster.wait_for_leader(&rest, WAIT).await?)?
        .remove_voter(gone)
        .await;
    assert!(
        again.is_ok() || matches!(again, Err(ProposeError::MembershipChange(_))),
        "{again:?}"
    );
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_state_and_catches_up() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, 8, |cfg| {
        cfg.snapshot_threshold = 10;
        cfg.snapshot_catch_up_entries = 0;
    })?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    for i in 0..15 {
        cluster
            .propose(&apply(&format!("svc-{i}"), "x"), WAIT)
            .await?;
    }
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    let follower = others(&[1, 2, 3], leader)[0];
    let snapshot_before = cluster
        .wait_snapshot(follower, 10, WAIT)
        .await?
        .snapshot_index;
    cluster.kill(follower).await?;

    for i in 15..25 {
        cluster
            .propose(&apply(&format!("svc-{i}"), "x"), WAIT)
            .await?;
    }
    cluster.restart(follower)?;
    // Straight from its data dir: its snapshot is restored before it hears from anyone.
    let h = cluster.handle(follower)?;
    assert!(h.store().read().revision() >= snapshot_before);
    assert!(has(h, "svc-0"));

    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    let h = cluster.handle(follower)?;
    for i in 0..25 {
        assert!(has(h, &format!("svc-{i}")), "svc-{i}");
    }
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_state_is_snapshotted_after_as_many_entries_as_it_holds_objects() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 1, 10, |cfg| {
        cfg.snapshot_threshold = 5;
        cfg.snapshot_catch_up_entries = 0;
    })?;
    cluster.wait_for_leader(&[1], WAIT).await?;
    // One entry brings 40 services; a few more reach the threshold of 5 entries.
    let many = (0..40)
        .map(|i| service(&format!("bulk-{i}"), "x"))
        .collect();
    cluster.propose(&Command::ApplyServices(many), WAIT).await?;
    for i in 0..5 {
        cluster
            .propose(&apply(&format!("svc-{i}"), "x"), WAIT)
            .await?;
    }
    let first = cluster.wait_snapshot(1, 5, WAIT).await?.snapshot_index;
    let objects = services(cluster.handle(1)?).len() as u64;
    assert!(objects >= 40, "{objects} services");

    // Far more than 5 entries, fewer than the state's objects: no snapshot yet.
    for i in 0..20 {
        cluster
            .propose(&apply(&format!("more-{i}"), "x"), WAIT)
            .await?;
    }
    let early = cluster
        .wait_snapshot(1, first + 1, Duration::from_secs(1))
        .await;
    assert!(
        early.is_err(),
        "a snapshot {} entries after one of {objects} objects",
        early.map(|s| s.snapshot_index - first).unwrap_or_default()
    );
    // Once as many entries as objects are applied, the next one is taken.
    for i in 20..objects {
        cluster
            .propose(&apply(&format!("more-{i}"), "x"), WAIT)
            .await?;
    }
    let next = cluster
        .wait_snapshot(1, first + 1, WAIT)
        .await?
        .snapshot_index;
    assert!(
        next >= first + 40,
        "the next snapshot at {next}, the first at {first}"
    );
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_node_keeps_the_state() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, 9, |cfg| {
        cfg.snapshot_threshold = 4;
        cfg.snapshot_catch_up_entries = 0;
    })?;
    cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    for i in 0..10 {
        cluster
            .propose(&apply(&format!("svc-{i}"), "x"), WAIT)
            .await?;
    }
    let applied = cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    let before = services(cluster.handle(1)?);
    cluster.restart_all(&[1, 2, 3], WAIT).await?;
    cluster.propose(&apply("after", "x"), WAIT).await?;
    let again = cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    assert!(again > applied);
    let mut after = services(cluster.handle(2)?);
    after.retain(|s| s.metadata.as_ref().is_none_or(|m| m.name != "after"));
    assert_eq!(after, before);
    cluster.shutdown().await?;
    Ok(())
}

/// Where the records of a segment end, before the zeros of its unused preallocated space.
fn data_len(segment: &Path) -> Result<u64, std::io::Error> {
    let bytes = fs::read(segment)?;
    Ok(bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1) as u64)
}

/// The segment files of a node, oldest first.
fn segments(data_dir: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
    let mut v: Vec<PathBuf> = fs::read_dir(data_dir.join("raft").join("log"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Kills a follower, damages its log with `damage`, checks that opening the log reports and
/// repairs the damage, then restarts it and checks it recovers everything from its peers.
async fn damaged_log_recovers_from_peers(
    seed: u64,
    damage: impl Fn(&Path) -> Result<(), Box<dyn Error>>,
) -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, seed, |_| {})?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    for i in 0..20 {
        cluster
            .propose(&apply(&format!("svc-{i}"), "x"), WAIT)
            .await?;
    }
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    let victim = others(&[1, 2, 3], leader)[0];
    let last_before = cluster.handle(victim)?.status().last_index;
    cluster.kill(victim).await?;

    let segment = segments(&cluster.data_dir(victim))?
        .pop()
        .ok_or("no log segment")?;
    damage(&segment)?;
    {
        // Look at a copy, so the node itself finds (and repairs) the damage on restart.
        let copy = dir.path().join("inspect");
        copy_dir(&cluster.data_dir(victim).join("raft"), &copy)?;
        let storage = DiskStorage::open(&copy, &StorageOptions::default())?;
        assert!(storage.recovery().damage.is_some(), "damage reported");
        use raft::Storage as _;
        assert!(storage.last_index()? < last_before, "tail cut");
    }

    for i in 20..25 {
        cluster
            .propose(&apply(&format!("svc-{i}"), "x"), WAIT)
            .await?;
    }
    cluster.restart(victim)?;
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    let h = cluster.handle(victim)?;
    for i in 0..25 {
        assert!(has(h, &format!("svc-{i}")), "svc-{i}");
    }
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_is_truncated_and_recovered_from_peers() -> TestResult {
    damaged_log_recovers_from_peers(10, |segment| {
        // A crash in the middle of writing: the last third of the records never made it.
        let len = data_len(segment)?;
        OpenOptions::new()
            .write(true)
            .open(segment)?
            .set_len(len * 2 / 3)?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_log_record_is_cut_and_recovered_from_peers() -> TestResult {
    damaged_log_recovers_from_peers(11, |segment| {
        // One flipped byte in the middle of the log.
        let len = data_len(segment)?;
        let mut f = OpenOptions::new().read(true).write(true).open(segment)?;
        let pos = len / 2;
        let mut byte = [0u8; 1];
        f.seek(SeekFrom::Start(pos))?;
        std::io::Read::read_exact(&mut f, &mut byte)?;
        f.seek(SeekFrom::Start(pos))?;
        f.write_all(&[byte[0] ^ 0x20])?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_index_read_on_a_follower_sees_an_acknowledged_write() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, 12, |_| {})?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    let follower = others(&[1, 2, 3], leader)[0];
    // The follower hears from the leader late, so its local state lags the commit.
    cluster.net.set_link_faults(
        leader,
        follower,
        LinkFaults {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(150),
            ..LinkFaults::default()
        },
    );
    let f = cluster.handle(follower)?;
    for i in 0..5 {
        let name = format!("fresh-{i}");
        let acked = cluster.handle(leader)?.propose(&apply(&name, "x")).await?;
        let seen = f
            .read(ReadConsistency::Linearizable, |s| {
                s.get_service("default", &name).cloned()
            })
            .await?;
        let seen = seen.ok_or("a linearizable read missed an acknowledged write")?;
        assert_eq!(seen.metadata.map(|m| m.revision), Some(acked.index));
        assert!(f.read_index().await? >= acked.index);
    }
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_answer_locally_and_linearizable_reads_need_a_quorum() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, 13, |cfg| {
        cfg.read_timeout = Duration::from_secs(1);
    })?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    cluster.propose(&apply("x", "x"), WAIT).await?;
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    let follower = others(&[1, 2, 3], leader)[0];
    cluster.net.isolate(follower);
    let f = cluster.handle(follower)?;
    let stale = f
        .read(ReadConsistency::Stale, |s| {
            s.get_service("default", "x").is_some()
        })
        .await?;
    assert!(stale);
    let started = Instant::now();
    let err = f.read(ReadConsistency::Linearizable, |_| ()).await;
    assert!(matches!(err, Err(ReadError::Timeout { .. })), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    cluster.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_quorum_fails_in_bounded_time() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, 14, |cfg| {
        cfg.proposal_timeout = Duration::from_secs(1);
    })?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    for id in others(&[1, 2, 3], leader) {
        cluster.kill(id).await?;
    }
    let h = cluster.handle(leader)?;
    for attempt in 0..3 {
        let started = Instant::now();
        let err = h.propose(&apply(&format!("w{attempt}"), "x")).await;
        assert!(
            matches!(
                err,
                Err(ProposeError::Timeout { .. }
                    | ProposeError::LeadershipLost { .. }
                    | ProposeError::NoLeader { .. })
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(4));
    }
    assert!(!has(h, "w0"));
    cluster.shutdown().await?;
    Ok(())
}

/// Proposes through whichever of `nodes` leads, retrying until `deadline`.
async fn write_until_acked(
    nodes: &[NodeHandle],
    command: &Command,
    deadline: Instant,
) -> Result<Applied, String> {
    let mut last = String::from("no leader found");
    while Instant::now() < deadline {
        for node in nodes {
            if !node.status().is_leader() {
                continue;
            }
            match node.propose(command).await {
                Ok(applied) => return Ok(applied),
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_lose_no_acknowledged_write_and_keep_one_order() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let all = [1, 2, 3];
    let cluster = TestCluster::start(dir.path(), 3, 15, |cfg| {
        cfg.proposal_timeout = Duration::from_secs(2);
        cfg.watch_history = 100_000;
    })?;
    cluster.wait_for_leader(&all, WAIT).await?;
    cluster.net.set_faults(LinkFaults {
        drop_rate: 0.1,
        min_delay: Duration::ZERO,
        max_delay: Duration::from_millis(10),
        reorder_rate: 0.1,
    });

    let nodes: Vec<NodeHandle> = all
        .iter()
        .map(|id| cluster.handle(*id).cloned())
        .collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..4 {
        let nodes = nodes.clone();
        writers.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..15 {
                let name = format!("w{writer}-{i}");
                // Each write also updates one shared service, so apply order shows in its
                // generation history.
                let command =
                    Command::ApplyServices(vec![service(&name, "x"), service("shared", &name)]);
                let applied = write_until_acked(&nodes, &command, deadline).await?;
                acked.push((name, applied.index));
            }
            Ok::<_, String>(acked)
        });
    }
    let mut acked = Vec::new();
    while let Some(result) = writers.join_next().await {
        acked.extend(result??);
    }
    assert_eq!(acked.len(), 60);
    let stats = cluster.net.stats();
    assert!(stats.dropped > 0, "faults were injected: {stats:?}");

    cluster.net.heal();
    let applied = cluster
        .wait_converged(&all, Duration::from_secs(30))
        .await?;
    let mut histories = Vec::new();
    for node in &nodes {
        for (name, index) in &acked {
            let m = meta(node, name).ok_or_else(|| format!("{name} missing on {}", node.id()))?;
            assert!(m.create_revision <= *index && *index <= applied);
        }
        // The order in which this replica applied the changes, from its watch history.
        let mut watcher = node.watch(2)?;
        let mut history = Vec::new();
        while let Some(event) = watcher.try_next() {
            let event = event?;
            let m = event
                .service()
                .and_then(|s| s.metadata.clone())
                .unwrap_or_default();
            history.push((
                event.revision,
                event.kind == EventKind::Put,
                m.name,
                m.generation,
            ));
        }
        assert!(!history.is_empty());
        histories.push(history);
    }
    assert!(
        histories.windows(2).all(|w| w[0] == w[1]),
        "replicas applied in one order"
    );
    cluster.shutdown().await?;
    Ok(())
}
