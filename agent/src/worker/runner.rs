//! One task's supervisor (STYLE.md §5.3): pull, create, start, wait for the exit, restart per
//! policy, probe health, stop when asked, remove when unassigned. Each assigned task has one
//! runner, a tokio task fed the task's latest version through a watch channel.
//!
//! A runner adopts what it finds: a running container is supervised as it is (same process),
//! a created one is started, a stopped one counts as an exit. When the agent stops, runners
//! just end and the containers keep running; the next agent's runners pick them up.

use std::sync::Arc;
use std::time::Duration;

use oci_spec::runtime::Spec;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tug_api::v1::{
    DesiredState, RestartPolicy as ApiPolicy, Task, TaskHealth, TaskState, TaskStatus,
};

use super::ctx::{Ctx, blocking, now_ms};
use super::exit::wait_exit;
use super::health::{self, Check};
use super::records::TaskRecord;
use super::{launch, outcome, task_config};
use crate::image::{ImageError, ImageRef, Platform, Progress};
use crate::metrics::{TaskLabels, Tracked};
use crate::network::AttachRequest;
use crate::runtime::container::ContainerError;
use crate::runtime::state::{RuntimeOptions, State, Status, read_json};
use crate::supervisor::restarts::{Backoff, RestartPolicy, RestartTracker};
use tug_api::v1::port_spec::Protocol as ApiProtocol;
use tug_netplugin::nat::{PortMapping, Protocol};

/// The worker's side of a runner.
#[derive(Debug)]
pub(crate) struct RunnerHandle {
    /// The desired state the runner was last given.
    pub desired: DesiredState,
    task: watch::Sender<Task>,
    remove: CancellationToken,
}

impl RunnerHandle {
    pub(crate) fn update(&mut self, task: Task) {
        self.desired = task.desired_state();
        let _ = self.task.send(task);
    }

    /// The task is no longer assigned: the runner stops and removes its container, then ends.
    pub(crate) fn remove(self) {
        self.remove.cancel();
    }
}

pub(crate) fn spawn(ctx: Arc<Ctx>, task: Task, tracker: &TaskTracker) -> RunnerHandle {
    let (tx, rx) = watch::channel(task.clone());
    let remove = CancellationToken::new();
    let record = ctx.files.load_record(&task.id);
    let policy = match task.spec.as_deref().map(|s| s.restart_policy()) {
        Some(ApiPolicy::Never) => RestartPolicy::Never,
        Some(ApiPolicy::OnFailure) => RestartPolicy::OnFailure { max_retries: None },
        _ => RestartPolicy::Always,
    };
    let runner = Runner {
        id: task.id.clone(),
        namespace: task.namespace.clone(),
        status: task.status.clone().unwrap_or_default(),
        sig: Signals {
            shutdown: ctx.shutdown.clone(),
            remove: remove.clone(),
            task: rx,
        },
        ctx,
        record,
        policy,
        restarts: RestartTracker::new(policy, Backoff::default()),
        restart_pending: false,
    };
    tracker.spawn(runner.run());
    RunnerHandle {
        desired: task.desired_state(),
        task: tx,
        remove,
    }
}

/// What interrupts a runner's wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// The controller changed the task (its desired state).
    Changed,
    /// Unassigned: stop and remove the container.
    Removed,
    /// The agent stops: leave the container as it is.
    Shutdown,
}

#[derive(Debug)]
struct Signals {
    shutdown: CancellationToken,
    remove: CancellationToken,
    task: watch::Receiver<Task>,
}

impl Signals {
    async fn wake(&mut self) -> Wake {
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => Wake::Shutdown,
            () = self.remove.cancelled() => Wake::Removed,
            changed = self.task.changed() => match changed {
                Ok(()) => Wake::Changed,
                // The worker dropped the handle without removing the task: it is going away.
                Err(_) => Wake::Shutdown,
            },
        }
    }

    /// Sleep, unless something wakes the runner first.
    async fn sleep(&mut self, d: Duration) -> Option<Wake> {
        tokio::select! {
            () = tokio::time::sleep(d) => None,
            w = self.wake() => Some(w),
        }
    }
}

