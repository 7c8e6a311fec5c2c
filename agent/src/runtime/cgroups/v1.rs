//! cgroup v1: a hierarchy per controller (or per group of co-mounted controllers), each mounted
//! on its own, usually `/sys/fs/cgroup/<controller>`. A container's cgroup is a directory at the
//! same relative path in the memory, cpu, cpuacct and pids hierarchies, and in the freezer's when
//! it is mounted (for [`Cgroup::kill_all`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;

use super::{
    DEFAULT_CPU_PERIOD, InvalidInput, REMOVE_TIMEOUT, Resources, Stats, keyed, mkdir_chain,
    number_or_max, parse_limit, read_procs, remove_dir, rollback, signal_all, split_path,
    weight_to_shares, write_file,
};

/// Controllers a container's cgroup must have.
pub const REQUIRED: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];
/// Controllers used when mounted.
pub const OPTIONAL: [&str; 1] = ["freezer"];
/// Every v1 controller name the kernel knows (mount options that are not one are ignored).
const KNOWN: [&str; 14] = [
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
    "pids",
    "rdma",
];
/// The kernel's `cpu.shares` when nothing was set.
const DEFAULT_SHARES: u64 = 1024;
/// How often a signal is repeated for processes forked while it was being sent (no freezer).
const SIGNAL_ROUNDS: usize = 8;
/// How long `kill_all` waits for the freezer to reach FROZEN before signalling anyway.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(1);

const MEMORY_LIMIT: &str = "memory.limit_in_bytes";
const MEMSW_LIMIT: &str = "memory.memsw.limit_in_bytes";

/// Everything a v1 cgroup can fail with, each naming the file (and the value written).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("cgroup v1 controller(s) {0} not mounted")]
    NotMounted(String),
    #[error("cgroup {path} does not exist in any v1 hierarchy (looked for {})", dir.display())]
    NotFound { path: String, dir: PathBuf },
    #[error("create {}: {source}", path.display())]
    Mkdir { path: PathBuf, source: io::Error },
    #[error("write {value} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: cannot parse {what} from {text:?}", path.display())]
    Parse {
        path: PathBuf,
        what: &'static str,
        text: String,
    },
    #[error("remove {}: {source}", path.display())]
    Remove { path: PathBuf, source: io::Error },
    #[error("send {signal} to process {pid} of cgroup {cgroup}: {source}")]
    Signal {
        cgroup: String,
        pid: i32,
        signal: Signal,
        source: Errno,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where each v1 controller is mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts {
    points: BTreeMap<String, PathBuf>,
}

impl Mounts {
    /// The cgroup v1 mounts in a `/proc/<pid>/mountinfo` text. The first mount of a controller
    /// wins; cgroup2 and named hierarchies (`name=systemd`) are ignored.
    pub fn from_mountinfo(text: &str) -> Self {
        let mut mounts = Mounts::default();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(dash) = fields.iter().skip(6).position(|f| *f == "-").map(|i| i + 6) else {
                continue;
            };
            let (Some(mount_point), Some(&"cgroup"), Some(options)) =
                (fields.get(4), fields.get(dash + 1), fields.get(dash + 3))
            else {
                continue;
            };
            let mount_point = unescape(mount_point);
            for option in options.split(',') {
                if KNOWN.contains(&option) {
                    mounts
                        .points
                        .entry(option.to_string())
                        .or_insert_with(|| mount_point.clone());
                }
            }
        }
        mounts
    }

    /// Read the mounts from a mountinfo file.
    pub fn read(mountinfo: &Path) -> io::Result<Self> {
        Ok(Self::from_mountinfo(&std::fs::read_to_string(mountinfo)?))
    }

    /// These mounts plus `controller` at `mount_point` (for tests and odd layouts).
    pub fn with(mut self, controller: &str, mount_point: impl Into<PathBuf>) -> Self {
        self.points
            .insert(controller.to_string(), mount_point.into());
        self
    }

    pub fn get(&self, controller: &str) -> Option<&Path> {
        self.points.get(controller).map(PathBuf::as_path)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.points.iter().map(|(c, p)| (c.as_str(), p.as_path()))
    }

    /// The [`REQUIRED`] controllers that are not mounted.
    pub fn missing(&self) -> Vec<&'static str> {
        REQUIRED
            .into_iter()
            .filter(|c| !self.points.contains_key(*c))
            .collect()
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// One hierarchy the cgroup lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    /// The controllers of ours mounted there (cpu and cpuacct are often together).
    controllers: Vec<&'static str>,
    mount: PathBuf,
    /// The cgroup's directory in it.
    dir: PathBuf,
}

/// A container's cgroup on v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: String,
    hierarchies: Vec<Hierarchy>,
    /// Swap accounting is on: `memory.memsw.limit_in_bytes` exists.
    memsw: bool,
    /// USER_HZ, the unit of `cpuacct.stat`.
    clk_tck: u64,
}

