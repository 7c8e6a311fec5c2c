//! A cluster of Raft nodes in one process, on a [`MemNetwork`], with data dirs under a base
//! directory: start, kill (abort, like a crash), stop, restart from the data dir, add nodes, and
//! wait for a leader or for convergence.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tug_api::v1::{ObjectMeta, Service, ServiceSpec};

use super::network::MemNetwork;
use crate::fsm::Command;
use crate::raft::{Applied, Node, NodeConfig, NodeError, NodeHandle, NodeStatus, ProposeError};

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Propose(#[from] ProposeError),
    #[error("node {0} is not running")]
    NotRunning(u64),
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
}

/// Settings for fast tests: 20 ms ticks (election timeout 200-400 ms), 3 s proposal and read
/// timeouts, everything else as in production.
pub fn fast_config(id: u64, data_dir: &Path) -> NodeConfig {
    let mut cfg = NodeConfig::new(id, data_dir);
    cfg.tick_interval = Duration::from_millis(20);
    cfg.election_ticks = 10;
    cfg.heartbeat_ticks = 2;
    cfg.proposal_timeout = Duration::from_secs(3);
    cfg.read_timeout = Duration::from_secs(3);
    cfg
}

struct Running {
    handle: NodeHandle,
    task: JoinHandle<Result<(), NodeError>>,
    stop: Option<oneshot::Sender<()>>,
}

type Tweak = Arc<dyn Fn(&mut NodeConfig) + Send + Sync>;

/// In-process nodes on one network.
pub struct TestCluster {
    pub net: MemNetwork,
    base: PathBuf,
    tweak: Tweak,
    configs: BTreeMap<u64, NodeConfig>,
    running: BTreeMap<u64, Running>,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("base", &self.base)
            .field("running", &self.running.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TestCluster {
    /// Starts nodes `1..=n` as a new group. `tweak` adjusts every node's [`fast_config`].
    /// Must be called inside a tokio runtime.
    pub fn start(
        base: &Path,
        n: u64,
        seed: u64,
        tweak: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
    ) -> Result<Self, HarnessError> {
        let mut cluster = Self {
            net: MemNetwork::new(seed),
            base: base.to_path_buf(),
            tweak: Arc::new(tweak),
            configs: BTreeMap::new(),
            running: BTreeMap::new(),
        };
        let members: Vec<u64> = (1..=n).collect();
        for id in 1..=n {
            cluster.start_node(id, members.clone())?;
        }
        Ok(cluster)
    }

    /// Where node `id` keeps its data.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.base.join(format!("node-{id}"))
    }

    /// Starts node `id` with a fresh config: `initial_members` bootstraps a new group; an empty
    /// list starts a node that waits to be added.
    pub fn start_node(&mut self, id: u64, initial_members: Vec<u64>) -> Result<(), HarnessError> {
        let mut cfg = fast_config(id, &self.data_dir(id));
        cfg.initial_members = initial_members;
        (self.tweak)(&mut cfg);
        self.configs.insert(id, cfg.clone());
        self.launch(cfg)
    }

    fn launch(&mut self, cfg: NodeConfig) -> Result<(), HarnessError> {
        let id = cfg.id;
        let (node, handle) = Node::open(cfg, self.net.transport(id))?;
        self.net.register(handle.mailbox().clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(node.run(async move {
            let _ = stopped.await;
        }));
        self.running.insert(
            id,
            Running {
                handle,
                task,
                stop: Some(stop),
            },
        );
        Ok(())
    }

    /// Crashes node `id`: its task is aborted between two Ready cycles, nothing is flushed.
    pub async fn kill(&mut self, id: u64) -> Result<(), HarnessError> {
        let running = self
            .running
            .remove(&id)
            .ok_or(HarnessError::NotRunning(id))?;
        running.task.abort();
        let _ = running.task.await;
        Ok(())
    }

    /// Stops node `id` cleanly and returns how its task ended.
    pub async fn stop(&mut self, id: u64) -> Result<(), HarnessError> {
        let mut running = self
            .running
            .remove(&id)
            .ok_or(HarnessError::NotRunning(id))?;
        if let Some(stop) = running.stop.take() {
            let _ = stop.send(());
        }
        match running.task.await {
            Ok(result) => result.map_err(HarnessError::from),
            Err(_) => Ok(()),
        }
    }

    /// Starts a stopped or killed node again from its data dir.
    pub fn restart(&mut self, id: u64) -> Result<(), HarnessError> {
        let cfg = self
            .configs
            .get(&id)
            .cloned()
            .ok_or(HarnessError::NotRunning(id))?;
        self.launch(cfg)
    }

    /// Stops every node of `ids` cleanly, starts them all again from their data dirs, and
    /// waits for them to elect a leader. Returns the leader.
    pub async fn restart_all(
        &mut self,
        ids: &[u64],
        timeout: Duration,
    ) -> Result<u64, HarnessError> {
        for &id in ids {
            self.stop(id).await?;
        }
        for &id in ids {
            self.restart(id)?;
        }
        self.wait_for_leader(ids, timeout).await
    }

    pub fn handle(&self, id: u64) -> Result<&NodeHandle, HarnessError> {
        self.running
            .get(&id)
            .map(|r| &r.handle)
            .ok_or(HarnessError::NotRunning(id))
    }

    /// Ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.running.keys().copied().collect()
    }

    /// Waits until exactly one of `among` is leader and all of `among` follow it.
    pub async fn wait_for_leader(
        &self,
        among: &[u64],
        timeout: Duration,
    ) -> Result<u64, HarnessError> {
        let what = format!("one leader among {among:?}");
        self.wait_until(&what, timeout, || {
            let statuses: Vec<_> = among
                .iter()
                .filter_map(|id| self.handle(*id).ok().map(NodeHandle::status))
                .collect();
            if statuses.len() != among.len() {
                return None;
            }
            let leaders: Vec<u64> = statuses
                .iter()
                .filter(|s| s.is_leader())
                .map(|s| s.id)
                .collect();
            match leaders.as_slice() {
                [leader] if statuses.iter().all(|s| s.leader_id == Some(*leader)) => Some(*leader),
                _ => None,
            }
        })
        .await
    }

    /// Proposes through whichever running node is leader, retrying (and re-finding the leader)
    /// on failure until `timeout`. A retried write may be applied twice, which is harmless for
    /// apply-style commands.
    pub async fn propose(
        &self,
        command: &Command,
        timeout: Duration,
    ) -> Result<Applied, HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        while Instant::now() < deadline {
            let leader = self
                .running
                .values()
                .find(|r| r.handle.status().is_leader());
            let Some(leader) = leader else {
                sleep(Duration::from_millis(10)).await;
                continue;
            };
            match leader.handle.propose(command).await {
                Ok(applied) => return Ok(applied),
                Err(e @ ProposeError::Rejected(_)) => return Err(e.into()),
                Err(e) => {
                    last_err = Some(e);
                    sleep(Duration::from_millis(10)).await;
                }
            }
        }
        Err(last_err.map_or_else(
            || HarnessError::Timeout {
                what: "a leader to propose to".into(),
                timeout,
            },
            HarnessError::from,
        ))
    }

