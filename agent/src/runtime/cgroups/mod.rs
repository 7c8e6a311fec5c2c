//! Container cgroups (DESIGN.md, "Agent"): one [`Cgroup`] per container, on cgroup v2 (production
//! hosts) or v1 (this team's machines), detected once per agent with [`CgroupDriver::detect`].
//!
//! A container's cgroup lives at the same relative path (for instance `tug/<container id>`) in
//! every hierarchy the driver uses. [`Cgroup::create`] makes it and applies [`Resources`], or
//! leaves nothing behind; [`Cgroup::open`] re-adopts it after an agent restart. The drivers only
//! ever look below the roots they are given, so tests point them at a fake tree in a tempdir.

pub mod v1;
pub mod v2;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// Where the kernel's cgroup filesystems are mounted.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";
/// Where the v1 hierarchies' mount points are read from.
pub const DEFAULT_MOUNTINFO: &str = "/proc/self/mountinfo";

/// The smallest memory limit accepted: one page.
pub const MIN_MEMORY_LIMIT: u64 = 4096;
/// The kernel's bounds for a CFS period and the smallest quota, in microseconds.
pub const CPU_PERIOD_RANGE: std::ops::RangeInclusive<u64> = 1_000..=1_000_000;
pub const MIN_CPU_QUOTA: i64 = 1_000;
/// The period written when no quota is set (the kernel's default).
pub const DEFAULT_CPU_PERIOD: u64 = 100_000;
/// cgroup v2's `cpu.weight` scale; v1 shares are converted from it.
pub const CPU_WEIGHT_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000;
pub const DEFAULT_CPU_WEIGHT: u64 = 100;

/// A container's limits. `None` means unlimited (or the kernel's default weight); applying
/// resources writes every limit, so an update from `Some` to `None` lifts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// Bytes of memory (anonymous + page cache), at least [`MIN_MEMORY_LIMIT`].
    pub memory_limit: Option<u64>,
    /// No swap beyond the memory limit (v1: memsw = limit; v2: memory.swap.max = 0). Default true.
    pub memory_swap_off: bool,
    /// CFS bandwidth: (quota us, period us). A quota of -1 means unlimited.
    pub cpu_quota: Option<(i64, u64)>,
    /// Relative CPU weight on the v2 scale 1..=10000 (default 100); v1 gets shares from it.
    pub cpu_weight: Option<u64>,
    /// Most tasks (processes and threads) at once; -1 means unlimited.
    pub pids_limit: Option<i64>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            memory_limit: None,
            memory_swap_off: true,
            cpu_quota: None,
            cpu_weight: None,
            pids_limit: None,
        }
    }
}

impl Resources {
    /// Reject limits the kernel would refuse or that make no sense, before anything is touched.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if let Some(limit) = self.memory_limit
            && !(MIN_MEMORY_LIMIT..=i64::MAX as u64).contains(&limit)
        {
            return Err(InvalidInput::MemoryLimit(limit));
        }
        if let Some((quota, period)) = self.cpu_quota {
            if !CPU_PERIOD_RANGE.contains(&period) {
                return Err(InvalidInput::CpuPeriod(period));
            }
            if quota != -1 && quota < MIN_CPU_QUOTA {
                return Err(InvalidInput::CpuQuota(quota));
            }
        }
        if let Some(weight) = self.cpu_weight
            && !CPU_WEIGHT_RANGE.contains(&weight)
        {
            return Err(InvalidInput::CpuWeight(weight));
        }
        if let Some(pids) = self.pids_limit
            && pids != -1
            && pids < 1
        {
            return Err(InvalidInput::PidsLimit(pids));
        }
        Ok(())
    }
}

/// cgroup v1 `cpu.shares` for a v2 `cpu.weight`, as runc converts: 1 -> 2, 100 -> 2597,
/// 10000 -> 262144.
pub fn weight_to_shares(weight: u64) -> u64 {
    2 + (weight.saturating_sub(1) * 262_142) / 9_999
}

/// A snapshot of a container's usage, in the units cAdvisor reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub cpu_usage_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub cpu_throttled_periods: u64,
    pub cpu_throttled_ns: u64,
    pub memory_usage: u64,
    /// `None` when unlimited.
    pub memory_limit: Option<u64>,
    /// Highest usage seen (v1: memory.max_usage_in_bytes; v2: memory.peak, kernel 5.19+).
    pub memory_max_usage: Option<u64>,
    /// Usage minus inactive page cache (saturating), cAdvisor's working set.
    pub memory_working_set: u64,
    pub memory_rss: u64,
    pub memory_cache: u64,
    /// Processes the OOM killer killed in this cgroup.
    pub oom_kills: u64,
    pub pids_current: u64,
    /// `None` when unlimited.
    pub pids_limit: Option<u64>,
}

