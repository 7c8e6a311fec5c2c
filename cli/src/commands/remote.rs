//! `tug logs` and `tug exec` for tasks: the controller says which node runs the task, and the
//! agent of that node (its API address is in the node list) streams the logs or runs the command.
//! A name that is a container on this machine is served locally, without a controller.

use std::io::Write;

use anyhow::{Context, anyhow, bail};
use tonic::transport::Endpoint;
use tug_api::v1::agent_client::AgentClient;
use tug_api::v1::{
    DesiredState, ExecRequest, ListNodesRequest, ListTasksRequest, LogsRequest, Task, TaskState,
    log_chunk,
};

use super::client::{addresses, block_on, call};
use crate::args::{ExecArgs, GlobalArgs, LogsArgs};

/// The tasks `name` stands for: the task with that id, or the live tasks of the service so named.
fn resolve(global: &GlobalArgs, namespace: Option<&str>, name: &str) -> anyhow::Result<Vec<Task>> {
    let namespace = namespace.unwrap_or_default().to_string();
    let all = super::cluster::list_tasks(
        global,
        ListTasksRequest {
            namespace: namespace.clone(),
            ..Default::default()
        },
    )?;
    if let Some(task) = all.iter().find(|t| t.id == name) {
        return Ok(vec![task.clone()]);
    }
    let of_service: Vec<Task> = all
        .into_iter()
        .filter(|t| t.service == name && !t.node.is_empty())
        .filter(|t| t.desired_state() == DesiredState::Running)
        .collect();
    if of_service.is_empty() {
        bail!("no task or service named {name:?} has a container (see `tug get tasks`)");
    }
    Ok(of_service)
}

/// The agent API address of `node`.
async fn agent_of(
    global: &GlobalArgs,
    node: &str,
) -> anyhow::Result<AgentClient<tonic::transport::Channel>> {
    let addrs = addresses(global);
    let nodes = call(&addrs, |mut c| async move {
        c.list_nodes(ListNodesRequest::default()).await
    })
    .await?;
    let address = nodes
        .nodes
        .iter()
        .filter_map(|i| i.node.as_ref()?.description.as_ref())
        .find(|d| d.name == node)
        .map(|d| d.address.clone())
        .ok_or_else(|| anyhow!("node {node} is not registered"))?;
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .with_context(|| format!("node {node} registered a bad address {address:?}"))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot reach the agent of node {node} at {address}"))?;
    Ok(AgentClient::new(channel))
}

fn is_local(global: &GlobalArgs, name: &str) -> bool {
    super::runtime::open(global).is_ok_and(|rt| rt.dir(name).path().join("state.json").exists())
}

pub fn logs(global: &GlobalArgs, args: &LogsArgs) -> anyhow::Result<()> {
    if args.namespace.is_none() && is_local(global, &args.task) {
        return super::containers::logs(global, &args.task, args.follow);
    }
    let tasks = resolve(global, args.namespace.as_deref(), &args.task)?;
    let prefix = tasks.len() > 1;
    block_on(async {
        let mut streams = Vec::new();
        for task in tasks {
            let mut agent = agent_of(global, &task.node).await?;
            let request = LogsRequest {
                task_id: task.id.clone(),
                follow: args.follow,
                tail: args.tail.unwrap_or(0),
            };
            let stream = agent
                .logs(request)
                .await
                .map_err(|s| anyhow!("{}: {}", task.id, s.message()))?
                .into_inner();
            streams.push((task.id, stream));
        }
        let mut handles = Vec::new();
        for (id, mut stream) in streams {
            handles.push(tokio::spawn(async move {
                while let Some(chunk) = stream.message().await? {
                    let text = String::from_utf8_lossy(&chunk.data);
                    let text = if prefix {
                        text.lines().map(|l| format!("{id} | {l}\n")).collect()
                    } else {
                        text.into_owned()
                    };
                    if chunk.stream() == log_chunk::Stream::Stderr {
                        let _ = std::io::stderr().write_all(text.as_bytes());
                    } else {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(text.as_bytes());
                        let _ = out.flush();
                    }
                }
                Ok::<(), tonic::Status>(())
            }));
        }
        for handle in handles {
            match handle.await {
                Ok(Ok(())) => {}
                Ok(Err(status)) => bail!("{}", status.message()),
                Err(err) => bail!("log stream failed: {err}"),
            }
        }
        Ok(())
    })
}

pub fn exec(global: &GlobalArgs, args: &ExecArgs) -> anyhow::Result<()> {
    if is_local(global, &args.task) {
        return super::containers::exec(global, &args.task, &args.command, &args.env);
    }
    let tasks = resolve(global, None, &args.task)?;
    let Some(task) = tasks.iter().find(|t| {
        t.status
            .as_ref()
            .is_some_and(|s| s.state() == TaskState::Running)
    }) else {
        bail!("no running task of {:?} to run the command in", args.task);
    };
    let code = block_on(async {
        let mut agent = agent_of(global, &task.node).await?;
        let mut stream = agent
            .exec(ExecRequest {
                task_id: task.id.clone(),
                command: args.command.clone(),
                env: args.env.clone(),
                timeout_seconds: 0,
            })
            .await
            .map_err(|s| anyhow!("{}", s.message()))?
            .into_inner();
        while let Some(out) = stream
            .message()
            .await
            .map_err(|s| anyhow!("{}", s.message()))?
        {
            let _ = std::io::stdout().write_all(&out.stdout);
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().write_all(&out.stderr);
            if out.exited {
                return Ok(out.exit_code);
            }
        }
        bail!("the agent ended the exec stream without an exit code")
    })?;
    std::process::exit(code)
}
