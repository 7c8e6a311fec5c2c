//! The worker against an in-test Dispatcher (tonic on 127.0.0.1:0; the real controller's side
//! is tested end to end in e2e/), the test bed's real registry and the real busybox image.
//! Runs as root: containers, overlay mounts, cgroups. Everything made is removed on drop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tug_agent::image::{ImageRef, ImageStore, StoreConfig};
use tug_agent::runtime::container::Runtime;
use tug_agent::worker::{WorkerConfig, launch, task_config};
use tug_api::shared::Shared;
use tug_api::v1::agent_client::AgentClient;
use tug_api::v1::assignments_message::Kind;
use tug_api::v1::dispatcher_server::{Dispatcher, DispatcherServer};
use tug_api::v1::health_check::{Probe, Tcp};
use tug_api::v1::{
    AssignmentsMessage, AssignmentsRequest, DesiredState, ExecRequest, HealthCheck,
    HeartbeatRequest, HeartbeatResponse, LogsRequest, NetworkMap, NetworkRequest, NodeDescription,
    RegisterRequest, RegisterResponse, ReportStatusRequest, ReportStatusResponse, RestartPolicy,
    ServiceSpec, Task, TaskHealth, TaskState, TaskStatus,
};
use tug_e2e::{Registry, RegistryOptions, TestImages};

type TestResult = Result<(), Box<dyn std::error::Error>>;
type Error = Box<dyn std::error::Error>;

// ---------------------------------------------------------------------------------------------
// A fake Dispatcher: one assigned set the test edits, every report kept.

#[derive(Default)]
struct FakeState {
    tasks: BTreeMap<String, Task>,
    revision: u64,
    stream: Option<mpsc::Sender<Result<AssignmentsMessage, Status>>>,
    registrations: Vec<NodeDescription>,
    after_revisions: Vec<u64>,
    reports: Vec<(String, TaskStatus)>,
    /// Answer the next heartbeat with NOT_FOUND (a lost session).
    forget_session: bool,
    sessions: u64,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the set and tell the connected agent (COMPLETE or INCREMENTAL).
    async fn change(&self, upsert: Vec<Task>, remove: &[&str], complete: bool) {
        let (msg, tx) = {
            let mut s = self.state();
            for id in remove {
                s.tasks.remove(*id);
            }
            for t in &upsert {
                s.tasks.insert(t.id.clone(), t.clone());
            }
            s.revision += 1;
            let msg = if complete {
                AssignmentsMessage {
                    kind: Kind::Complete.into(),
                    tasks: s.tasks.values().cloned().collect(),
                    removed: vec![],
                    revision: s.revision,
                }
            } else {
                AssignmentsMessage {
                    kind: Kind::Incremental.into(),
                    tasks: upsert,
                    removed: remove.iter().map(|s| s.to_string()).collect(),
                    revision: s.revision,
                }
            };
            (msg, s.stream.clone())
        };
        if let Some(tx) = tx {
            let _ = tx.send(Ok(msg)).await;
        }
    }

    fn statuses(&self, id: &str) -> Vec<TaskStatus> {
        self.state()
            .reports
            .iter()
            .filter(|(t, _)| t == id)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Wait until a report about `id` satisfies `f`; that status.
    async fn wait_status(
        &self,
        id: &str,
        what: &str,
        f: impl Fn(&TaskStatus) -> bool,
    ) -> Result<TaskStatus, Error> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(s) = self.statuses(id).into_iter().rev().find(|s| f(s)) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!("{id}: no {what} report; got {:?}", self.statuses(id)).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tonic::async_trait]
impl Dispatcher for Fake {
    type AssignmentsStream = ReceiverStream<Result<AssignmentsMessage, Status>>;
    type NetworkStream = ReceiverStream<Result<NetworkMap, Status>>;

