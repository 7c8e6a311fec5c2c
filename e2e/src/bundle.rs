//! OCI bundles from the test images (`umoci unpack`), for runtime tests and benchmarks that run
//! the same bundle under tug, runc and crun.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext, Result};
use crate::exec::{self, require};
use crate::images::TestImages;

#[derive(Debug)]
pub struct Bundle {
    dir: tempfile::TempDir,
}

impl Bundle {
    /// The busybox test image unpacked by umoci, running `args` (no terminal), in cgroup
    /// `cgroup_path` (absolute, e.g. `/tug-bench/runc`: runc nests under its caller otherwise;
    /// empty: the runtime picks one per container).
    pub fn busybox(args: &[&str], cgroup_path: &str) -> Result<Bundle> {
        let images = TestImages::get()?;
        let dir = tempfile::Builder::new()
            .prefix("tug-e2e-bundle-")
            .tempdir()
            .ctx(|| "create bundle dir".into())?;
        let path = dir.path().join("b");
        exec::run(
            Command::new(require("umoci")?)
                .args([
                    "unpack",
                    "--image",
                    &format!("{}:busybox", images.layout().display()),
                ])
                .arg(&path),
        )?;
        let config_path = path.join("config.json");
        let raw = std::fs::read(&config_path).ctx(|| format!("read {}", config_path.display()))?;
        let mut config: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|source| Error::Json {
                what: "bundle config".into(),
                source,
            })?;
        config["process"]["args"] = serde_json::json!(args);
        config["process"]["terminal"] = serde_json::json!(false);
        match config["linux"].as_object_mut() {
            Some(linux) if cgroup_path.is_empty() => {
                linux.remove("cgroupsPath");
            }
            Some(linux) => {
                linux.insert("cgroupsPath".into(), serde_json::json!(cgroup_path));
            }
            None => {
                return Err(Error::Images(
                    "umoci's config.json has no linux section".into(),
                ));
            }
        }
        let out = serde_json::to_vec_pretty(&config).map_err(|source| Error::Json {
            what: "bundle config".into(),
            source,
        })?;
        std::fs::write(&config_path, out).ctx(|| format!("write {}", config_path.display()))?;
        Ok(Bundle { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("b")
    }
}

/// Whether `path` is inside a mount namespace where crun accepts this host (no cgroup2 mount
/// with controllers beside the v1 ones).
pub fn crun_usable_here() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| !m.lines().any(|l| l.contains(" /sys/fs/cgroup/unified ")))
        .unwrap_or(false)
}

/// For a process that will run crun on this hybrid host: a private mount namespace with
/// /sys/fs/cgroup/unified unmounted (nothing outside it changes). Call before any thread exists.
pub fn enter_private_mount_namespace_for_crun() -> Result<()> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .ctx(|| "unshare the mount namespace".into())?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| "make / private".into())?;
    if Path::new("/sys/fs/cgroup/unified").exists() {
        let _ = umount2("/sys/fs/cgroup/unified", MntFlags::MNT_DETACH);
    }
    Ok(())
}