/// Why getting a container to run did not end with one running.
enum NotRunning {
    Wake(Wake),
    /// Pull or create failed: one sentence for the FAILED status.
    Failed(String),
}

/// How supervising a running container ended.
enum Supervised {
    Wake(Wake),
    Exited(State),
    /// Stopped by the runner after failing its health check.
    Unhealthy(State),
}

struct Runner {
    ctx: Arc<Ctx>,
    id: String,
    namespace: String,
    sig: Signals,
    status: TaskStatus,
    record: TaskRecord,
    policy: RestartPolicy,
    restarts: RestartTracker,
    /// The container exited and the policy restarts it: re-create it from its own spec.
    restart_pending: bool,
}

fn terminal(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Failed | TaskState::Stopped | TaskState::Lost | TaskState::Exited
    )
}

impl Runner {
    async fn run(mut self) {
        loop {
            let task = self.sig.task.borrow_and_update().clone();
            let wake = match task.desired_state() {
                DesiredState::Running => self.keep_running(&task).await,
                _ => self.keep_stopped(&task).await,
            };
            match wake {
                Wake::Changed => continue,
                Wake::Shutdown => return,
                Wake::Removed => {
                    let grace = task_config::grace(task.spec.as_deref());
                    remove(self.ctx.clone(), self.id.clone(), grace).await;
                    return;
                }
            }
        }
    }

    /// Publish the runner's status after `change`.
    fn report(&mut self, change: impl FnOnce(&mut TaskStatus)) {
        change(&mut self.status);
        self.status.restart_count = self.record.restart_count;
        self.status.updated_ms = now_ms().max(self.status.updated_ms);
        self.ctx
            .board
            .update(&self.id, &self.namespace, self.status.clone());
    }

    fn report_running(&mut self, state: &State, health: TaskHealth, started_ms: u64) {
        let pid = state.pid.and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        let address = self
            .ctx
            .network
            .address_of(&self.id)
            .map(|a| a.to_string())
            .unwrap_or_default();
        self.report(|s| {
            s.state = TaskState::Running.into();
            s.pid = pid;
            s.address = address;
            s.started_ms = started_ms;
            s.message = String::new();
            s.health = health.into();
        });
    }

    fn report_failed(&mut self, message: String) {
        tracing::warn!(task = %self.id, %message, "task failed");
        self.ctx.metrics.reconcile_errors.inc();
        self.report(|s| {
            s.state = TaskState::Failed.into();
            s.pid = 0;
            s.message = message;
        });
        self.finish();
    }

    /// The restart policy is done with this task: it is not started again, not even by a
    /// restarted agent.
    fn finish(&mut self) {
        self.record.finished = true;
        self.ctx.files.save_record(&self.id, &self.record);
    }

    async fn keep_running(&mut self, task: &Task) -> Wake {
        let check = Check::from_spec(task.spec.as_deref().and_then(|s| s.health_check.as_deref()));
        loop {
            if self.record.finished {
                return self.sig.wake().await;
            }
            let state = match self.ensure_running(task, check.is_some()).await {
                Ok(state) => state,
                Err(NotRunning::Wake(w)) => return w,
                Err(NotRunning::Failed(message)) => {
                    self.report_failed(message);
                    continue;
                }
            };
            let (state, unhealthy) = if state.status == Status::Stopped {
                (state, false)
            } else {
                match self.supervise(task, check.clone()).await {
                    Supervised::Wake(w) => return w,
                    Supervised::Exited(s) => (s, false),
                    Supervised::Unhealthy(s) => (s, true),
                }
            };
            if let Some(w) = self.exited(&state, unhealthy).await {
                return w;
            }
        }
    }