impl Cgroup {
    /// Where the cgroup at `path` lives in `mounts` (nothing is touched).
    fn locate(mounts: &Mounts, path: &str) -> Result<Self> {
        let components = split_path(path)?;
        let missing = mounts.missing();
        if !missing.is_empty() {
            return Err(Error::NotMounted(missing.join(", ")));
        }
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        for controller in REQUIRED.into_iter().chain(OPTIONAL) {
            let Some(mount) = mounts.get(controller) else {
                continue;
            };
            if let Some(h) = hierarchies.iter_mut().find(|h| h.mount == mount) {
                h.controllers.push(controller);
                continue;
            }
            let mut dir = mount.to_path_buf();
            dir.extend(&components);
            hierarchies.push(Hierarchy {
                controllers: vec![controller],
                mount: mount.to_path_buf(),
                dir,
            });
        }
        let memsw = mounts
            .get("memory")
            .is_some_and(|m| m.join(MEMSW_LIMIT).exists());
        Ok(Cgroup {
            path: components.join("/"),
            hierarchies,
            memsw,
            clk_tck: clock_ticks(),
        })
    }

    /// Create the cgroup in every hierarchy and apply `resources`; on failure remove the
    /// directories made here. See [`super::Cgroup::create`].
    pub fn create(mounts: &Mounts, path: &str, resources: &Resources) -> Result<Self> {
        resources.validate()?;
        let cg = Self::locate(mounts, path)?;
        let components = split_path(path)?;
        let mut created = Vec::new();
        let result = cg
            .make_dirs(&components, &mut created)
            .and_then(|()| cg.apply(resources));
        match result {
            Ok(()) => {
                tracing::debug!(cgroup = %cg.path, ?resources, "created v1 cgroup");
                Ok(cg)
            }
            Err(e) => {
                rollback(&created);
                Err(e)
            }
        }
    }

    /// Adopt the existing cgroup at `path`: it must exist in at least one hierarchy (a
    /// half-removed cgroup can still be removed).
    pub fn open(mounts: &Mounts, path: &str) -> Result<Self> {
        let cg = Self::locate(mounts, path)?;
        if !cg.exists() {
            return Err(Error::NotFound {
                path: cg.path.clone(),
                dir: cg.dir("memory")?.to_path_buf(),
            });
        }
        Ok(cg)
    }

    fn make_dirs(&self, components: &[&str], created: &mut Vec<PathBuf>) -> Result<()> {
        for h in &self.hierarchies {
            mkdir_chain(&h.mount, components, created)
                .map_err(|(path, source)| Error::Mkdir { path, source })?;
        }
        Ok(())
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The cgroup's directory in `controller`'s hierarchy.
    pub fn dir(&self, controller: &str) -> Result<&Path> {
        self.hierarchies
            .iter()
            .find(|h| h.controllers.contains(&controller))
            .map(|h| h.dir.as_path())
            .ok_or_else(|| Error::NotMounted(controller.to_string()))
    }

    /// The cgroup's directories, one per hierarchy.
    pub fn dirs(&self) -> Vec<&Path> {
        self.hierarchies.iter().map(|h| h.dir.as_path()).collect()
    }

    /// Every hierarchy's `cgroup.procs`.
    pub fn procs_paths(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| h.dir.join("cgroup.procs"))
            .collect()
    }

    fn file(&self, controller: &str, name: &str) -> Result<PathBuf> {
        Ok(self.dir(controller)?.join(name))
    }

    fn write(&self, controller: &str, name: &str, value: &str) -> Result<()> {
        write_to(&self.file(controller, name)?, value)
    }

