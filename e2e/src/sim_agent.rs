//! A simulated agent: speaks the node protocol (register, heartbeat, assignments, status reports)
//! like `tug agent`, but "runs" a task by reporting it running, without a container. Controller
//! tests use it to drive scheduling and reconciliation without containers, and the scheduling
//! benchmark runs thousands of them in one process (sharing one HTTP/2 channel).
//!
//! A paused agent goes silent (no heartbeats, no stream), like a host cut off the network; when
//! resumed it registers again and converges to its COMPLETE assignment set.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tug_api::v1::dispatcher_client::DispatcherClient;
use tug_api::v1::{
    AssignmentsRequest, DesiredState, HeartbeatRequest, NodeDescription, RegisterRequest,
    ReportStatusRequest, Resources, Task, TaskHealth, TaskState, TaskStatus, TaskStatusUpdate,
    assignments_message::Kind,
};

/// What a simulated node says about itself.
#[derive(Debug, Clone)]
pub struct SimAgentConfig {
    pub name: String,
    pub labels: HashMap<String, String>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Heartbeats and status reports go over this connection when set, else over the session's.
    /// Agents sharing a connection share its HTTP/2 flow-control window: assignment data they
    /// have not read yet holds back every answer on it. An agent waiting for its report's answer
    /// does not read its stream, so with reports on the stream connection, agents sharing it can
    /// wait for each other forever (and heartbeat answers stall: live nodes go down).
    pub unary_channel: Option<Channel>,
}

impl SimAgentConfig {
    pub fn new(name: &str) -> SimAgentConfig {
        SimAgentConfig {
            name: name.to_string(),
            labels: HashMap::new(),
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
            unary_channel: None,
        }
    }
}

