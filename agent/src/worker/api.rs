//! The agent's own API (agent.proto): a task's logs and exec in its container, for the CLI
//! (through the address the node registered). Only task containers are served: anything else
//! on the node is NOT_FOUND.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tug_api::v1::agent_server::Agent;
use tug_api::v1::log_chunk::Stream as ChunkStream;
use tug_api::v1::{ExecOutput, ExecRequest, LogChunk, LogsRequest};

use super::ctx::blocking;
use super::exec::{self, Stream};
use super::task_config::TASK_ANNOTATION;
use crate::runtime::container::Runtime;
use crate::runtime::logs::LogLine;
use crate::runtime::state::{RuntimeOptions, Status as RunStatus, read_json};

/// How often a followed log is looked at for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct AgentApi {
    runtime: Runtime,
}

impl AgentApi {
    pub fn new(runtime: Runtime) -> AgentApi {
        AgentApi { runtime }
    }

    /// NOT_FOUND unless `id` is a task container of this node.
    async fn task_container(&self, id: &str) -> Result<(), Status> {
        let (rt, id2) = (self.runtime.clone(), id.to_string());
        let is_task = blocking(move || {
            let spec: Option<oci_spec::runtime::Spec> = rt
                .state(&id2)
                .ok()
                .and_then(|_| read_json(&rt.dir(&id2).config()).ok());
            spec.and_then(|s| s.annotations().clone())
                .is_some_and(|a| a.get(TASK_ANNOTATION) == Some(&id2))
        })
        .await
        .map_err(Status::internal)?;
        if is_task {
            Ok(())
        } else {
            Err(Status::not_found(format!("no task {id} on this node")))
        }
    }
}

fn chunk(line: LogLine) -> LogChunk {
    LogChunk {
        stream: if line.stream == "stderr" {
            ChunkStream::Stderr
        } else {
            ChunkStream::Stdout
        }
        .into(),
        data: line.log.into_bytes(),
        time: line.time,
    }
}

/// Where a follower continues in the current log file.
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    inode: u64,
    offset: u64,
}

fn parse(bytes: &[u8]) -> Vec<LogLine> {
    bytes
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect()
}

/// Every stored line (rotated files oldest first, then the current file) and where the
/// current file ends.
fn read_stored(log: &Path, max_files: u32) -> std::io::Result<(Vec<LogLine>, Cursor)> {
    let mut lines = Vec::new();
    for n in (1..max_files.max(1)).rev() {
        let p = PathBuf::from(format!("{}.{n}", log.display()));
        if let Ok(raw) = fs::read(&p) {
            lines.extend(parse(&raw));
        }
    }
    let mut cursor = Cursor::default();
    if let Ok(mut f) = fs::File::open(log) {
        let mut raw = Vec::new();
        f.read_to_end(&mut raw)?;
        // Only whole lines: a partly written one is read again by the follower.
        let whole = raw.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        lines.extend(parse(&raw[..whole]));
        cursor = Cursor {
            inode: f.metadata()?.ino(),
            offset: whole as u64,
        };
    }
    Ok((lines, cursor))
}

/// Whole lines added to the current file since `cursor` (from the start after a rotation).
fn read_new(log: &Path, cursor: &mut Cursor) -> Vec<LogLine> {
    let Ok(mut f) = fs::File::open(log) else {
        return Vec::new();
    };
    let Ok(meta) = f.metadata() else {
        return Vec::new();
    };
    if meta.ino() != cursor.inode || meta.len() < cursor.offset {
        *cursor = Cursor {
            inode: meta.ino(),
            offset: 0,
        };
    }
    let mut raw = Vec::new();
    if f.seek(SeekFrom::Start(cursor.offset)).is_err() || f.read_to_end(&mut raw).is_err() {
        return Vec::new();
    }
    let whole = raw.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    cursor.offset += whole as u64;
    parse(&raw[..whole])
}

async fn send_lines(tx: &mpsc::Sender<Result<LogChunk, Status>>, lines: Vec<LogLine>) -> bool {
    for l in lines {
        if tx.send(Ok(chunk(l))).await.is_err() {
            return false;
        }
    }
    true
}

