//! Test namespaces: `tnp-<pid>-<seq>-<role>` under `/run/netns`, deleted on drop (links inside go
//! with them), and swept up later if the test process that made them was killed. Tests only ever
//! touch links, addresses and routes inside these namespaces.

#![allow(dead_code)]

pub mod cluster;
pub mod http;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const PREFIX: &str = "tnp-";
static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by this test, removed when dropped.
#[derive(Debug)]
pub struct TestNs {
    name: String,
}

impl TestNs {
    pub fn new(role: &str) -> TestResult<TestNs> {
        sweep_stale();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{seq}-{role}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(TestNs { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME args...`, checked; returns stdout.
    pub fn ip(&self, args: &[&str]) -> TestResult<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Run a program inside the namespace; returns whether it succeeded.
    pub fn succeeds(&self, program: &[&str]) -> TestResult<bool> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(program)
            .output()?;
        Ok(out.status.success())
    }

    /// Run a program inside the namespace, checked; returns stdout.
    pub fn exec(&self, program: &[&str]) -> TestResult<String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(program))
    }

    /// One ping (busybox's: there is no `ping` binary on the test machines).
    pub fn pings(&self, addr: impl std::fmt::Display) -> TestResult<bool> {
        self.succeeds(&["busybox", "ping", "-c", "1", "-W", "2", &addr.to_string()])
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(cmd: &mut Command) -> TestResult<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Remove namespaces of test processes that died before their guards ran.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// Threads of this process right now.
pub fn thread_count() -> TestResult<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

pub fn subnet(text: &str) -> TestResult<tug_netplugin::Subnet> {
    Ok(text.parse()?)
}
