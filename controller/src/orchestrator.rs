//! What the leader does besides leading Raft: runs the reconciler whenever the state changes
//! (and, spread out over time, over every service as a guard against a missed change), commits
//! each plan as one command, and declares nodes down when their heartbeats stop. Runs on every
//! replica, acting only while it leads.

use std::collections::{BTreeSet, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tug_api::v1::NodeState;

use crate::dispatcher::{Sessions, now_ms};
use crate::fsm::Command;
use crate::raft::{NodeHandle, ProposeError};
use crate::reconcile::{self, ReconcileConfig, Scope};
use crate::state::{Changes, ServiceKey};

#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// How often agents heartbeat; a node silent for `grace_periods` of them is down.
    pub heartbeat_period: Duration,
    pub grace_periods: u32,
    /// A sweep over every service (it only guards against a missed change) starts this long
    /// after the last one ended, and goes a chunk at a time: see [`Sweep`].
    pub resync: Duration,
    /// Changes are gathered this long before a pass, so a burst makes one plan.
    pub debounce: Duration,
    pub reconcile: ReconcileConfig,
    /// Services reconciled per hold of the store's read lock. The Raft loop needs the write
    /// lock to apply, so one hold over a large store (a full pass over 200,000 services took
    /// over a second here) would stall replication, and past an election timeout cost the
    /// leadership. A pass over more services reconciles and commits them chunk by chunk.
    pub pass_chunk: usize,
    /// Where reconcile passes and placements are counted.
    pub metrics: crate::metrics::SchedulingMetrics,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            heartbeat_period: Duration::from_secs(2),
            grace_periods: 3,
            resync: Duration::from_secs(30),
            debounce: Duration::from_millis(10),
            reconcile: ReconcileConfig::default(),
            pass_chunk: 1024,
            metrics: crate::metrics::SchedulingMetrics::default(),
        }
    }
}

impl OrchestratorConfig {
    pub fn grace(&self) -> Duration {
        self.heartbeat_period * self.grace_periods
    }
}

/// A sweep takes at most 1/`RESYNC_DUTY` of the leader's time: after a pass with a chunk of it
/// took `d`, the next chunk waits `(RESYNC_DUTY - 1) d`.
const RESYNC_DUTY: u32 = 50;

/// The periodic look at every service, spread out: the services it has yet to reconcile,
/// taken one chunk at a time into the passes over changed services. In one go, such a pass
/// over a large store is seconds of the leader's CPU at once (2-4 s at 250,000 services
/// under writes here), which every client of the cluster would feel.
#[derive(Debug)]
struct Sweep {
    keys: VecDeque<ServiceKey>,
    /// The next chunk is not due before this (`None`: now).
    next_at: Option<Instant>,
}

impl Sweep {
    fn new(keys: Vec<ServiceKey>) -> Self {
        Sweep {
            keys: keys.into(),
            next_at: None,
        }
    }

    /// The next chunk of at most `size` services, if one is due at `now`.
    fn due_chunk(&mut self, now: Instant, size: usize) -> Option<Vec<ServiceKey>> {
        if self.wait(now) != Some(Duration::ZERO) {
            return None;
        }
        let n = size.clamp(1, self.keys.len());
        Some(self.keys.drain(..n).collect())
    }

    /// A pass with a chunk ended at `now` after `took`: the next chunk waits for the duty.
    fn chunk_done(&mut self, now: Instant, took: Duration) {
        self.next_at = now.checked_add(took.saturating_mul(RESYNC_DUTY - 1));
    }

    fn is_done(&self) -> bool {
        self.keys.is_empty()
    }

    /// How long until the next chunk is due, if any is left.
    fn wait(&self, now: Instant) -> Option<Duration> {
        if self.is_done() {
            return None;
        }
        Some(
            self.next_at
                .map_or(Duration::ZERO, |at| at.saturating_duration_since(now)),
        )
    }
}