/// A running simulated agent. Dropping it stops it.
#[derive(Debug)]
pub struct SimAgent {
    name: String,
    running: Arc<Mutex<BTreeMap<String, Task>>>,
    paused: Arc<AtomicBool>,
    reported: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SimAgent {
    /// Starts talking to the controllers behind `channels` (any replica; the next one after a
    /// failure). Must be called inside a tokio runtime.
    pub fn start(channels: Vec<Channel>, cfg: SimAgentConfig) -> SimAgent {
        let running = Arc::new(Mutex::new(BTreeMap::new()));
        let paused = Arc::new(AtomicBool::new(false));
        let reported = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = watch::channel(false);
        let name = cfg.name.clone();
        let shared = Shared {
            running: running.clone(),
            paused: paused.clone(),
            reported: reported.clone(),
        };
        let task = tokio::spawn(run(channels, cfg, shared, stopped));
        SimAgent {
            name,
            running,
            paused,
            reported,
            stop,
            task,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ids of the tasks this node runs now.
    pub fn running(&self) -> Vec<String> {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// How many tasks this node runs now.
    pub fn running_count(&self) -> usize {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// How many RUNNING reports the controller has acknowledged.
    pub fn reported_running(&self) -> usize {
        self.reported.load(Ordering::Relaxed)
    }

    /// Goes silent (true) or comes back (false).
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the agent task shares with its handle.
struct Shared {
    running: Arc<Mutex<BTreeMap<String, Task>>>,
    paused: Arc<AtomicBool>,
    reported: Arc<AtomicUsize>,
}

async fn run(
    channels: Vec<Channel>,
    cfg: SimAgentConfig,
    shared: Shared,
    mut stopped: watch::Receiver<bool>,
) {
    let paused = &shared.paused;
    let mut backoff = Duration::from_millis(100);
    let mut next = 0usize;
    loop {
        if *stopped.borrow() {
            return;
        }
        if paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let Some(channel) = channels.get(next % channels.len().max(1)) else {
            return;
        };
        next += 1;
        let session = session(channel.clone(), &cfg, &shared);
        tokio::select! {
            result = session => {
                match result {
                    Err(status) => {
                        tracing::debug!(node = %cfg.name, ?status, "simulated agent session ended");
                    }
                    Ok(()) => backoff = Duration::from_millis(100),
                }
            }
            _ = stopped.wait_for(|s| *s) => return,
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// One registration: heartbeats and the assignment stream, until an error or a pause.
async fn session(
    channel: Channel,
    cfg: &SimAgentConfig,
    shared: &Shared,
) -> Result<(), tonic::Status> {
    let (running, paused) = (&shared.running, &shared.paused);
    let mut client = DispatcherClient::new(channel);
    let registered = client
        .register(RegisterRequest {
            node: Some(NodeDescription {
                name: cfg.name.clone(),
                address: format!("{}.sim:7441", cfg.name),
                labels: cfg.labels.clone(),
                capacity: Some(Resources {
                    cpu_millis: cfg.cpu_millis,
                    memory_bytes: cfg.memory_bytes,
                }),
                runtime_version: "simulated".into(),
                kernel_version: "simulated".into(),
                os: "linux".into(),
                arch: "amd64".into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    let session_id = registered.session_id;
    let period = Duration::from_millis(registered.heartbeat_period_ms.max(50));
    let mut stream = client
        .assignments(AssignmentsRequest {
            node: cfg.name.clone(),
            after_revision: 0,
        })
        .await?
        .into_inner();
    // Unary calls on their own connection when there is one (see `unary_channel`).
    let mut unary = match &cfg.unary_channel {
        Some(channel) => DispatcherClient::new(channel.clone()),
        None => client.clone(),
    };
    // Heartbeats run on their own task, as a real agent's do: a slow status report must not
    // delay them (the node would be declared down).
    let mut beats = AbortOnDrop(tokio::spawn({
        let mut client = unary.clone();
        let (node, session_id, paused) = (cfg.name.clone(), session_id.clone(), paused.clone());
        async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if paused.load(Ordering::SeqCst) {
                    return Ok(());
                }
                client
                    .heartbeat(HeartbeatRequest {
                        node: node.clone(),
                        session_id: session_id.clone(),
                    })
                    .await?;
            }
        }
    }));
    loop {
        if paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        tokio::select! {
            ended = &mut beats.0 => {
                return ended.unwrap_or_else(|e| Err(tonic::Status::internal(e.to_string())));
            }
            message = stream.message() => {
                let Some(message) = message? else {
                    return Err(tonic::Status::unavailable("assignment stream ended"));
                };
                let updates = converge(running, message.kind() == Kind::Complete, message.tasks, &message.removed);
                if !updates.is_empty() && !paused.load(Ordering::SeqCst) {
                    let started = updates
                        .iter()
                        .filter(|u| u.status.as_ref().is_some_and(|s| s.state() == TaskState::Running))
                        .count();
                    unary
                        .report_status(ReportStatusRequest {
                            node: cfg.name.clone(),
                            session_id: session_id.clone(),
                            updates,
                            ..Default::default()
                        })
                        .await?;
                    shared.reported.fetch_add(started, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Aborts the task when the session it belongs to ends.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Applies an assignment message and returns the status changes it causes.
fn converge(
    running: &Arc<Mutex<BTreeMap<String, Task>>>,
    complete: bool,
    tasks: Vec<Task>,
    removed: &[String],
) -> Vec<TaskStatusUpdate> {
    let mut running = running.lock().unwrap_or_else(PoisonError::into_inner);
    if complete {
        let keep: std::collections::HashSet<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
        running.retain(|id, _| keep.contains(id.as_str()));
    }
    for id in removed {
        running.remove(id);
    }
    let mut updates = Vec::new();
    for task in tasks {
        let state = task
            .status
            .as_ref()
            .map_or(TaskState::Pending, |s| s.state());
        let (next, run) = match task.desired_state() {
            DesiredState::Running => (TaskState::Running, true),
            _ => (TaskState::Stopped, false),
        };
        if run {
            running.insert(task.id.clone(), task.clone());
        } else {
            running.remove(&task.id);
        }
        let terminal = matches!(
            state,
            TaskState::Exited | TaskState::Failed | TaskState::Lost | TaskState::Stopped
        );
        if state == next || terminal {
            continue;
        }
        let health = if task
            .spec
            .as_deref()
            .is_some_and(|s| s.health_check.is_some())
        {
            TaskHealth::Healthy
        } else {
            TaskHealth::None
        };
        updates.push(TaskStatusUpdate {
            task_id: task.id.clone(),
            namespace: task.namespace.clone(),
            status: Some(TaskStatus {
                state: next.into(),
                health: health.into(),
                updated_ms: now_ms(),
                started_ms: if run { now_ms() } else { 0 },
                ..Default::default()
            }),
        });
    }
    updates
}
