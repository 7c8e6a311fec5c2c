//! The worker proper (swarmkit's `agent/worker.go`): holds the assigned set and one runner per
//! assigned task, and converges them whenever the set changes. Assignment messages are applied
//! one at a time, in order; the runners then work in parallel (bounded by the converge limit).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Mutex;
use tokio_util::task::TaskTracker;
use tug_api::v1::AssignmentsMessage;

use super::assignments::Assigned;
use super::ctx::{Ctx, blocking};
use super::error::SessionError;
use super::plan::{Action, plan};
use super::runner::{self, RunnerHandle};
use super::task_config::{TASK_ANNOTATION, grace};
use crate::runtime::container::Runtime;
use crate::runtime::state::read_json;

#[derive(Debug)]
pub(crate) struct Worker {
    pub ctx: Arc<Ctx>,
    inner: Mutex<Inner>,
    revision: AtomicU64,
    tasks: TaskTracker,
}

#[derive(Debug)]
struct Inner {
    assigned: Assigned,
    runners: BTreeMap<String, RunnerHandle>,
}

/// Ids of the task containers on the node (those with the `tug.task` annotation).
pub(crate) fn task_containers(rt: &Runtime) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in rt.list().unwrap_or_default() {
        let spec: Option<oci_spec::runtime::Spec> = read_json(&rt.dir(&s.id).config()).ok();
        let is_task = spec
            .as_ref()
            .and_then(|sp| sp.annotations().as_ref())
            .is_some_and(|a| a.get(TASK_ANNOTATION) == Some(&s.id));
        if is_task {
            out.insert(s.id);
        }
    }
    out
}

impl Worker {
    /// Resume what the last run of the agent was given: its saved tasks get runners at once
    /// (they adopt their containers), before any controller is reachable.
    pub(crate) async fn start(ctx: Arc<Ctx>) -> Worker {
        let saved = ctx.files.load_tasks();
        if !saved.is_empty() {
            tracing::info!(tasks = saved.len(), "resuming the saved assignments");
        }
        let worker = Worker {
            ctx,
            inner: Mutex::new(Inner {
                assigned: Assigned::restored(saved),
                runners: BTreeMap::new(),
            }),
            revision: AtomicU64::new(0),
            tasks: TaskTracker::new(),
        };
        {
            let mut inner = worker.inner.lock().await;
            worker.converge(&mut inner).await;
        }
        worker
    }

    /// The revision of the last assignments message applied (0: none in this process).
    pub(crate) fn revision(&self) -> u64 {
        self.revision.load(Ordering::SeqCst)
    }

    pub(crate) async fn apply(&self, msg: AssignmentsMessage) -> Result<(), SessionError> {
        let mut inner = self.inner.lock().await;
        tracing::debug!(
            kind = msg.kind,
            tasks = msg.tasks.len(),
            removed = msg.removed.len(),
            revision = msg.revision,
            "assignments"
        );
        inner.assigned.apply(msg)?;
        self.revision
            .store(inner.assigned.revision(), Ordering::SeqCst);
        self.converge(&mut inner).await;
        Ok(())
    }

    async fn converge(&self, inner: &mut Inner) {
        let local = if inner.assigned.is_complete() {
            let rt = self.ctx.runtime.clone();
            let mut found = blocking(move || task_containers(&rt))
                .await
                .unwrap_or_default();
            let removing = self.ctx.removing().clone();
            found.retain(|id| !removing.contains(id));
            found
        } else {
            BTreeSet::new()
        };
        let desired = inner
            .runners
            .iter()
            .map(|(id, h)| (id.clone(), h.desired))
            .collect();
        for action in plan(&inner.assigned, &desired, &local) {
            match action {
                Action::Supervise(task) => {
                    self.save(&task);
                    let id = task.id.clone();
                    let handle = runner::spawn(self.ctx.clone(), task, &self.tasks);
                    inner.runners.insert(id, handle);
                }
                Action::Update(task) => {
                    self.save(&task);
                    if let Some(h) = inner.runners.get_mut(&task.id) {
                        h.update(task);
                    }
                }
                Action::Remove(id) => {
                    if let Some(h) = inner.runners.remove(&id) {
                        tracing::info!(task = %id, "unassigned: removing");
                        self.ctx.removing().insert(id);
                        h.remove();
                    }
                }
                Action::RemoveOrphan(id) => {
                    tracing::info!(task = %id, "not assigned to this node: removing");
                    self.ctx.removing().insert(id.clone());
                    self.tasks
                        .spawn(runner::remove(self.ctx.clone(), id, grace(None)));
                }
            }
        }
    }

    fn save(&self, task: &tug_api::v1::Task) {
        if let Err(e) = self.ctx.files.save_task(task) {
            tracing::warn!(task = %task.id, cause = %e, "cannot save the task");
        }
    }

    /// Stop supervising (the agent stops): runners end, containers keep running. Waits for
    /// runners and removals in progress to reach a safe point.
    pub(crate) async fn shutdown(&self) {
        self.ctx.shutdown.cancel();
        self.inner.lock().await.runners.clear();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