#[tonic::async_trait]
impl Agent for AgentApi {
    type LogsStream = ReceiverStream<Result<LogChunk, Status>>;
    type ExecStream = ReceiverStream<Result<ExecOutput, Status>>;

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = request.into_inner();
        self.task_container(&req.task_id).await?;
        let rt = self.runtime.clone();
        let dir = rt.dir(&req.task_id);
        let log = dir.log();
        let max_files = read_json::<RuntimeOptions>(&dir.runtime())
            .map(|o| o.log_max_files)
            .unwrap_or(3)
            .max(2);
        let path = log.clone();
        let (mut lines, mut cursor) = blocking(move || read_stored(&path, max_files))
            .await
            .map_err(Status::internal)?
            .map_err(|e| Status::internal(format!("read the log: {e}")))?;
        if req.tail > 0 {
            let keep = req.tail as usize;
            if lines.len() > keep {
                lines.drain(..lines.len() - keep);
            }
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            if !send_lines(&tx, lines).await || !req.follow {
                return;
            }
            loop {
                // Looked at before reading, so the last lines of a stopped container are sent.
                let (rt2, id, path) = (rt.clone(), req.task_id.clone(), log.clone());
                let looked = blocking(move || {
                    let stopped = rt2
                        .state(&id)
                        .map(|s| s.status == RunStatus::Stopped)
                        .unwrap_or(true);
                    let new = read_new(&path, &mut cursor);
                    (stopped, new, cursor)
                })
                .await;
                let Ok((stopped, new, moved)) = looked else {
                    return;
                };
                cursor = moved;
                if !send_lines(&tx, new).await || stopped {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(FOLLOW_EVERY) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn exec(
        &self,
        request: Request<ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let req = request.into_inner();
        self.task_container(&req.task_id).await?;
        if req.command.is_empty() {
            return Err(Status::invalid_argument("exec needs a command"));
        }
        let mut env = Vec::new();
        for e in &req.env {
            let Some((k, v)) = e.split_once('=') else {
                return Err(Status::invalid_argument(format!(
                    "invalid environment entry {e:?}: expected NAME=VALUE"
                )));
            };
            env.push((k.to_string(), v.to_string()));
        }
        let state = self
            .runtime
            .state(&req.task_id)
            .map_err(|e| Status::not_found(e.to_string()))?;
        if state.status != RunStatus::Running {
            return Err(Status::failed_precondition(format!(
                "task {} is not running",
                req.task_id
            )));
        }
        let timeout =
            (req.timeout_seconds > 0).then(|| Duration::from_secs(req.timeout_seconds.into()));
        let (tx, rx) = mpsc::channel(64);
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let rt = self.runtime.clone();
        tokio::spawn(async move {
            let run = exec::run(rt, req.task_id, req.command, env, timeout, Some(out_tx));
            tokio::pin!(run);
            let result = loop {
                tokio::select! {
                    r = &mut run => break r,
                    Some((stream, data)) = out_rx.recv() => {
                        let _ = tx.send(Ok(output(stream, data))).await;
                    }
                }
            };
            while let Ok((stream, data)) = out_rx.try_recv() {
                let _ = tx.send(Ok(output(stream, data))).await;
            }
            let last = match result {
                Ok(code) => Ok(ExecOutput {
                    exited: true,
                    exit_code: code,
                    ..Default::default()
                }),
                Err(e) => Err(Status::internal(e.to_string())),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn output(stream: Stream, data: Vec<u8>) -> ExecOutput {
    match stream {
        Stream::Stdout => ExecOutput {
            stdout: data,
            ..Default::default()
        },
        Stream::Stderr => ExecOutput {
            stderr: data,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_lines_then_only_new_whole_lines() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("container.log");
        let line =
            |s: &str| format!("{{\"time\":\"t\",\"stream\":\"stdout\",\"log\":\"{s}\\n\"}}\n");
        fs::write(dir.path().join("container.log.1"), line("old"))?;
        fs::write(&log, format!("{}{}", line("a"), "{\"partial"))?;
        let (lines, mut cursor) = read_stored(&log, 3)?;
        assert_eq!(
            lines.iter().map(|l| l.log.as_str()).collect::<Vec<_>>(),
            ["old\n", "a\n"]
        );
        fs::write(&log, format!("{}{}", line("a"), line("b")))?;
        let new = read_new(&log, &mut cursor);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].log, "b\n");
        assert!(read_new(&log, &mut cursor).is_empty());
        Ok(())
    }
}
