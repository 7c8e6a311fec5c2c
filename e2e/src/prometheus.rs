//! Debian's Prometheus as a test peer: a real server started on a test host, configured to find
//! its targets through tug's HTTP service discovery, queried with PromQL over its HTTP API; and
//! `promtool check metrics` on an exposition. The server is stopped by PID when dropped and its
//! config and storage live in a temporary directory.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::exec::require;
use crate::http;
use crate::net::Host;
use crate::netns::Netns;
use crate::process::{self, ChildGuard};

/// Port the server listens on, on its host's address.
pub const PORT: u16 = 9090;

/// A running Prometheus server on a test host.
#[derive(Debug)]
pub struct Prometheus {
    // The process first: it stops before its directory goes.
    _process: ChildGuard,
    dir: tempfile::TempDir,
    ns: Arc<Netns>,
    addr: SocketAddr,
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET url` from inside `ns`; the body of a 200 as text.
pub fn get_text(ns: &Netns, url: &str) -> Result<String> {
    let response = http::get(url, &[], Some(ns))?;
    if response.status != 200 {
        return Err(Error::Http {
            url: url.to_string(),
            message: format!("status {}", response.status),
        });
    }
    Ok(String::from_utf8_lossy(&response.body).into_owned())
}

impl Prometheus {
    /// Start a server on `host` with one job (`tug`) whose targets come from each of
    /// `sd_urls` (`http_sd_configs`), scraping every `interval`; waits until it is ready.
    pub fn start(host: &Host, sd_urls: &[String], interval: &str) -> Result<Prometheus> {
        require("prometheus")?;
        let dir = tempfile::Builder::new()
            .prefix("tug-prometheus-")
            .tempdir()
            .ctx(|| "create the prometheus dir".into())?;
        let sd: String = sd_urls
            .iter()
            .map(|url| format!("      - url: {url}\n        refresh_interval: 2s\n"))
            .collect();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  \
                 evaluation_interval: {interval}\nscrape_configs:\n  - job_name: tug\n    \
                 http_sd_configs:\n{sd}"
            ),
        )
        .ctx(|| format!("write {}", config.display()))?;
        let addr = SocketAddr::from((host.addr(), PORT));
        let log_path = dir.path().join("prometheus.log");
        let log =
            std::fs::File::create(&log_path).ctx(|| format!("create {}", log_path.display()))?;
        let err_log = log.try_clone().ctx(|| "clone the log file".into())?;
        let mut cmd = host.command("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        let mut process = process::spawn(&mut cmd)?;
        let ns = host.netns().clone();
        let ready = format!("http://{addr}/-/ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        while get_text(&ns, &ready).is_err() {
            if let Ok(Some(status)) = process.try_wait() {
                return Err(Error::Died {
                    what: "prometheus".into(),
                    status: status.to_string(),
                    log: std::fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "prometheus to be ready".into(),
                    seconds: 30.0,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Prometheus {
            _process: process,
            dir,
            ns,
            addr,
        })
    }

    /// The series of an instant query: (labels, value).
    pub fn query(&self, promql: &str) -> Result<Vec<(Value, f64)>> {
        let url = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            percent_encode(promql)
        );
        let body = get_text(&self.ns, &url)?;
        let v: Value = serde_json::from_str(&body).map_err(|source| Error::Json {
            what: format!("the answer to {promql}"),
            source,
        })?;
        if v["status"] != "success" {
            return Err(Error::Http { url, message: body });
        }
        Ok(v["data"]["result"]
            .as_array()
            .map(|series| {
                series
                    .iter()
                    .map(|s| {
                        let value = s["value"][1]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(f64::NAN);
                        (s["metric"].clone(), value)
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The server's own log (for a failed test).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// `promtool check metrics` on an exposition (it reads it on stdin); its complaints on failure.
pub fn promtool_check(text: &str) -> Result<()> {
    let promtool = require("promtool")?;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| "run promtool".into())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .ctx(|| "write to promtool".into())?;
    }
    let out = child
        .wait_with_output()
        .ctx(|| "wait for promtool".into())?;
    if !out.status.success() {
        return Err(Error::Command {
            command: "promtool check metrics".into(),
            status: out.status.to_string(),
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(percent_encode("up{job=\"tug\"}"), "up%7Bjob%3D%22tug%22%7D");
    }
}