/// Input rejected before anything is created, each a sentence naming the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error(
        "memory limit {0} bytes is outside {MIN_MEMORY_LIMIT}..={max} bytes",
        max = i64::MAX
    )]
    MemoryLimit(u64),
    #[error(
        "cpu period {0} us is outside {lo}..={hi} us",
        lo = CPU_PERIOD_RANGE.start(),
        hi = CPU_PERIOD_RANGE.end()
    )]
    CpuPeriod(u64),
    #[error("cpu quota {0} us must be -1 (unlimited) or at least {MIN_CPU_QUOTA} us")]
    CpuQuota(i64),
    #[error(
        "cpu weight {0} is outside {lo}..={hi}",
        lo = CPU_WEIGHT_RANGE.start(),
        hi = CPU_WEIGHT_RANGE.end()
    )]
    CpuWeight(u64),
    #[error("pids limit {0} must be -1 (unlimited) or at least 1")]
    PidsLimit(i64),
    #[error("cgroup path {path:?} is invalid: {reason}")]
    Path { path: String, reason: &'static str },
}

/// Everything the cgroup layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(transparent)]
    V1(#[from] v1::Error),
    #[error(transparent)]
    V2(#[from] v2::Error),
    #[error("detect cgroups: {what} {}: {source}", path.display())]
    Detect {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no usable cgroup hierarchy: {0}")]
    Unusable(String),
}

impl CgroupError {
    /// The caller's input was wrong (and nothing was created).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            CgroupError::V1(v1::Error::Invalid(_)) | CgroupError::V2(v2::Error::Invalid(_))
        )
    }
}

pub type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// Which cgroup version the host runs, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupDriver {
    /// One v1 hierarchy per controller (or group of co-mounted controllers).
    V1 { mounts: v1::Mounts },
    /// The unified hierarchy, rooted at `root` (normally `/sys/fs/cgroup`).
    V2 { root: PathBuf },
}

impl CgroupDriver {
    /// Detect the host's driver from [`DEFAULT_ROOT`] and [`DEFAULT_MOUNTINFO`].
    pub fn detect() -> Result<Self> {
        Self::detect_at(Path::new(DEFAULT_ROOT), Path::new(DEFAULT_MOUNTINFO))
    }

    /// v2 when `root` is a cgroup2 mount offering the memory, cpu and pids controllers; otherwise
    /// v1 with the controllers' mount points from `mountinfo`. A hybrid host (v1 controllers plus
    /// a cgroup2 mount at `root/unified`) is v1.
    pub fn detect_at(root: &Path, mountinfo: &Path) -> Result<Self> {
        let is_cgroup2 = nix::sys::statfs::statfs(root)
            .map(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
            .map_err(|errno| CgroupError::Detect {
                what: "statfs",
                path: root.to_path_buf(),
                source: errno.into(),
            })?;
        Self::decide(root, is_cgroup2, mountinfo)
    }

    /// The decision, given whether `root` is a cgroup2 mount (split out for tests).
    pub(crate) fn decide(root: &Path, is_cgroup2: bool, mountinfo: &Path) -> Result<Self> {
        let mut why_not_v2 = format!("{} is not a cgroup2 mount", root.display());
        if is_cgroup2 {
            let missing = v2::missing_controllers(root).map_err(|source| CgroupError::Detect {
                what: "read",
                path: root.join("cgroup.controllers"),
                source,
            })?;
            if missing.is_empty() {
                return Ok(CgroupDriver::V2 {
                    root: root.to_path_buf(),
                });
            }
            why_not_v2 = format!(
                "{}/cgroup.controllers lacks {}",
                root.display(),
                missing.join(", ")
            );
        }
        let text = std::fs::read_to_string(mountinfo).map_err(|source| CgroupError::Detect {
            what: "read",
            path: mountinfo.to_path_buf(),
            source,
        })?;
        let mounts = v1::Mounts::from_mountinfo(&text);
        let missing = mounts.missing();
        if missing.is_empty() {
            return Ok(CgroupDriver::V1 { mounts });
        }
        Err(CgroupError::Unusable(format!(
            "{why_not_v2}, and {} has no cgroup v1 mount for {}",
            mountinfo.display(),
            missing.join(", ")
        )))
    }

    pub fn is_v2(&self) -> bool {
        matches!(self, CgroupDriver::V2 { .. })
    }
}

/// One container's cgroup, on whichever driver the host uses.
#[derive(Debug, Clone)]
pub enum Cgroup {
    V1(v1::Cgroup),
    V2(v2::Cgroup),
}

impl Cgroup {
    /// Create the cgroup at `path` (relative to every hierarchy's root, e.g. `tug/<id>`) and apply
    /// `resources`. Invalid input is rejected before anything is made; on any later failure the
    /// directories this call made are removed again. Directories that already exist are reused.
    pub fn create(driver: &CgroupDriver, path: &str, resources: &Resources) -> Result<Self> {
        Ok(match driver {
            CgroupDriver::V1 { mounts } => Cgroup::V1(v1::Cgroup::create(mounts, path, resources)?),
            CgroupDriver::V2 { root } => Cgroup::V2(v2::Cgroup::create(root, path, resources)?),
        })
    }

