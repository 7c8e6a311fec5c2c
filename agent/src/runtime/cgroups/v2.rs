//! cgroup v2: one unified hierarchy (Documentation/admin-guide/cgroup-v2.rst). A container's
//! cgroup is one directory below the root; every ancestor between them delegates the memory,
//! cpu and pids controllers through `cgroup.subtree_control`, and processes only ever go into
//! leaves (the "no internal processes" rule).

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::Signal;

use super::{
    DEFAULT_CPU_PERIOD, DEFAULT_CPU_WEIGHT, InvalidInput, REMOVE_TIMEOUT, Resources, Stats, keyed,
    mkdir_chain, number_or_max, parse_limit, read_procs, remove_dir, rollback, signal_all,
    split_path, write_file,
};

/// Controllers a container's cgroup must have, in `cgroup.controllers` order.
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// How often a signal is repeated for processes forked while it was being sent.
const SIGNAL_ROUNDS: usize = 8;

/// Everything a v2 cgroup can fail with, each naming the file (and the value written).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("{}/cgroup.controllers lacks {missing}: the cgroup v2 root does not offer them", root.display())]
    MissingControllers { root: PathBuf, missing: String },
    #[error("cgroup {path} does not exist (no {})", dir.display())]
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

/// The [`CONTROLLERS`] that `root/cgroup.controllers` does not list.
pub fn missing_controllers(root: &Path) -> io::Result<Vec<&'static str>> {
    let text = std::fs::read_to_string(root.join("cgroup.controllers"))?;
    let available: Vec<&str> = text.split_whitespace().collect();
    Ok(CONTROLLERS
        .into_iter()
        .filter(|c| !available.contains(c))
        .collect())
}

/// A container's cgroup on v2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    root: PathBuf,
    path: String,
    dir: PathBuf,
}