    /// Waits until every node in `among` has applied the same index, which is also the
    /// commit index they agree on, and holds the same services. Returns that index.
    ///
    /// Applied indices come from the stores (updated as entries apply); the published status
    /// can trail them by one cycle.
    pub async fn wait_converged(
        &self,
        among: &[u64],
        timeout: Duration,
    ) -> Result<u64, HarnessError> {
        let what = format!("{among:?} to converge");
        self.wait_until(&what, timeout, || {
            let mut applied = None;
            let mut contents: Option<Vec<Service>> = None;
            for id in among {
                let handle = self.handle(*id).ok()?;
                let revision = handle.store().read().revision();
                let status = handle.status();
                if status.applied_index != revision
                    || status.commit_index != revision
                    || applied.is_some_and(|a| a != revision)
                {
                    return None;
                }
                applied = Some(revision);
                let services = services(handle);
                if contents.as_ref().is_some_and(|c| *c != services) {
                    return None;
                }
                contents = Some(services);
            }
            applied
        })
        .await
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(
        &self,
        id: u64,
        index: u64,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let what = format!("node {id} to apply index {index}");
        self.wait_until(&what, timeout, || {
            let handle = self.handle(id).ok()?;
            (handle.status().applied_index >= index).then_some(())
        })
        .await
    }

    /// Waits until node `id` has stored a snapshot at `index` or later (snapshots are written
    /// in the background); returns its status then.
    pub async fn wait_snapshot(
        &self,
        id: u64,
        index: u64,
        timeout: Duration,
    ) -> Result<NodeStatus, HarnessError> {
        let what = format!("node {id} to store a snapshot at index {index} or later");
        self.wait_until(&what, timeout, || {
            let status = self.handle(id).ok()?.status();
            (status.snapshot_index >= index).then_some(status)
        })
        .await
    }

    /// Polls `check` every 10 ms until it returns `Some` or `timeout` passes.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> Result<T, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check() {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: what.to_string(),
                    timeout,
                });
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops every node cleanly.
    pub async fn shutdown(mut self) -> Result<(), HarnessError> {
        for id in self.running() {
            self.stop(id).await?;
        }
        Ok(())
    }
}

/// A service of the default namespace with just a name, an image and a replica count: what
/// the tests write.
pub fn service(name: &str, image: &str, replicas: u32) -> Service {
    Service {
        metadata: Some(ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        spec: Some(
            ServiceSpec {
                image: image.into(),
                replicas,
                ..Default::default()
            }
            .into(),
        ),
        previous_spec: None,
    }
}

/// Every service in a node's store (stale read), ordered by namespace and name.
pub fn services(handle: &NodeHandle) -> Vec<Service> {
    handle
        .store()
        .read()
        .list_services(None, &HashMap::new())
        .into_iter()
        .cloned()
        .collect()
}