    async fn network(
        &self,
        _: Request<NetworkRequest>,
    ) -> Result<Response<Self::NetworkStream>, Status> {
        Err(Status::unimplemented(
            "the fake controller has no network map",
        ))
    }

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let mut s = self.state();
        s.sessions += 1;
        s.registrations
            .push(request.into_inner().node.unwrap_or_default());
        Ok(Response::new(RegisterResponse {
            session_id: format!("session-{}", s.sessions),
            heartbeat_period_ms: 200,
            revision: s.revision,
            // No subnet: these workers run in the machine's own namespace, without a network.
            ..Default::default()
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let mut s = self.state();
        let expected = format!("session-{}", s.sessions);
        if std::mem::take(&mut s.forget_session) || request.into_inner().session_id != expected {
            return Err(Status::not_found("unknown session"));
        }
        Ok(Response::new(HeartbeatResponse {
            heartbeat_period_ms: 200,
        }))
    }

    async fn assignments(
        &self,
        request: Request<AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let after = request.into_inner().after_revision;
        let (tx, rx) = mpsc::channel(16);
        let mut s = self.state();
        s.after_revisions.push(after);
        // This fake keeps no history: a resume at the current revision gets nothing, anything
        // else a COMPLETE set.
        if after != s.revision || after == 0 {
            let msg = AssignmentsMessage {
                kind: Kind::Complete.into(),
                tasks: s.tasks.values().cloned().collect(),
                removed: vec![],
                revision: s.revision,
            };
            let _ = tx.try_send(Ok(msg));
        }
        s.stream = Some(tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_status(
        &self,
        request: Request<ReportStatusRequest>,
    ) -> Result<Response<ReportStatusResponse>, Status> {
        let req = request.into_inner();
        let mut s = self.state();
        if req.session_id != format!("session-{}", s.sessions) {
            return Err(Status::invalid_argument("stale session"));
        }
        for u in req.updates {
            s.reports.push((u.task_id, u.status.unwrap_or_default()));
        }
        Ok(Response::new(ReportStatusResponse {
            revision: s.revision,
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// The bed: registry, data dir, fake controller, the worker (restartable).

struct Bed {
    registry: Registry,
    data: tempfile::TempDir,
    image: String,
    fake: Fake,
    controller: SocketAddr,
    stop_fake: Option<oneshot::Sender<()>>,
}

impl Drop for Bed {
    /// Whatever a test (failed or not) left: containers (force-deleted with their cgroups),
    /// then mounts under the data dir.
    fn drop(&mut self) {
        if let Some(stop) = self.stop_fake.take() {
            let _ = stop.send(());
        }
        let rt = runtime(self.data.path());
        for s in rt.list().unwrap_or_default() {
            let _ = rt.delete(&s.id, true);
        }
        let data = self.data.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&data))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for mp in points {
            let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn runtime(data: &Path) -> Runtime {
    Runtime {
        root: data.join("containers"),
        monitor_exe: PathBuf::from(env!("CARGO_BIN_EXE_tug-agent-test-monitor")),
    }
}

/// A running worker: stop it with `stop` (its containers keep running).
struct Agent {
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), tug_agent::worker::WorkerError>>,
    api: SocketAddr,
}

impl Agent {
    async fn stop(mut self) -> TestResult {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.done).await???;
        Ok(())
    }
}

impl Bed {
    async fn new() -> Result<Bed, Error> {
        let images = TestImages::get()?;
        let registry = Registry::start_with(RegistryOptions::default().with_images())?;
        let image = images.oci.reference(&registry);
        let fake = Fake::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let controller = listener.local_addr()?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let service = DispatcherServer::new(fake.clone());
        tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Ok(Bed {
            registry,
            data: tempfile::tempdir()?,
            image,
            fake,
            controller,
            stop_fake: Some(stop_tx),
        })
    }

    async fn start_agent(&self) -> Result<Agent, Error> {
        let mut cfg = WorkerConfig::new(
            vec![self.controller.to_string()],
            self.data.path().to_path_buf(),
            "node-1".into(),
            PathBuf::from(env!("CARGO_BIN_EXE_tug-agent-test-monitor")),
        );
        cfg.insecure_registries = vec![self.registry.host_port()];
        cfg.labels = BTreeMap::from([("zone".into(), "a".into())]);
        cfg.capacity_memory_bytes = Some(1 << 30);
        cfg.max_parallel = 2;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let api = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(tug_agent::worker::run(cfg, listener, async {
            let _ = rx.await;
        }));
        Ok(Agent {
            stop: Some(tx),
            done,
            api,
        })
    }

    fn task(&self, id: &str, script: &str, policy: RestartPolicy) -> Task {
        Task {
            id: id.into(),
            namespace: "default".into(),
            service: id.split('.').next().unwrap_or_default().into(),
            node: "node-1".into(),
            desired_state: DesiredState::Running.into(),
            spec: Some(
                ServiceSpec {
                    image: self.image.clone(),
                    command: vec!["/bin/sh".into(), "-c".into()],
                    args: vec![script.into()],
                    restart_policy: policy.into(),
                    stop_grace_period_ms: 5000,
                    ..Default::default()
                }
                .into(),
            ),
            ..Default::default()
        }
    }
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

async fn wait_until(what: &str, f: impl Fn() -> bool) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting until {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn running(s: &TaskStatus) -> bool {
    s.state() == TaskState::Running && s.pid > 0
}

/// A container with the `tug.task` annotation that no controller assigned.
fn make_orphan(bed: &Bed, id: &str) -> TestResult {
    let mut cfg = StoreConfig::new(bed.data.path().join("images"));
    cfg.insecure_registries = vec![bed.registry.host_port()];
    let store = ImageStore::open(cfg)?;
    let record = store.get(&ImageRef::parse(&bed.image)?)?;
    let mut task = bed.task(id, "sleep 1000", RestartPolicy::Always);
    if let Some(s) = task.spec.as_mut().map(Shared::make_mut) {
        s.command = vec!["sleep".into()];
        s.args = vec!["1000".into()];
    }
    let l = task_config::launch_of(&task, bed.data.path(), None)?;
    let rt = runtime(bed.data.path());
    launch::create(&store, &rt, bed.data.path(), &record, l)?;
    rt.start(id)?;
    Ok(())
}

const SERVER: &str = "echo hello-from-task; httpd -p 8080; trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_runs_stops_removes_adopts_and_serves_logs_and_exec() -> TestResult {
    let bed = Bed::new().await?;
    let agent = bed.start_agent().await?;

    // Registration describes the node.
    wait_until("the agent registers", || {
        !bed.fake.state().registrations.is_empty()
    })
    .await?;
    let node = bed.fake.state().registrations[0].clone();
    assert_eq!(node.name, "node-1");
    assert_eq!(node.address, agent.api.to_string());
    assert_eq!(node.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(node.capacity.map(|c| c.memory_bytes), Some(1 << 30));
    assert!(node.runtime_version.starts_with("tug "), "{node:?}");

    // Assign a server with a TCP health check: pulled, started, running, healthy.
    let mut web = bed.task("web.1.aaaa", SERVER, RestartPolicy::Always);
    if let Some(s) = web.spec.as_mut().map(Shared::make_mut) {
        s.health_check = Some(Box::new(HealthCheck {
            probe: Some(Probe::Tcp(Tcp { port: 8080 })),
            interval_ms: 200,
            timeout_ms: 1000,
            retries: 2,
        }));
    }
    // And a task that fails at once under NEVER.
    let bad = bed.task("bad.1.bbbb", "echo failing; exit 3", RestartPolicy::Never);
    bed.fake
        .change(vec![web.clone(), bad.clone()], &[], true)
        .await;
    let up = bed.fake.wait_status(&web.id, "RUNNING", running).await?;
    assert!(alive(up.pid), "pid {} is not alive", up.pid);
    assert!(up.started_ms > 0);
    bed.fake
        .wait_status(&web.id, "HEALTHY", |s| s.health() == TaskHealth::Healthy)
        .await?;
    let failed = bed
        .fake
        .wait_status(&bad.id, "FAILED", |s| s.state() == TaskState::Failed)
        .await?;
    assert_eq!(failed.exit_code, 3);
    assert!(failed.message.contains("exited with code 3"), "{failed:?}");

    // Logs and exec over the agent API.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", agent.api))?
        .connect()
        .await?;
    let mut client = AgentClient::new(channel);
    let mut logs = client
        .logs(LogsRequest {
            task_id: web.id.clone(),
            follow: false,
            tail: 0,
        })
        .await?
        .into_inner();
    let mut text = String::new();
    while let Some(c) = logs.message().await? {
        text.push_str(&String::from_utf8_lossy(&c.data));
    }
    assert!(text.contains("hello-from-task"), "{text:?}");
    let mut exec = client
        .exec(ExecRequest {
            task_id: web.id.clone(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo out-$X; echo err >&2; exit 3".into(),
            ],
            env: vec!["X=y".into()],
            timeout_seconds: 20,
        })
        .await?
        .into_inner();
    let (mut out, mut err, mut last) = (Vec::new(), Vec::new(), None);
    while let Some(m) = exec.message().await? {
        out.extend_from_slice(&m.stdout);
        err.extend_from_slice(&m.stderr);
        if m.exited {
            last = Some(m.exit_code);
        }
    }
    assert_eq!(String::from_utf8_lossy(&out), "out-y\n");
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
    assert_eq!(last, Some(3));
    let unknown = client
        .exec(ExecRequest {
            task_id: "nope.1.x".into(),
            command: vec!["true".into()],
            ..Default::default()
        })
        .await;
    assert_eq!(unknown.err().map(|s| s.code()), Some(tonic::Code::NotFound));

    // A lost session: the agent registers again and resumes the stream where it was.
    let revision = bed.fake.state().revision;
    bed.fake.state().forget_session = true;
    wait_until("the agent registers again", || {
        bed.fake.state().registrations.len() >= 2
    })
    .await?;
    wait_until("the stream resumes", || {
        bed.fake.state().after_revisions.len() >= 2
    })
    .await?;
    assert_eq!(
        bed.fake.state().after_revisions[1],
        revision,
        "resumed, not resynced"
    );

    // An unknown task container goes once a COMPLETE set does not name it.
    make_orphan(&bed, "orphan.1.cccc")?;
    let rt = runtime(bed.data.path());
    assert!(rt.state("orphan.1.cccc").is_ok());
    bed.fake.change(vec![], &[], true).await;
    let orphan_rootfs = launch::rootfs_dir(bed.data.path(), "orphan.1.cccc");
    wait_until("the orphan and its rootfs are removed", || {
        rt.state("orphan.1.cccc").is_err() && !orphan_rootfs.exists()
    })
    .await?;
    assert!(rt.state(&web.id).is_ok(), "assigned containers stay");

    // The agent restarts: the container keeps running and is adopted with the same pid.
    agent.stop().await?;
    assert!(alive(up.pid), "stopping the agent stopped the container");
    bed.fake.state().reports.clear();
    let agent = bed.start_agent().await?;
    let again = bed.fake.wait_status(&web.id, "RUNNING", running).await?;
    assert_eq!(again.pid, up.pid, "re-adopted, not restarted");
    assert_eq!(
        bed.fake.state().after_revisions.last(),
        Some(&0),
        "a new process resyncs"
    );
    bed.fake
        .wait_status(&web.id, "HEALTHY", |s| s.health() == TaskHealth::Healthy)
        .await?;

    // Desired SHUTDOWN: stopped (the trap exits 0), reported STOPPED.
    let mut stop = web.clone();
    stop.desired_state = DesiredState::Shutdown.into();
    bed.fake.change(vec![stop], &[], false).await;
    let stopped = bed
        .fake
        .wait_status(&web.id, "STOPPED", |s| s.state() == TaskState::Stopped)
        .await?;
    assert_eq!(stopped.exit_code, 0);
    assert!(!alive(up.pid));
    assert!(
        rt.state(&web.id).is_ok(),
        "a stopped task keeps its container until removed"
    );

    // Removed from the assignments: container and rootfs go.
    bed.fake.change(vec![], &[&web.id, &bad.id], false).await;
    wait_until("the container is removed", || {
        rt.state(&web.id).is_err() && rt.state(&bad.id).is_err()
    })
    .await?;
    assert!(!launch::rootfs_dir(bed.data.path(), &web.id).exists());
    assert!(
        !bed.data
            .path()
            .join("worker/tasks")
            .join(format!("{}.pb", web.id))
            .exists()
    );
    agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exits_are_restarted_per_policy_and_counted() -> TestResult {
    let bed = Bed::new().await?;
    let agent = bed.start_agent().await?;
    let flaky = bed.task(
        "flaky.1.dddd",
        "echo run; sleep 0.2; exit 1",
        RestartPolicy::OnFailure,
    );
    let done = bed.task("done.1.eeee", "echo done", RestartPolicy::OnFailure);
    bed.fake
        .change(vec![flaky.clone(), done.clone()], &[], true)
        .await;
    let restarted = bed
        .fake
        .wait_status(&flaky.id, "a second restart", |s| {
            s.restart_count >= 2 && s.state() == TaskState::Running
        })
        .await?;
    assert!(restarted.pid > 0);
    let exited = bed
        .fake
        .wait_status(&flaky.id, "EXITED", |s| s.state() == TaskState::Exited)
        .await?;
    assert_eq!(exited.exit_code, 1);
    let finished = bed
        .fake
        .wait_status(&done.id, "EXITED 0", |s| s.state() == TaskState::Exited)
        .await?;
    assert_eq!((finished.exit_code, finished.restart_count), (0, 0));
    // The count survives the agent.
    agent.stop().await?;
    let saved = std::fs::read_to_string(bed.data.path().join("worker/tasks/flaky.1.dddd.json"))?;
    assert!(saved.contains("restart_count"), "{saved}");
    Ok(())
}