    /// A running container for the task: the one that runs already, or a new one.
    async fn ensure_running(&mut self, task: &Task, checked: bool) -> Result<State, NotRunning> {
        let health = if checked {
            TaskHealth::Starting
        } else {
            TaskHealth::None
        };
        let (rt, id) = (self.ctx.runtime.clone(), self.id.clone());
        let found = blocking(move || rt.state(&id))
            .await
            .map_err(NotRunning::Failed)?;
        // When this call starts the process, its start time is known to the millisecond; an
        // adopted one only has the runtime's (whole seconds).
        let mut started_now = true;
        let state = match found {
            Ok(s) if s.status == Status::Running => {
                // Adopted (after an agent restart) or already supervised: same process.
                started_now = false;
                s
            }
            Ok(s) if s.status == Status::Stopped && !self.restart_pending => return Ok(s),
            Ok(s) => {
                let _permit = self.permit().await?;
                self.report(|st| st.state = TaskState::Starting.into());
                let (rt, id, recreate) = (
                    self.ctx.runtime.clone(),
                    self.id.clone(),
                    s.status == Status::Stopped,
                );
                if recreate {
                    blocking(move || -> Result<(), ContainerError> {
                        // Same spec, same rootfs (its writes survive, as with docker restart).
                        let dir = rt.dir(&id);
                        let spec: Spec = read_json(&dir.config())?;
                        let opts: RuntimeOptions = read_json(&dir.runtime())?;
                        rt.delete(&id, false)?;
                        rt.create(&id, &spec, &opts)?;
                        Ok(())
                    })
                    .await
                    .map_err(NotRunning::Failed)?
                    .map_err(|e| NotRunning::Failed(format!("restart the container: {e}")))?;
                }
                // A new network namespace (or one an interrupted start left): wire it again;
                // the address stays the same.
                self.attach_network(task)
                    .await
                    .map_err(|e| NotRunning::Failed(format!("attach the network: {e}")))?;
                let (rt, id) = (self.ctx.runtime.clone(), self.id.clone());
                blocking(move || rt.start(&id))
                    .await
                    .map_err(NotRunning::Failed)?
                    .map_err(|e| NotRunning::Failed(format!("restart the container: {e}")))?
            }
            Err(ContainerError::NotFound(_)) => self.launch(task).await?,
            Err(e) => return Err(NotRunning::Failed(e.to_string())),
        };
        self.restart_pending = false;
        if state.status == Status::Running {
            let secs = state.started_at.unwrap_or(state.created_at);
            let started_ms = if started_now {
                now_ms()
            } else if self.status.started_ms / 1000 == secs {
                // Reported before, with milliseconds: keep them.
                self.status.started_ms
            } else {
                secs * 1000
            };
            self.report_running(&state, health, started_ms);
            self.track_running(task, &state, started_ms).await;
        }
        Ok(state)
    }

    /// The container runs: its metrics are collected from now on.
    async fn track_running(&self, task: &Task, state: &State, started_ms: u64) {
        let (rt, id) = (self.ctx.runtime.clone(), self.id.clone());
        let opts = match blocking(move || read_json::<RuntimeOptions>(&rt.dir(&id).runtime())).await
        {
            Ok(Ok(opts)) => opts,
            Ok(Err(e)) => {
                tracing::warn!(task = %self.id, cause = %e, "no metrics for the container");
                return;
            }
            Err(e) => {
                tracing::warn!(task = %self.id, cause = %e, "no metrics for the container");
                return;
            }
        };
        self.ctx.metrics.containers.running(Tracked {
            labels: TaskLabels {
                namespace: task.namespace.clone(),
                service: task.service.clone(),
                task: task.id.clone(),
                image: task
                    .spec
                    .as_ref()
                    .map(|s| s.image.clone())
                    .unwrap_or_default(),
            },
            cgroup_path: opts.cgroup_path,
            cpu_quota: opts.resources.cpu_quota,
            pid: state.pid.unwrap_or(0),
            started_at: started_ms as f64 / 1000.0,
            restarts: self.record.restart_count,
            past_oom_events: 0,
            running: true,
        });
    }

    /// The container stopped: only its counters stay in the metrics.
    async fn track_exit(&self, state: &State) {
        let (metrics, id, oom) = (self.ctx.metrics.clone(), self.id.clone(), state.oom_killed);
        let _ = blocking(move || metrics.container_exited(&id, oom)).await;
    }

