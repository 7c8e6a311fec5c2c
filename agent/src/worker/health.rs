//! Health checks of a running task (its spec's `health_check`): an exec probe runs in the
//! container; http and tcp probes connect to 127.0.0.1:port inside the container's network
//! namespace, from a short-lived std thread that joins it (setns affects only the calling
//! thread, which is why it is never a pooled one). `retries` consecutive failures make the
//! task UNHEALTHY; one success makes it HEALTHY.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use tokio::sync::{mpsc, oneshot};
use tug_api::v1::health_check::Probe as ApiProbe;
use tug_api::v1::{HealthCheck, TaskHealth};

use crate::runtime::container::Runtime;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    Exec(Vec<String>),
    Http { path: String, port: u16 },
    Tcp { port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
}

impl Check {
    /// The check of a spec, with defaults for unset numbers (10 s, 5 s, 3); `None` when the
    /// spec has no probe.
    pub(crate) fn from_spec(hc: Option<&HealthCheck>) -> Option<Check> {
        let hc = hc?;
        let port = |p: u32| u16::try_from(p).unwrap_or(0);
        let probe = match hc.probe.as_ref()? {
            ApiProbe::Exec(e) if !e.command.is_empty() => Probe::Exec(e.command.clone()),
            ApiProbe::Exec(_) => return None,
            ApiProbe::Http(h) => Probe::Http {
                path: if h.path.starts_with('/') {
                    h.path.clone()
                } else {
                    format!("/{}", h.path)
                },
                port: port(h.port),
            },
            ApiProbe::Tcp(t) => Probe::Tcp { port: port(t.port) },
        };
        let ms = |v: u64, default: u64| Duration::from_millis(if v == 0 { default } else { v });
        Some(Check {
            probe,
            interval: ms(hc.interval_ms, 10_000),
            timeout: ms(hc.timeout_ms, 5_000),
            retries: if hc.retries == 0 { 3 } else { hc.retries },
        })
    }
}

/// The health state machine: which probe results change the reported health.
#[derive(Debug, Clone)]
pub(crate) struct HealthTracker {
    retries: u32,
    failures: u32,
    current: TaskHealth,
}

impl HealthTracker {
    pub(crate) fn new(retries: u32) -> HealthTracker {
        HealthTracker {
            retries: retries.max(1),
            failures: 0,
            current: TaskHealth::Starting,
        }
    }

    /// Record one probe result; returns the new health when it changed.
    pub(crate) fn observe(&mut self, ok: bool) -> Option<TaskHealth> {
        let next = if ok {
            self.failures = 0;
            TaskHealth::Healthy
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.retries {
                TaskHealth::Unhealthy
            } else {
                self.current
            }
        };
        (next != self.current).then(|| {
            self.current = next;
            next
        })
    }
}

/// Probe the container (host pid `pid`) forever, sending each health change (the first is
/// STARTING). Ends when the receiver goes away.
pub(crate) async fn watch(
    rt: Runtime,
    id: String,
    pid: i32,
    check: Check,
    tx: mpsc::Sender<TaskHealth>,
) {
    let mut tracker = HealthTracker::new(check.retries);
    if tx.send(TaskHealth::Starting).await.is_err() {
        return;
    }
    loop {
        tokio::time::sleep(check.interval).await;
        let ok = probe_once(&rt, &id, pid, &check).await;
        if let Some(h) = tracker.observe(ok) {
            tracing::info!(task = %id, health = ?h, "health changed");
            if tx.send(h).await.is_err() {
                return;
            }
        }
    }
}

async fn probe_once(rt: &Runtime, id: &str, pid: i32, check: &Check) -> bool {
    match &check.probe {
        Probe::Exec(command) => matches!(
            super::exec::run(
                rt.clone(),
                id.to_string(),
                command.clone(),
                Vec::new(),
                Some(check.timeout),
                None,
            )
            .await,
            Ok(0)
        ),
        Probe::Http { path, port } => {
            let (path, port, timeout) = (path.clone(), *port, check.timeout);
            in_netns(pid, timeout, move || http_get(port, &path, timeout)).await
        }
        Probe::Tcp { port } => {
            let (port, timeout) = (*port, check.timeout);
            in_netns(pid, timeout, move || {
                TcpStream::connect_timeout(&loopback(port), timeout).is_ok()
            })
            .await
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `f` on a new thread inside `pid`'s network namespace; false if that fails or takes longer
/// than `timeout` (plus a little).
async fn in_netns(pid: i32, timeout: Duration, f: impl FnOnce() -> bool + Send + 'static) -> bool {
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("tug-probe".into())
        .spawn(move || {
            let joined = std::fs::File::open(format!("/proc/{pid}/ns/net"))
                .ok()
                .is_some_and(|ns| setns(ns, CloneFlags::CLONE_NEWNET).is_ok());
            let _ = tx.send(joined && f());
        });
    if spawned.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(timeout + Duration::from_secs(1), rx).await,
        Ok(Ok(true))
    )
}

/// A 2xx or 3xx answer to `GET path`.
fn http_get(port: u16, path: &str, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&loopback(port), timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: tug-health\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    // "HTTP/1.x NNN"
    let status = std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    matches!(status, Some(200..=399))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tug_api::v1::health_check::Tcp;

    #[test]
    fn retries_consecutive_failures_make_it_unhealthy() {
        let mut t = HealthTracker::new(3);
        assert_eq!(t.observe(false), None, "still starting");
        assert_eq!(t.observe(true), Some(TaskHealth::Healthy));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None, "a success resets the count");
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(TaskHealth::Unhealthy));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), Some(TaskHealth::Healthy));
    }

    #[test]
    fn checks_get_defaults() {
        assert_eq!(Check::from_spec(None), None);
        let hc = HealthCheck {
            probe: Some(ApiProbe::Tcp(Tcp { port: 8080 })),
            interval_ms: 500,
            ..Default::default()
        };
        assert_eq!(
            Check::from_spec(Some(&hc)),
            Some(Check {
                probe: Probe::Tcp { port: 8080 },
                interval: Duration::from_millis(500),
                timeout: Duration::from_secs(5),
                retries: 3,
            })
        );
    }

    #[tokio::test]
    async fn http_and_tcp_probes_see_a_server_in_this_namespace() {
        // Our own pid: its network namespace is this one, so a local listener is reachable.
        let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
            return;
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        std::thread::spawn(move || {
            for s in listener.incoming().take(1).flatten() {
                let mut s = s;
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.0 204 No Content\r\n\r\n");
            }
        });
        let pid = std::process::id() as i32;
        let t = Duration::from_secs(2);
        assert!(in_netns(pid, t, move || http_get(port, "/", t)).await);
        assert!(
            !in_netns(pid, t, move || TcpStream::connect_timeout(&loopback(1), t)
                .is_ok())
            .await
        );
    }
}