/// Runs until `stopping` turns true.
pub async fn run(
    handle: NodeHandle,
    sessions: Sessions,
    cfg: OrchestratorConfig,
    mut stopping: watch::Receiver<bool>,
) {
    let mut status = handle.status_updates();
    loop {
        tokio::select! {
            _ = status.wait_for(|s| s.is_leader()) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        tracing::info!(
            node = handle.id(),
            "leading: reconciler and node liveness started"
        );
        tokio::select! {
            () = lead(&handle, &sessions, &cfg) => {}
            _ = status.wait_for(|s| !s.is_leader()) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        tracing::info!(node = handle.id(), "no longer leading: reconciler stopped");
    }
}

/// One term of leadership: never returns by itself.
async fn lead(handle: &NodeHandle, sessions: &Sessions, cfg: &OrchestratorConfig) {
    // Sessions of an earlier term are stale; every node gets one grace period from now.
    sessions.clear();
    let since = Instant::now();
    let ids = TaskIds::default();
    // Taken before the first pass looks at anything, so no change made during it is missed.
    let tracker = handle.store().write().track_changes();
    let mut dirty = Dirty::All;
    // When the last full pass or sweep ended.
    let mut last_full = Instant::now();
    let mut sweep: Option<Sweep> = None;
    let mut wake_at_ms: Option<u64> = None;
    loop {
        if wake_at_ms.is_some_and(|w| now_ms() >= w) {
            dirty = Dirty::All;
        }
        if sweep.is_none() && !dirty.is_all() && last_full.elapsed() >= cfg.resync {
            match every_service(handle).await {
                Ok(keys) => sweep = Some(Sweep::new(keys)),
                // Only while the runtime shuts down: try again after the next period.
                Err(_) => last_full = Instant::now(),
            }
        }
        let chunk = sweep
            .as_mut()
            .and_then(|s| s.due_chunk(Instant::now(), cfg.pass_chunk));
        if !dirty.is_clean() || chunk.is_some() {
            tokio::time::sleep(cfg.debounce).await;
            dirty.add(tracker.take());
            let swept = chunk.is_some();
            if let Some(chunk) = chunk {
                dirty.add(Changes {
                    all: false,
                    services: chunk.into_iter().collect(),
                });
            }
            let scope = std::mem::replace(&mut dirty, Dirty::Clean).into_scope();
            let full = matches!(scope, Scope::All);
            if full {
                // It covers whatever the sweep had left.
                sweep = None;
                wake_at_ms = None;
            }
            let started = Instant::now();
            let passed = pass(handle, &ids, cfg, scope).await;
            if full {
                last_full = Instant::now();
            }
            if let Some(s) = sweep.as_mut().filter(|_| swept) {
                s.chunk_done(Instant::now(), started.elapsed());
                if s.is_done() {
                    sweep = None;
                    last_full = Instant::now();
                }
            }
            match passed {
                Ok((rest, wake)) => {
                    // A pass cut short goes on where it stopped, not from the start.
                    if let Some(rest) = rest {
                        dirty.add(Changes {
                            all: false,
                            services: rest,
                        });
                    }
                    if let Some(w) = wake {
                        wake_at_ms = Some(wake_at_ms.map_or(w, |old| old.min(w)));
                    }
                }
                Err(err) => {
                    tracing::warn!(cause = %err, "reconcile plan not committed; retrying");
                    dirty = Dirty::All;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        liveness(handle, sessions, cfg, since).await;
        let tick = cfg.heartbeat_period / 2;
        let wait = sweep
            .as_ref()
            .and_then(|s| s.wait(Instant::now()))
            .map_or(tick, |w| w.min(tick));
        tokio::select! {
            () = tracker.changed() => dirty.add(tracker.take()),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// What changed since the last pass.
#[derive(Debug)]
enum Dirty {
    Clean,
    Services(BTreeSet<ServiceKey>),
    All,
}

impl Dirty {
    fn is_clean(&self) -> bool {
        matches!(self, Dirty::Clean)
    }

    fn is_all(&self) -> bool {
        matches!(self, Dirty::All)
    }

    /// Adds what the tracker recorded.
    fn add(&mut self, changes: Changes) {
        if changes.all {
            *self = Dirty::All;
            return;
        }
        match self {
            Dirty::All => {}
            Dirty::Clean if !changes.services.is_empty() => {
                *self = Dirty::Services(changes.services);
            }
            Dirty::Clean => {}
            Dirty::Services(keys) => keys.extend(changes.services),
        }
    }

    fn into_scope(self) -> Scope {
        match self {
            Dirty::Services(keys) => Scope::Services(keys),
            Dirty::Clean | Dirty::All => Scope::All,
        }
    }
}

/// One reconcile pass, computed off the async threads and committed: in chunks of
/// [`OrchestratorConfig::pass_chunk`] services, each planned under its own short hold of the
/// store's read lock and committed before the next is planned (so each sees the placements of
/// the ones before). Returns, when a plan was cut short, the services the pass did not reach
/// (the next pass's scope), and the earliest time a pass is due for a back-off.
async fn pass(
    handle: &NodeHandle,
    ids: &TaskIds,
    cfg: &OrchestratorConfig,
    scope: Scope,
) -> Result<(Option<BTreeSet<ServiceKey>>, Option<u64>), ProposeError> {
    let started = Instant::now();
    let keys: Vec<ServiceKey> = match scope {
        Scope::All => every_service(handle).await?,
        Scope::Services(keys) => keys.into_iter().collect(),
    };
    let mut wake_at_ms: Option<u64> = None;
    let mut placed = 0;
    // At least one chunk, even an empty one: the node step (tasks lost with their node) runs
    // in every pass.
    let mut chunks: Vec<&[ServiceKey]> = keys.chunks(cfg.pass_chunk.max(1)).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for (i, chunk) in chunks.iter().enumerate() {
        let scope = Scope::Services(chunk.iter().cloned().collect());
        let (rest, wake, n) = pass_chunk(handle, ids, cfg, scope).await?;
        placed += n;
        if let Some(w) = wake {
            wake_at_ms = Some(wake_at_ms.map_or(w, |old| old.min(w)));
        }
        if !rest.is_empty() {
            cfg.metrics
                .observe_pass(started.elapsed().as_secs_f64(), placed);
            let later = chunks.get(i + 1..).unwrap_or_default();
            return Ok((Some(unreached(rest, later)), wake_at_ms));
        }
    }
    cfg.metrics
        .observe_pass(started.elapsed().as_secs_f64(), placed);
    Ok((None, wake_at_ms))
}

/// Every service a full pass looks at, in order, gathered off the async threads.
async fn every_service(handle: &NodeHandle) -> Result<Vec<ServiceKey>, ProposeError> {
    let store = handle.store().clone();
    tokio::task::spawn_blocking(move || {
        // Two statements: the read guard is dropped before the keys are built and sorted.
        let targets = reconcile::SweepTargets::take(&store.read());
        targets.into_keys()
    })
    .await
    .map_err(|_| ProposeError::Stopped)
}

/// What a pass cut short in one chunk left: that chunk's `rest` and every later chunk.
fn unreached(rest: Vec<ServiceKey>, later: &[&[ServiceKey]]) -> BTreeSet<ServiceKey> {
    rest.into_iter()
        .chain(later.iter().flat_map(|c| c.iter().cloned()))
        .collect()
}

/// Plans `scope` under one hold of the read lock and commits the plan. Returns the services
/// the plan did not reach (it was full), its back-off wake time and how many tasks it placed.
async fn pass_chunk(
    handle: &NodeHandle,
    ids: &TaskIds,
    cfg: &OrchestratorConfig,
    scope: Scope,
) -> Result<(Vec<ServiceKey>, Option<u64>, usize), ProposeError> {
    let store = handle.store().clone();
    let rc = cfg.reconcile;
    let ids = ids.clone();
    let started = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        let store = store.read();
        let mut ids = |svc: &str, slot: u32| ids.next(svc, slot);
        reconcile::reconcile_scope(&store, now_ms(), &rc, &mut ids, &scope)
    })
    .await
    .map_err(|_| ProposeError::Stopped)?;
    if outcome.plan.is_empty() {
        return Ok((outcome.rest, outcome.wake_at_ms, 0));
    }
    // New tasks placed at once, and pending ones placed now.
    let placed = outcome
        .plan
        .create
        .iter()
        .filter(|t| !t.node.is_empty())
        .count()
        + outcome
            .plan
            .update
            .iter()
            .filter(|c| !c.node.is_empty())
            .count();
    let (creates, updates, removes) = (
        outcome.plan.create.len(),
        outcome.plan.update.len(),
        outcome.plan.remove.len(),
    );
    let applied = handle
        .propose_background(&Command::ApplyPlan(outcome.plan))
        .await?;
    tracing::debug!(
        creates,
        updates,
        removes,
        index = applied.index,
        took = ?started.elapsed(),
        "reconcile plan committed"
    );
    Ok((outcome.rest, outcome.wake_at_ms, placed))
}

/// Marks down every ready node not heard from within the grace period.
async fn liveness(
    handle: &NodeHandle,
    sessions: &Sessions,
    cfg: &OrchestratorConfig,
    since: Instant,
) {
    let grace = cfg.grace();
    let (ready, silent): (usize, Vec<(String, Duration)>) = {
        let store = handle.store().read();
        let ready: Vec<_> = store
            .nodes()
            .filter(|n| n.state() == NodeState::Ready)
            .collect();
        let silent = ready
            .iter()
            .filter_map(|n| {
                let name = n.description.as_ref()?.name.clone();
                let last = sessions.last_seen(&name).map_or(since, |t| t.max(since));
                let silent = last.elapsed();
                (silent > grace).then_some((name, silent))
            })
            .collect();
        (ready.len(), silent)
    };
    if mass_silence(ready, silent.len()) {
        // Most nodes going quiet at once says more about this controller (overloaded, cut off)
        // than about the nodes: declaring them all down would move every task for nothing
        // (like Kubernetes' node lifecycle controller, which stops evicting on a full zone
        // disruption). Wait until heartbeats come back or leadership moves.
        tracing::warn!(
            silent = silent.len(),
            ready,
            "most nodes silent at once: not marking them down (suspecting this controller)"
        );
        return;
    }
    for (name, silent) in silent {
        sessions.close(&name);
        let command = Command::SetNodeState {
            name: name.clone(),
            state: NodeState::Down,
            message: format!("no heartbeat for {}s", silent.as_secs()),
            now_ms: now_ms(),
        };
        match handle.propose(&command).await {
            Ok(_) => tracing::warn!(node = %name, ?silent, "node marked down: heartbeats stopped"),
            Err(err) => tracing::warn!(node = %name, cause = %err, "cannot mark the node down"),
        }
        // A registration that saw the node still ready may have opened a session meanwhile:
        // close it too, so the node registers again and is marked ready through Raft.
        sessions.close(&name);
    }
}

/// Whether `silent` of `ready` nodes missing their heartbeats at once is more likely this
/// controller's trouble than theirs: more than half, in a cluster of at least three nodes.
fn mass_silence(ready: usize, silent: usize) -> bool {
    ready >= 3 && silent * 2 > ready
}

/// Task ids: `<service>.<slot>.<10 hex>`, at most 64 characters (container ids on the node).
#[derive(Debug, Clone, Default)]
struct TaskIds {
    random: RandomState,
    counter: std::sync::Arc<AtomicU64>,
}

impl TaskIds {
    fn next(&self, service: &str, slot: u32) -> String {
        let mut hasher = self.random.build_hasher();
        hasher.write_u64(self.counter.fetch_add(1, Ordering::Relaxed));
        hasher.write_u64(now_ms());
        let suffix = hasher.finish() & 0xff_ffff_ffff;
        let name: String = service.chars().take(40).collect();
        format!("{name}.{slot}.{suffix:010x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_goes_a_chunk_at_a_time_at_its_duty() {
        let keys: Vec<ServiceKey> = (0..5)
            .map(|i| ("default".to_string(), format!("s{i}")))
            .collect();
        let mut sweep = Sweep::new(keys.clone());
        let t0 = Instant::now();
        assert_eq!(sweep.wait(t0), Some(Duration::ZERO));
        assert_eq!(sweep.due_chunk(t0, 2).as_deref(), keys.get(..2));
        // A pass of 10 ms with that chunk: the next one 490 ms later, not sooner.
        let t1 = t0 + Duration::from_millis(10);
        sweep.chunk_done(t1, Duration::from_millis(10));
        assert_eq!(sweep.wait(t1), Some(Duration::from_millis(490)));
        assert_eq!(sweep.due_chunk(t1 + Duration::from_millis(489), 2), None);
        let t2 = t1 + Duration::from_millis(490);
        assert_eq!(sweep.due_chunk(t2, 2).as_deref(), keys.get(2..4));
        sweep.chunk_done(t2, Duration::ZERO);
        assert!(!sweep.is_done());
        // The last chunk is what is left; then nothing is due any more.
        assert_eq!(sweep.due_chunk(t2, 2).as_deref(), keys.get(4..));
        assert!(sweep.is_done());
        assert_eq!(sweep.wait(t2), None);
        assert_eq!(sweep.due_chunk(t2 + Duration::from_secs(60), 2), None);
    }

    #[test]
    fn a_mass_silence_is_not_a_mass_failure() {
        assert!(!mass_silence(1, 1), "a one-node cluster's node can go down");
        assert!(!mass_silence(2, 2));
        assert!(!mass_silence(3, 1));
        assert!(mass_silence(3, 2));
        assert!(!mass_silence(10_000, 5_000));
        assert!(mass_silence(10_000, 5_001));
    }

    #[test]
    fn a_pass_cut_short_leaves_the_rest_of_its_chunk_and_every_later_chunk() {
        let key = |name: &str| ("default".to_string(), name.to_string());
        let chunks = [
            vec![key("a"), key("b")],
            vec![key("c"), key("d")],
            vec![key("e")],
        ];
        let refs: Vec<&[ServiceKey]> = chunks.iter().map(Vec::as_slice).collect();
        // Cut short at "d" in the second chunk: "a" to "c" are done.
        let left = unreached(vec![key("d")], refs.get(2..).unwrap_or_default());
        assert_eq!(left, BTreeSet::from([key("d"), key("e")]));
        // In the last chunk nothing comes after.
        let left = unreached(vec![key("e")], refs.get(3..).unwrap_or_default());
        assert_eq!(left, BTreeSet::from([key("e")]));
    }

    #[test]
    fn task_ids_are_unique_and_short() {
        let ids = TaskIds::default();
        let long = "x".repeat(63);
        let a = ids.next(&long, 12345);
        let b = ids.next(&long, 12345);
        assert_ne!(a, b);
        assert!(a.len() <= 64, "{a}");
        assert!(ids.next("web", 1).starts_with("web.1."));
    }
}