    fn read(&self, controller: &str, name: &str) -> Result<(PathBuf, String)> {
        let path = self.file(controller, name)?;
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            Err(source) => Err(Error::Read { path, source }),
        }
    }

    fn read_u64(&self, controller: &str, name: &str) -> Result<u64> {
        let (path, text) = self.read(controller, name)?;
        text.trim().parse().map_err(|_| Error::Parse {
            path,
            what: "a number",
            text,
        })
    }

    fn read_limit(&self, controller: &str, name: &str) -> Result<Option<u64>> {
        let (path, text) = self.read(controller, name)?;
        parse_limit(&text).map_err(|_| Error::Parse {
            path,
            what: "a limit",
            text,
        })
    }

    /// Move `pid` into the cgroup in every hierarchy.
    pub fn add_process(&self, pid: i32) -> Result<()> {
        for path in self.procs_paths() {
            write_to(&path, &pid.to_string())?;
        }
        Ok(())
    }

    /// Move the calling thread into the cgroup in every hierarchy; see [`join_current_thread`].
    pub fn join_current_thread(&self) -> Result<()> {
        join_current_thread(self.dirs())
    }

    /// Apply new limits. See [`super::Cgroup::update`].
    pub fn update(&self, resources: &Resources) -> Result<()> {
        resources.validate()?;
        self.apply(resources)
    }

    fn apply(&self, r: &Resources) -> Result<()> {
        let current = if self.memsw {
            self.read_limit("memory", MEMORY_LIMIT)?
        } else {
            None
        };
        for (name, value) in memory_plan(current, r.memory_limit, r.memory_swap_off, self.memsw) {
            self.write("memory", name, &value)?;
        }

        match r.cpu_quota {
            None | Some((-1, _)) => {
                let period = r.cpu_quota.map_or(DEFAULT_CPU_PERIOD, |(_, p)| p);
                self.write("cpu", "cpu.cfs_quota_us", "-1")?;
                self.write("cpu", "cpu.cfs_period_us", &period.to_string())?;
            }
            Some((quota, period)) => {
                // A shorter period can be refused (EINVAL) while the old quota/new period would
                // exceed the parent's bandwidth: then set the quota first and the period again.
                let period = period.to_string();
                let early = self.write("cpu", "cpu.cfs_period_us", &period);
                let einval = matches!(&early, Err(Error::Write { source, .. })
                    if source.raw_os_error() == Some(Errno::EINVAL as i32));
                if early.is_err() && !einval {
                    return early;
                }
                self.write("cpu", "cpu.cfs_quota_us", &quota.to_string())?;
                if einval {
                    self.write("cpu", "cpu.cfs_period_us", &period)?;
                }
            }
        }
        let shares = r.cpu_weight.map_or(DEFAULT_SHARES, weight_to_shares);
        self.write("cpu", "cpu.shares", &shares.to_string())?;

        let pids = r.pids_limit.filter(|&l| l != -1);
        self.write("pids", "pids.max", &number_or_max(pids, "max"))
    }

    /// Read the usage counters.
    pub fn stats(&self) -> Result<Stats> {
        let mut stats = Stats {
            cpu_usage_ns: self.read_u64("cpuacct", "cpuacct.usage")?,
            ..Stats::default()
        };
        let acct = self.read("cpuacct", "cpuacct.stat")?;
        stats.cpu_user_ns = ticks_to_ns(keyed_u64(&acct, "user")?, self.clk_tck);
        stats.cpu_system_ns = ticks_to_ns(keyed_u64(&acct, "system")?, self.clk_tck);
        let cpu = self.read("cpu", "cpu.stat")?;
        stats.cpu_throttled_periods = keyed_u64(&cpu, "nr_throttled")?;
        stats.cpu_throttled_ns = keyed_u64(&cpu, "throttled_time")?;

        stats.memory_usage = self.read_u64("memory", "memory.usage_in_bytes")?;
        stats.memory_limit = self.read_limit("memory", MEMORY_LIMIT)?;
        stats.memory_max_usage = Some(self.read_u64("memory", "memory.max_usage_in_bytes")?);
        let mem = self.read("memory", "memory.stat")?;
        // The hierarchical totals count child cgroups too; older kernels lack them.
        let total = |key: &'static str, plain: &'static str| -> Result<u64> {
            if keyed(&mem.1, key).is_some() {
                keyed_u64(&mem, key)
            } else {
                keyed_u64(&mem, plain)
            }
        };
        let inactive_file = total("total_inactive_file", "inactive_file")?;
        stats.memory_working_set = stats.memory_usage.saturating_sub(inactive_file);
        stats.memory_rss = total("total_rss", "rss")?;
        stats.memory_cache = total("total_cache", "cache")?;
        stats.oom_kills = keyed_u64(&self.read("memory", "memory.oom_control")?, "oom_kill")?;

        stats.pids_current = self.read_u64("pids", "pids.current")?;
        stats.pids_limit = self.read_limit("pids", "pids.max")?;
        Ok(stats)
    }

    /// The processes in any of the cgroup's hierarchies, sorted.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let mut pids = BTreeSet::new();
        for path in self.procs_paths() {
            pids.extend(read_procs(&path).map_err(|source| Error::Read { path, source })?);
        }
        Ok(pids.into_iter().collect())
    }

    /// Signal every process: frozen first when the freezer is mounted, so none can fork away
    /// meanwhile, then thawed (so the signals are delivered); without it, in repeated rounds.
    pub fn kill_all(&self, signal: Signal) -> Result<()> {
        let signal_error = |pid, source| Error::Signal {
            cgroup: self.path.clone(),
            pid,
            signal,
            source,
        };
        let state = self
            .dir("freezer")
            .ok()
            .map(|d| d.join("freezer.state"))
            .filter(|p| p.exists());
        let Some(state) = state else {
            return signal_all(|| self.pids(), signal, SIGNAL_ROUNDS, signal_error);
        };
        write_to(&state, "FROZEN")?;
        wait_frozen(&state);
        let signalled = signal_all(|| self.pids(), signal, 1, signal_error);
        let thawed = write_to(&state, "THAWED");
        signalled.and(thawed)
    }

    /// Freeze (or thaw) every process, waiting until the kernel reports FROZEN.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let state = self.dir("freezer").map(|d| d.join("freezer.state"))?;
        write_to(&state, if frozen { "FROZEN" } else { "THAWED" })?;
        if frozen {
            wait_frozen(&state);
        }
        Ok(())
    }

    /// Whether the freezer holds the cgroup frozen.
    pub fn is_frozen(&self) -> bool {
        self.dir("freezer")
            .ok()
            .and_then(|d| std::fs::read_to_string(d.join("freezer.state")).ok())
            .is_some_and(|s| s.trim() == "FROZEN")
    }

    /// rmdir the cgroup in every hierarchy (retrying while processes exit); idempotent.
    pub fn remove(&self) -> Result<()> {
        let mut first_error = None;
        for h in &self.hierarchies {
            if let Err(source) = remove_dir(&h.dir, REMOVE_TIMEOUT) {
                tracing::warn!(dir = %h.dir.display(), cause = %source, "cannot remove cgroup");
                first_error.get_or_insert(Error::Remove {
                    path: h.dir.clone(),
                    source,
                });
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => {
                tracing::debug!(cgroup = %self.path, "removed v1 cgroup");
                Ok(())
            }
        }
    }

    /// Whether the cgroup's directory exists in any hierarchy.
    pub fn exists(&self) -> bool {
        self.hierarchies.iter().any(|h| h.dir.is_dir())
    }
}