impl Cgroup {
    fn locate<'p>(root: &Path, path: &'p str) -> Result<(Self, Vec<&'p str>)> {
        let components = split_path(path)?;
        let mut dir = root.to_path_buf();
        dir.extend(&components);
        let cg = Cgroup {
            root: root.to_path_buf(),
            path: components.join("/"),
            dir,
        };
        Ok((cg, components))
    }

    /// Create the cgroup below `root`, delegating the controllers from the root down, and apply
    /// `resources`; on failure remove the directories made here. See
    /// [`super::Cgroup::create`].
    pub fn create(root: &Path, path: &str, resources: &Resources) -> Result<Self> {
        resources.validate()?;
        let (cg, components) = Self::locate(root, path)?;
        let controllers = root.join("cgroup.controllers");
        let missing = missing_controllers(root).map_err(|source| Error::Read {
            path: controllers,
            source,
        })?;
        if !missing.is_empty() {
            return Err(Error::MissingControllers {
                root: root.to_path_buf(),
                missing: missing.join(", "),
            });
        }
        let mut created = Vec::new();
        let result = cg
            .make_dirs(&components, &mut created)
            .and_then(|()| cg.apply(resources));
        match result {
            Ok(()) => {
                tracing::debug!(cgroup = %cg.path, ?resources, "created v2 cgroup");
                Ok(cg)
            }
            Err(e) => {
                rollback(&created);
                Err(e)
            }
        }
    }

    /// Walk from the root down: enable the controllers in each ancestor's subtree_control, then
    /// create the next directory. The leaf gets no subtree_control: it holds the processes.
    fn make_dirs(&self, components: &[&str], created: &mut Vec<PathBuf>) -> Result<()> {
        let mut parent = self.root.clone();
        let mut parent_is_new = false;
        for part in components {
            delegate(&parent, parent_is_new)?;
            let before = created.len();
            parent = mkdir_chain(&parent, &[part], created)
                .map_err(|(path, source)| Error::Mkdir { path, source })?;
            parent_is_new = created.len() > before;
        }
        Ok(())
    }

    /// Adopt the existing cgroup at `path` below `root`.
    pub fn open(root: &Path, path: &str) -> Result<Self> {
        let (cg, _) = Self::locate(root, path)?;
        if !cg.exists() {
            return Err(Error::NotFound {
                path: cg.path,
                dir: cg.dir,
            });
        }
        Ok(cg)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The cgroup's directory (for `clone3(CLONE_INTO_CGROUP)`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn procs_path(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn read(&self, name: &str) -> Result<(PathBuf, String)> {
        let path = self.dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            Err(source) => Err(Error::Read { path, source }),
        }
    }

    fn read_u64(&self, name: &str) -> Result<u64> {
        let (path, text) = self.read(name)?;
        text.trim().parse().map_err(|_| Error::Parse {
            path,
            what: "a number",
            text,
        })
    }

    fn read_limit(&self, name: &str) -> Result<Option<u64>> {
        let (path, text) = self.read(name)?;
        parse_limit(&text).map_err(|_| Error::Parse {
            path,
            what: "a limit",
            text,
        })
    }

    fn write(&self, name: &str, value: &str) -> Result<()> {
        write_to(&self.dir.join(name), value)
    }

    /// Move `pid` into the cgroup.
    pub fn add_process(&self, pid: i32) -> Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// Apply new limits. See [`super::Cgroup::update`].
    pub fn update(&self, resources: &Resources) -> Result<()> {
        resources.validate()?;
        self.apply(resources)
    }

    fn apply(&self, r: &Resources) -> Result<()> {
        self.write("memory.max", &number_or_max(r.memory_limit, "max"))?;
        // memory.swap.max limits swap alone (not memory+swap as v1 does); it is missing when the
        // kernel does not account swap, and then there is nothing to limit.
        if self.dir.join("memory.swap.max").exists() {
            let swap = if r.memory_swap_off { "0" } else { "max" };
            self.write("memory.swap.max", swap)?;
        } else if r.memory_swap_off {
            tracing::debug!(cgroup = %self.path, "no memory.swap.max (swap not accounted)");
        }

        let cpu_max = match r.cpu_quota {
            None => format!("max {DEFAULT_CPU_PERIOD}"),
            Some((-1, period)) => format!("max {period}"),
            Some((quota, period)) => format!("{quota} {period}"),
        };
        self.write("cpu.max", &cpu_max)?;
        let weight = r.cpu_weight.unwrap_or(DEFAULT_CPU_WEIGHT);
        self.write("cpu.weight", &weight.to_string())?;

        let pids = r.pids_limit.filter(|&l| l != -1);
        self.write("pids.max", &number_or_max(pids, "max"))
    }

    /// Read the usage counters.
    pub fn stats(&self) -> Result<Stats> {
        let cpu = self.read("cpu.stat")?;
        let mem = self.read("memory.stat")?;
        let memory_usage = self.read_u64("memory.current")?;
        let peak = self.dir.join("memory.peak");
        let memory_max_usage = if peak.exists() {
            Some(self.read_u64("memory.peak")?)
        } else {
            None
        };
        Ok(Stats {
            cpu_usage_ns: keyed_u64(&cpu, "usage_usec")?.saturating_mul(1000),
            cpu_user_ns: keyed_u64(&cpu, "user_usec")?.saturating_mul(1000),
            cpu_system_ns: keyed_u64(&cpu, "system_usec")?.saturating_mul(1000),
            cpu_throttled_periods: keyed_u64(&cpu, "nr_throttled")?,
            cpu_throttled_ns: keyed_u64(&cpu, "throttled_usec")?.saturating_mul(1000),
            memory_usage,
            memory_limit: self.read_limit("memory.max")?,
            memory_max_usage,
            memory_working_set: memory_usage.saturating_sub(keyed_u64(&mem, "inactive_file")?),
            memory_rss: keyed_u64(&mem, "anon")?,
            memory_cache: keyed_u64(&mem, "file")?,
            oom_kills: keyed_u64(&self.read("memory.events")?, "oom_kill")?,
            pids_current: self.read_u64("pids.current")?,
            pids_limit: self.read_limit("pids.max")?,
        })
    }

    /// The processes in the cgroup, sorted.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let path = self.procs_path();
        let mut pids = read_procs(&path).map_err(|source| Error::Read { path, source })?;
        pids.sort_unstable();
        Ok(pids)
    }

    /// SIGKILL through `cgroup.kill` (kernel 5.14+) when it exists: the kernel kills every
    /// process, forks included. Other signals (or older kernels): every process, in rounds.
    pub fn kill_all(&self, signal: Signal) -> Result<()> {
        let kill_file = self.dir.join("cgroup.kill");
        if signal == Signal::SIGKILL && kill_file.exists() {
            return write_to(&kill_file, "1");
        }
        signal_all(
            || self.pids(),
            signal,
            SIGNAL_ROUNDS,
            |pid, source| Error::Signal {
                cgroup: self.path.clone(),
                pid,
                signal,
                source,
            },
        )
    }

    /// Freeze (or thaw) every process through `cgroup.freeze`, waiting for `frozen 1`.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        write_to(
            &self.dir.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )?;
        let start = std::time::Instant::now();
        while frozen && !self.is_frozen() && start.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    pub fn is_frozen(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .is_ok_and(|e| e.lines().any(|l| l.trim() == "frozen 1"))
    }

    /// rmdir the cgroup (retrying while processes exit); idempotent.
    pub fn remove(&self) -> Result<()> {
        remove_dir(&self.dir, REMOVE_TIMEOUT).map_err(|source| Error::Remove {
            path: self.dir.clone(),
            source,
        })?;
        tracing::debug!(cgroup = %self.path, "removed v2 cgroup");
        Ok(())
    }

    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }
}

/// Enable [`CONTROLLERS`] for `dir`'s children. A directory just created has none enabled; an
/// existing one (or the root) is read first and only written when something is missing.
fn delegate(dir: &Path, is_new: bool) -> Result<()> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = if is_new {
        String::new()
    } else {
        std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?
    };
    let enabled: Vec<&str> = enabled
        .split_whitespace()
        .map(|c| c.trim_start_matches('+'))
        .collect();
    let wanted: Vec<String> = CONTROLLERS
        .into_iter()
        .filter(|c| !enabled.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    write_to(&path, &wanted.join(" "))
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
