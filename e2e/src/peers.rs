//! The peers tug is measured against, started the way the test bed starts everything: own
//! config, own dirs, stopped by PID.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::exec::{self, require};
use crate::process::{self, ChildGuard};

/// A containerd daemon with its own root, state dir and socket (the CRI plugin off).
#[derive(Debug)]
pub struct Containerd {
    child: ChildGuard,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Containerd {
    pub fn start() -> Result<Containerd> {
        let program = require("containerd")?;
        let dir = tempfile::Builder::new()
            .prefix("tug-e2e-containerd-")
            .tempdir()
            .ctx(|| "create containerd dir".into())?;
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}/root\"\nstate = \"{root}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{root}/ttrpc.sock\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{root}/opt\"\n",
                root = dir.path().display(),
                sock = socket.display()
            ),
        )
        .ctx(|| "write containerd config".into())?;
        let log = fs::File::create(dir.path().join("containerd.log"))
            .ctx(|| "create containerd log".into())?;
        let log_err = log.try_clone().ctx(|| "dup log".into())?;
        let child = process::spawn(
            Command::new(program)
                .arg("--config")
                .arg(&config)
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log_err)),
        )?;
        let mut c = Containerd { child, dir, socket };
        let start = Instant::now();
        while !c.socket.exists() || !c.ctr(&["version"])?.status.success() {
            if let Some(status) = c.child.try_wait()? {
                return Err(Error::Died {
                    what: "containerd".into(),
                    status: status.to_string(),
                    log: c.log(),
                });
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(Error::Timeout {
                    what: "containerd".into(),
                    seconds: 20.0,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(c)
    }

    /// `ctr --address SOCKET args...` (namespace `tug-bench` unless given).
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        exec::output(
            Command::new(require("ctr")?)
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", "tug-bench"])
                .args(args),
        )
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Stop the daemon (by PID) and release its mounts; its files stay until it is dropped.
    pub fn stop(&mut self) {
        let _ = self.child.stop(Duration::from_secs(10));
        // Snapshot mounts left by an interrupted unpack would keep the dir busy.
        let root = self.dir.path().to_string_lossy().into_owned();
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            for mp in mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|m| m.starts_with(&root))
            {
                let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}