    /// Re-adopt an existing cgroup (after an agent restart).
    pub fn open(driver: &CgroupDriver, path: &str) -> Result<Self> {
        Ok(match driver {
            CgroupDriver::V1 { mounts } => Cgroup::V1(v1::Cgroup::open(mounts, path)?),
            CgroupDriver::V2 { root } => Cgroup::V2(v2::Cgroup::open(root, path)?),
        })
    }

    /// The path relative to the hierarchies' roots, as given to `create`/`open`.
    pub fn path(&self) -> &str {
        match self {
            Cgroup::V1(cg) => cg.path(),
            Cgroup::V2(cg) => cg.path(),
        }
    }

    /// Move process `pid` (its whole thread group) into the cgroup, in every hierarchy.
    pub fn add_process(&self, pid: i32) -> Result<()> {
        match self {
            Cgroup::V1(cg) => cg.add_process(pid)?,
            Cgroup::V2(cg) => cg.add_process(pid)?,
        }
        Ok(())
    }

    /// Move the calling process, which must have a single thread, into the cgroup. On v1 this
    /// avoids the grace-period wait of [`Cgroup::add_process`] (see
    /// [`v1::join_current_thread`]); on v2 it is the same as adding the process.
    pub fn join_single_threaded(&self) -> Result<()> {
        match self {
            Cgroup::V1(cg) => cg.join_current_thread()?,
            Cgroup::V2(cg) => cg.add_process(0)?,
        }
        Ok(())
    }

    /// Every `cgroup.procs` file a process must be written to (v1: one per hierarchy; v2: one).
    pub fn procs_paths(&self) -> Vec<PathBuf> {
        match self {
            Cgroup::V1(cg) => cg.procs_paths(),
            Cgroup::V2(cg) => vec![cg.procs_path()],
        }
    }

    /// The v2 directory (for `clone3(CLONE_INTO_CGROUP)`); `None` on v1.
    pub fn v2_dir(&self) -> Option<&Path> {
        match self {
            Cgroup::V1(_) => None,
            Cgroup::V2(cg) => Some(cg.dir()),
        }
    }

    /// Apply new limits (every limit is written; `None` lifts one).
    pub fn update(&self, resources: &Resources) -> Result<()> {
        match self {
            Cgroup::V1(cg) => cg.update(resources)?,
            Cgroup::V2(cg) => cg.update(resources)?,
        }
        Ok(())
    }

    pub fn stats(&self) -> Result<Stats> {
        Ok(match self {
            Cgroup::V1(cg) => cg.stats()?,
            Cgroup::V2(cg) => cg.stats()?,
        })
    }

    /// The processes in the cgroup, sorted (empty once it is gone).
    pub fn pids(&self) -> Result<Vec<i32>> {
        Ok(match self {
            Cgroup::V1(cg) => cg.pids()?,
            Cgroup::V2(cg) => cg.pids()?,
        })
    }

    /// Send `signal` to every process in the cgroup without racing its forks (v2: `cgroup.kill`
    /// for SIGKILL; v1: under the freezer when it is mounted). Does not wait for them to exit.
    pub fn kill_all(&self, signal: Signal) -> Result<()> {
        match self {
            Cgroup::V1(cg) => cg.kill_all(signal)?,
            Cgroup::V2(cg) => cg.kill_all(signal)?,
        }
        Ok(())
    }

    /// Remove the cgroup's directory in every hierarchy, retrying briefly while its processes
    /// exit. Removing a removed cgroup succeeds. Parent directories are left alone.
    pub fn remove(&self) -> Result<()> {
        match self {
            Cgroup::V1(cg) => cg.remove()?,
            Cgroup::V2(cg) => cg.remove()?,
        }
        Ok(())
    }

    /// Whether any of the cgroup's directories still exists.
    /// Freeze every process of the cgroup (pause), or thaw them.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        match self {
            Cgroup::V1(c) => c.freeze(frozen).map_err(Into::into),
            Cgroup::V2(c) => c.freeze(frozen).map_err(Into::into),
        }
    }

    pub fn is_frozen(&self) -> bool {
        match self {
            Cgroup::V1(c) => c.is_frozen(),
            Cgroup::V2(c) => c.is_frozen(),
        }
    }

    pub fn exists(&self) -> bool {
        match self {
            Cgroup::V1(cg) => cg.exists(),
            Cgroup::V2(cg) => cg.exists(),
        }
    }
}