/// Move the calling thread, not its whole process, into the cgroup directories `dirs` (one per
/// hierarchy) by writing `0` to their `tasks`. Moving only itself, the caller spares the kernel
/// the global threadgroup lock a `cgroup.procs` write takes, and the RCU grace period that lock
/// waits for (5-15 ms on the test machine: most of a container's start). For a process with a
/// single thread, such as a container's init before it execs, that thread is the process.
pub fn join_current_thread<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    for dir in dirs {
        write_to(&dir.join("tasks"), "0")?;
    }
    Ok(())
}

fn write_to(path: &Path, value: &str) -> Result<()> {
    write_file(path, value).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// The number after `key` in a flat-keyed file; 0 when the kernel does not report it.
fn keyed_u64((path, text): &(PathBuf, String), key: &'static str) -> Result<u64> {
    match keyed(text, key) {
        None => Ok(0),
        Some(value) => value.parse().map_err(|_| Error::Parse {
            path: path.clone(),
            what: key,
            text: value.to_string(),
        }),
    }
}

/// Poll `freezer.state` until FROZEN (FREEZING while tasks are still being frozen).
fn wait_frozen(state: &Path) {
    let start = Instant::now();
    while start.elapsed() < FREEZE_TIMEOUT {
        match std::fs::read_to_string(state) {
            Ok(s) if s.trim() == "FROZEN" => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => return,
        }
    }
    tracing::debug!(state = %state.display(), "cgroup not frozen in time; signalling anyway");
}

/// The writes that set the memory limit (and with swap accounting, memory+swap) in an order the
/// kernel accepts: it insists on memsw >= limit after every write. Raising memsw above the
/// current limit goes first; otherwise the limit goes down first. `current_limit` `None` is
/// unlimited.
pub(crate) fn memory_plan(
    current_limit: Option<u64>,
    limit: Option<u64>,
    swap_off: bool,
    memsw: bool,
) -> Vec<(&'static str, String)> {
    let limit_value = number_or_max(limit, "-1");
    if !memsw {
        return vec![(MEMORY_LIMIT, limit_value)];
    }
    let memsw_target = if swap_off { limit } else { None };
    let memsw_value = number_or_max(memsw_target, "-1");
    let memsw_first = match (memsw_target, current_limit) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(target), Some(current)) => target > current,
    };
    if memsw_first {
        vec![(MEMSW_LIMIT, memsw_value), (MEMORY_LIMIT, limit_value)]
    } else {
        vec![(MEMORY_LIMIT, limit_value), (MEMSW_LIMIT, memsw_value)]
    }
}

/// USER_HZ, the unit of `cpuacct.stat` (100 everywhere that matters).
pub(crate) fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

pub(crate) fn ticks_to_ns(ticks: u64, clk_tck: u64) -> u64 {
    let ns = u128::from(ticks) * 1_000_000_000 / u128::from(clk_tck.max(1));
    u64::try_from(ns).unwrap_or(u64::MAX)
}
