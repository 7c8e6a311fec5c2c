//! Node behaviour that needs the test-only sync gate ([`super::sync_gate`]).

use std::error::Error;
use std::time::Duration;

use super::NodeHandle;
use super::sync_gate;
use crate::fsm::Command;
use crate::testing::{LinkFaults, TestCluster, service};

type TestResult = Result<(), Box<dyn Error>>;

const WAIT: Duration = Duration::from_secs(15);

fn apply(name: &str) -> Command {
    Command::ApplyServices(vec![service(name, "img", 1)])
}

fn has(cluster: &TestCluster, id: u64, name: &str) -> Result<bool, Box<dyn Error>> {
    Ok(cluster
        .handle(id)?
        .store()
        .read()
        .get_service("default", name)
        .is_some())
}

/// Committed means durable on a majority: a leader answers a write both followers hold
/// while its own sync of it is still held, and one a single follower holds only once its own
/// sync has run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_answers_what_its_followers_made_durable_before_its_own_sync_ends() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, 7, |_| {})?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    let h = cluster.handle(leader)?.clone();
    h.propose(&apply("before")).await?;

    // Every sync of the leader's log from here on waits at the gate, the one of the next
    // write included (one that started before could not report it as persisted: raft counts
    // a sync only for the Readies written before it started).
    let gate = sync_gate::hold(&cluster.data_dir(leader));
    tokio::time::timeout(WAIT, h.propose(&apply("held"))).await??;
    assert!(has(&cluster, leader, "held")?);
    let waited = tokio::time::Instant::now();
    while gate.held() == 0 {
        assert!(
            waited.elapsed() < WAIT,
            "no sync of the leader reached the gate"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // With one follower cut off, the leader's own copy is needed for a majority.
    let cut = if leader == 1 { 2 } else { 1 };
    cluster.net.isolate(cut);
    let pending = {
        let h = h.clone();
        tokio::spawn(async move { h.propose(&apply("needs-the-leader")).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pending.is_finished(),
        "a write only one follower holds waits for the leader's sync"
    );
    assert!(!has(&cluster, leader, "needs-the-leader")?);
    gate.open();
    pending.await??;
    assert!(has(&cluster, leader, "needs-the-leader")?);

    // Every acknowledged write survives a restart of the whole group.
    cluster.net.heal();
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    cluster.restart_all(&[1, 2, 3], WAIT).await?;
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    for id in [1, 2, 3] {
        for name in ["before", "held", "needs-the-leader"] {
            assert!(has(&cluster, id, name)?, "node {id} lacks {name}");
        }
    }
    cluster.shutdown().await?;
    Ok(())
}

/// Three nodes holding background proposals for `hold`; their leader and its handle.
async fn with_hold(
    dir: &std::path::Path,
    hold: Duration,
) -> Result<(TestCluster, u64, NodeHandle), Box<dyn Error>> {
    let cluster = TestCluster::start(dir, 3, 11, move |cfg| cfg.background_hold = hold)?;
    let leader = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    let h = cluster.handle(leader)?.clone();
    Ok((cluster, leader, h))
}

/// A background proposal (the reconciler's plans) waits at the leader for a client's and goes
/// into the log right after it; with none coming, it goes in on its own once its hold is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_proposal_follows_the_next_client_write_into_the_log() -> TestResult {
    // Held far longer than the test waits: only a client's write can let it go.
    let dir = tempfile::tempdir()?;
    let (cluster, leader, h) = with_hold(dir.path(), Duration::from_secs(600)).await?;
    h.propose(&apply("before")).await?;
    let plan = {
        let h = h.clone();
        tokio::spawn(async move { h.propose_background(&apply("plan")).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!plan.is_finished(), "held until a client's write comes");
    assert!(!has(&cluster, leader, "plan")?);
    let client = h.propose(&apply("client")).await?;
    let plan = tokio::time::timeout(WAIT, plan).await???;
    assert_eq!(
        plan.index,
        client.index + 1,
        "right after the client's write"
    );
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    cluster.shutdown().await?;

    // A short hold lets it go on its own.
    let dir = tempfile::tempdir()?;
    let (cluster, leader, h) = with_hold(dir.path(), Duration::from_millis(50)).await?;
    tokio::time::timeout(WAIT, h.propose_background(&apply("alone"))).await??;
    assert!(has(&cluster, leader, "alone")?);
    cluster.shutdown().await?;
    Ok(())
}

/// raft-rs takes one membership change at a time, and a new leader's log may end in one it
/// has not applied yet: a change proposed meanwhile waits for it instead of being logged as an
/// empty entry and reported superseded (which is how removing the leader with `tug controller
/// remove-member` failed now and then: the new leader got the change right after its election).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_waits_for_the_one_before_it_to_apply() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, 13, |_| {})?;
    let old = cluster.wait_for_leader(&[1, 2, 3], WAIT).await?;
    let new = if old == 1 { 2 } else { 1 };
    // Every message takes 60-80 ms: nothing commits within two of them, while heartbeats
    // (every 40 ms) still come well inside the election timeout (200-400 ms).
    cluster.net.set_faults(LinkFaults {
        min_delay: Duration::from_millis(60),
        max_delay: Duration::from_millis(80),
        ..LinkFaults::default()
    });
    cluster.handle(old)?.transfer_leadership(new).await?;
    let h = cluster.handle(new)?.clone();
    cluster
        .wait_until("the new leader", WAIT, || {
            h.status().is_leader().then_some(())
        })
        .await?;
    assert!(
        h.status().commit_index < h.status().last_index,
        "the new leader's first entry is not committed yet"
    );
    // Right after the election, and four at once: each waits for the one before it, in the
    // order they came.
    let (add4, add5, remove4, remove5) = tokio::join!(
        h.add_voter(4),
        h.add_voter(5),
        h.remove_voter(4),
        h.remove_voter(5)
    );
    let changes = [add4?, add5?, remove4?, remove5?];
    assert!(
        changes.windows(2).all(|w| w[0].index < w[1].index),
        "{changes:?}"
    );
    let sorted = |m: &super::Membership| {
        let mut voters = m.voters.clone();
        voters.sort_unstable();
        voters
    };
    let voters: Vec<Vec<u64>> = changes.iter().map(sorted).collect();
    assert_eq!(
        voters,
        vec![
            vec![1, 2, 3, 4],
            vec![1, 2, 3, 4, 5],
            vec![1, 2, 3, 5],
            vec![1, 2, 3]
        ]
    );
    cluster.net.set_faults(LinkFaults::default());
    cluster.wait_converged(&[1, 2, 3], WAIT).await?;
    cluster.shutdown().await?;
    Ok(())
}