// ---- helpers shared by both drivers ----

/// Split a cgroup path relative to a hierarchy root into its components.
pub(crate) fn split_path(path: &str) -> Result<Vec<&str>, InvalidInput> {
    let invalid = |reason| InvalidInput::Path {
        path: path.to_string(),
        reason,
    };
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    if trimmed.is_empty() {
        return Err(invalid("it names the root cgroup"));
    }
    let parts: Vec<&str> = trimmed.split('/').collect();
    for part in &parts {
        match *part {
            "" => return Err(invalid("it has an empty component")),
            "." | ".." => return Err(invalid("it has a '.' or '..' component")),
            p if p.contains('\0') => return Err(invalid("it contains a NUL byte")),
            _ => {}
        }
    }
    Ok(parts)
}

/// Write `value` to a cgroup interface file in one write(2), as the kernel expects.
pub(crate) fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let written = file.write(value.as_bytes())?;
    if written != value.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write ({written} of {} bytes)", value.len()),
        ));
    }
    Ok(())
}

/// Create `components` below `base` one by one, recording in `created` each
/// directory this call made (parents first). Existing directories are reused.
pub(crate) fn mkdir_chain(
    base: &Path,
    components: &[&str],
    created: &mut Vec<PathBuf>,
) -> Result<PathBuf, (PathBuf, io::Error)> {
    let mut dir = base.to_path_buf();
    for part in components {
        dir.push(part);
        match std::fs::create_dir(&dir) {
            Ok(()) => created.push(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err((dir, e)),
        }
    }
    Ok(dir)
}

/// Undo `mkdir_chain`s after a failed create: remove what was made, deepest first.
pub(crate) fn rollback(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        if let Err(e) = remove_dir(dir, Duration::from_millis(200)) {
            tracing::warn!(dir = %dir.display(), cause = %e, "could not remove cgroup after a failed create");
        }
    }
}

/// How long `remove` waits for a cgroup's processes to exit.
pub(crate) const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// rmdir a cgroup, retrying on EBUSY (processes still exiting) until `timeout`. A missing
/// directory is success.
pub(crate) fn remove_dir(dir: &Path, timeout: Duration) -> io::Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy && start.elapsed() < timeout => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            // cgroupfs never answers ENOTEMPTY (its interface files go with the directory); the
            // fake trees of the unit tests are plain directories holding plain files.
            #[cfg(test)]
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                for entry in std::fs::read_dir(dir)? {
                    let entry = entry?;
                    if entry.file_type()?.is_file() {
                        std::fs::remove_file(entry.path())?;
                    }
                }
                std::fs::remove_dir(dir)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// Parse a `cgroup.procs` file; a missing file (cgroup gone) holds no processes.
pub(crate) fn read_procs(path: &Path) -> io::Result<Vec<i32>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse::<i32>()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad pid {l:?}")))
        })
        .collect()
}

/// Signal every process `read_pids` reports, again for any that appear after a round (forks
/// racing the signal), up to a few rounds. Processes that exited meanwhile are skipped.
pub(crate) fn signal_all<E>(
    mut read_pids: impl FnMut() -> Result<Vec<i32>, E>,
    signal: Signal,
    rounds: usize,
    signal_error: impl Fn(i32, Errno) -> E,
) -> Result<(), E> {
    let mut signalled = BTreeSet::new();
    for _ in 0..rounds.max(1) {
        let fresh: Vec<i32> = read_pids()?
            .into_iter()
            .filter(|pid| !signalled.contains(pid))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            match kill(Pid::from_raw(pid), signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(errno) => return Err(signal_error(pid, errno)),
            }
            signalled.insert(pid);
        }
    }
    Ok(())
}

/// The value of `key` in a flat-keyed file ("key value" per line).
pub(crate) fn keyed<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(key)).then(|| words.next()).flatten()
    })
}

/// Values at or above this read back from a limit file mean "unlimited": v1 memory limits read
/// back as LONG_MAX rounded down to a page.
pub(crate) const UNLIMITED_FLOOR: u64 = i64::MAX as u64 - (1 << 20);

/// Parse a limit file: a number, or `None` for "max" (v2), "-1" or the kernel's "unlimited".
pub(crate) fn parse_limit(text: &str) -> Result<Option<u64>, std::num::ParseIntError> {
    let text = text.trim();
    if text == "max" || text == "-1" {
        return Ok(None);
    }
    let value: u64 = text.parse()?;
    Ok((value < UNLIMITED_FLOOR).then_some(value))
}

/// The text written to a file that takes a number or "max".
pub(crate) fn number_or_max<T: std::fmt::Display>(value: Option<T>, unlimited: &str) -> String {
    value.map_or_else(|| unlimited.to_string(), |v| v.to_string())
}