    /// A converge slot (bounded parallelism), unless something wakes the runner first.
    async fn permit(&mut self) -> Result<OwnedSemaphorePermit, NotRunning> {
        let slots = self.ctx.converge.clone();
        tokio::select! {
            p = slots.acquire_owned() => p.map_err(|_| NotRunning::Wake(Wake::Shutdown)),
            w = self.sig.wake() => Err(NotRunning::Wake(w)),
        }
    }

    /// Wire the created container's network namespace into the node network (nothing to do
    /// when the node runs without one).
    async fn attach_network(&self, task: &Task) -> Result<(), String> {
        let net = &self.ctx.network;
        if !net.enabled() {
            return Ok(());
        }
        let spec = task.spec.as_deref();
        let ports = spec
            .map(|s| s.ports.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|p| p.host_port != 0)
            .map(|p| -> Result<PortMapping, String> {
                let port =
                    |n: u32| u16::try_from(n).map_err(|_| format!("port {n} is out of range"));
                Ok(PortMapping {
                    host_port: port(p.host_port)?,
                    container_port: port(p.container_port)?,
                    protocol: match p.protocol() {
                        ApiProtocol::Udp => Protocol::Udp,
                        _ => Protocol::Tcp,
                    },
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let request = AttachRequest {
            id: self.id.clone(),
            namespace: task.namespace.clone(),
            hostname: task_config::hostname_of(task),
            netns_path: self.ctx.runtime.dir(&self.id).netns(),
            rootfs: launch::rootfs_dir(&self.ctx.data_dir, &self.id).join("rootfs"),
            ports,
        };
        let address = net.attach(&request).await.map_err(|e| e.to_string())?;
        tracing::debug!(task = %self.id, %address, "network attached");
        Ok(())
    }

    /// Pull (if needed), create and start a new container.
    async fn launch(&mut self, task: &Task) -> Result<State, NotRunning> {
        let _permit = self.permit().await?;
        let spec = task
            .spec
            .as_ref()
            .ok_or_else(|| NotRunning::Failed("the task has no spec".into()))?;
        let reference = ImageRef::parse(&spec.image)
            .map_err(|e| NotRunning::Failed(format!("invalid image {:?}: {e}", spec.image)))?;
        let lock = self.ctx.pull_lock(&reference.to_string());
        let _pulling = tokio::select! {
            guard = lock.lock_owned() => guard,
            w = self.sig.wake() => return Err(NotRunning::Wake(w)),
        };
        let ctx = self.ctx.clone();
        let r2 = reference.clone();
        let found = blocking(move || ctx.store.get(&r2))
            .await
            .map_err(NotRunning::Failed)?;
        let record = match found {
            Ok(record) => record,
            Err(ImageError::NotFound(_)) => {
                self.report(|s| s.state = TaskState::Pulling.into());
                tracing::info!(task = %self.id, image = %reference, "pulling");
                // On a blocking thread of its own: the pull future is not provably Send (a
                // compiler limit with higher-ranked closures inside it), so it cannot be part
                // of a spawned runner; `block_on` there needs no Send. A runner woken meanwhile
                // stops waiting and the pull completes in the background, into the store.
                let (ctx, r2) = (self.ctx.clone(), reference.clone());
                let handle = tokio::runtime::Handle::current();
                let pull = blocking(move || {
                    let started = std::time::Instant::now();
                    let pulled =
                        handle.block_on(ctx.store.pull(&r2, &Platform::host(), &Progress(&|_| {})));
                    if let Ok(record) = &pulled {
                        let m = &ctx.metrics;
                        m.pull_seconds.observe(started.elapsed().as_secs_f64());
                        m.pull_bytes
                            .observe(record.layers.iter().map(|l| l.size).sum::<u64>() as f64);
                    }
                    pulled
                });
                tokio::select! {
                    r = pull => r
                        .map_err(NotRunning::Failed)?
                        .map_err(|e| NotRunning::Failed(format!("pull {reference}: {e}")))?,
                    w = self.sig.wake() => return Err(NotRunning::Wake(w)),
                }
            }
            Err(e) => return Err(NotRunning::Failed(format!("image {reference}: {e}"))),
        };
        self.report(|s| s.state = TaskState::Starting.into());
        let l = task_config::launch_of(task, &self.ctx.data_dir, self.ctx.oci_runtime.as_ref())
            .map_err(NotRunning::Failed)?;
        let ctx = self.ctx.clone();
        let timer = std::time::Instant::now();
        blocking(move || -> Result<(), String> {
            let id = l.id.clone();
            // A rootfs without a container is what an interrupted create left: start afresh.
            launch::remove_rootfs_of(&ctx.data_dir, &id).map_err(|e| e.to_string())?;
            launch::create(&ctx.store, &ctx.runtime, &ctx.data_dir, &record, l)
                .map_err(|e| format!("create the container: {e}"))?;
            Ok(())
        })
        .await
        .map_err(NotRunning::Failed)?
        .map_err(NotRunning::Failed)?;
        let attached = self
            .attach_network(task)
            .await
            .map_err(|e| format!("attach the network: {e}"));
        let ctx = self.ctx.clone();
        let id = self.id.clone();
        let started = blocking(move || -> Result<State, String> {
            let state = attached.and_then(|()| {
                ctx.runtime
                    .start(&id)
                    .map_err(|e| format!("start the container: {e}"))
            });
            if state.is_err() {
                let _ = ctx.runtime.delete(&id, true);
                let _ = launch::remove_rootfs_of(&ctx.data_dir, &id);
            }
            let state = state?;
            ctx.metrics
                .start_seconds
                .observe(timer.elapsed().as_secs_f64());
            Ok(state)
        })
        .await
        .map_err(NotRunning::Failed)?;
        let started = match started {
            Ok(state) => state,
            Err(e) => {
                if let Err(cleanup) = self.ctx.network.detach(&self.id).await {
                    tracing::warn!(task = %self.id, cause = %cleanup, "network cleanup after a failed start");
                }
                return Err(NotRunning::Failed(e));
            }
        };
        tracing::info!(task = %self.id, pid = ?started.pid, "started");
        Ok(started)
    }

    /// Wait for the running container's exit while probing its health.
    async fn supervise(&mut self, task: &Task, check: Option<Check>) -> Supervised {
        let exit = wait_exit(self.ctx.runtime.clone(), self.id.clone());
        tokio::pin!(exit);
        let (htx, mut hrx) = mpsc::channel(4);
        let pid = self.status.pid as i32;
        let probing: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match check {
            Some(c) => Box::pin(health::watch(
                self.ctx.runtime.clone(),
                self.id.clone(),
                pid,
                c,
                htx,
            )),
            None => Box::pin(std::future::pending()),
        };
        tokio::pin!(probing);
        let mut probing_done = false;
        loop {
            tokio::select! {
                state = &mut exit => return Supervised::Exited(state),
                Some(h) = hrx.recv() => {
                    self.report(|s| s.health = h.into());
                    if h == TaskHealth::Unhealthy && self.policy != RestartPolicy::Never {
                        tracing::warn!(task = %self.id, "unhealthy: restarting it");
                        let grace = task_config::grace(task.spec.as_deref());
                        let (rt, id) = (self.ctx.runtime.clone(), self.id.clone());
                        match blocking(move || rt.stop(&id, grace)).await {
                            Ok(Ok(state)) => return Supervised::Unhealthy(state),
                            Ok(Err(e)) => tracing::warn!(task = %self.id, cause = %e, "cannot stop the unhealthy container"),
                            Err(e) => tracing::warn!(task = %self.id, cause = %e, "cannot stop the unhealthy container"),
                        }
                    }
                }
                () = &mut probing, if !probing_done => probing_done = true,
                w = self.sig.wake() => return Supervised::Wake(w),
            }
        }
    }

    /// The container stopped while it should run: restart it per policy, or report it done.
    async fn exited(&mut self, state: &State, unhealthy: bool) -> Option<Wake> {
        self.track_exit(state).await;
        let o = outcome::on_exit(
            &mut self.restarts,
            self.policy,
            state,
            unhealthy,
            self.record.restart_count,
        );
        tracing::info!(task = %self.id, code = o.exit_code, restart_after = ?o.restart_after, message = %o.message, "container exited");
        if o.restart_after.is_some() {
            self.record.restart_count = self.record.restart_count.saturating_add(1);
            self.ctx.files.save_record(&self.id, &self.record);
        }
        self.report(|s| {
            s.state = o.state.into();
            s.exit_code = o.exit_code;
            s.pid = 0;
            s.message = o.message;
        });
        match o.restart_after {
            Some(after) => {
                self.restart_pending = true;
                self.sig.sleep(after).await
            }
            None => {
                self.finish();
                None
            }
        }
    }

    /// Desired SHUTDOWN: stop the container (SIGTERM, grace, SIGKILL) and report STOPPED.
    async fn keep_stopped(&mut self, task: &Task) -> Wake {
        let grace = task_config::grace(task.spec.as_deref());
        let (rt, id) = (self.ctx.runtime.clone(), self.id.clone());
        let found = blocking(move || rt.state(&id)).await;
        let stopped = match found {
            Ok(Ok(s)) if s.status != Status::Stopped => {
                let _permit = match self.permit().await {
                    Ok(p) => p,
                    Err(NotRunning::Wake(w)) => return w,
                    Err(NotRunning::Failed(_)) => return Wake::Shutdown,
                };
                tracing::info!(task = %self.id, ?grace, "stopping");
                let (rt, id) = (self.ctx.runtime.clone(), self.id.clone());
                match blocking(move || rt.stop(&id, grace)).await {
                    Ok(Ok(s)) => Some(s),
                    Ok(Err(e)) => {
                        tracing::warn!(task = %self.id, cause = %e, "cannot stop");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(task = %self.id, cause = %e, "cannot stop");
                        None
                    }
                }
            }
            Ok(Ok(s)) => Some(s),
            _ => None,
        };
        match stopped {
            Some(s) => {
                self.track_exit(&s).await;
                let code = s.exit_status().unwrap_or(255);
                self.report(|st| {
                    st.state = TaskState::Stopped.into();
                    st.exit_code = code;
                    st.pid = 0;
                    st.message = String::new();
                });
            }
            // Never started here: nothing ran, but the controller learns it is done.
            None if !terminal(self.status.state()) => self.report(|st| {
                st.state = TaskState::Stopped.into();
                st.pid = 0;
            }),
            None => {}
        }
        self.finish();
        self.sig.wake().await
    }
}

/// Stop (if it runs) and delete the task's container, remove its rootfs, its saved files and
/// its status. Also used for orphans, which have no runner.
pub(crate) async fn remove(ctx: Arc<Ctx>, id: String, grace: Duration) {
    ctx.removing().insert(id.clone());
    let _permit = ctx.converge.clone().acquire_owned().await;
    let c = ctx.clone();
    let id2 = id.clone();
    let result = blocking(move || -> Result<(), String> {
        match c.runtime.state(&id2) {
            Ok(s) => {
                if s.status != Status::Stopped {
                    c.runtime.stop(&id2, grace).map_err(|e| e.to_string())?;
                }
                c.runtime.delete(&id2, true).map_err(|e| e.to_string())?;
            }
            Err(ContainerError::NotFound(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        launch::remove_rootfs_of(&c.data_dir, &id2).map_err(|e| e.to_string())
    })
    .await;
    let result = match result {
        Ok(Ok(())) => ctx.network.detach(&id).await.map_err(|e| e.to_string()),
        Ok(Err(e)) | Err(e) => Err(e),
    };
    match result {
        Ok(()) => tracing::info!(task = %id, "removed"),
        Err(e) => {
            tracing::warn!(task = %id, cause = %e, "cannot remove the container")
        }
    }
    ctx.files.remove(&id);
    ctx.board.forget(&id);
    ctx.metrics.containers.remove(&id);
    ctx.removing().remove(&id);
}
