//! From an image's config and a container's settings to an OCI runtime spec (oci-spec): the one
//! description every runtime (ours, runc, crun) runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxCpu, LinuxMemory, LinuxPids, LinuxResources, LinuxSeccomp,
    LinuxSeccompAction, LinuxSyscall, Mount, PosixRlimitBuilder, PosixRlimitType, Process, Root,
    Spec, User,
};

use super::cgroups::Resources;
use super::users::{UserError, resolve};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("no command to run: the image has no entrypoint or cmd and none was given")]
    NoCommand,
    #[error(transparent)]
    User(#[from] UserError),
    #[error("volume {destination}: {reason}")]
    Volume { destination: String, reason: String },
    #[error("invalid environment entry {0:?}: expected NAME=VALUE")]
    Env(String),
    #[error("{0}")]
    Invalid(String),
}

/// A bind mount from the node into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// What a container runs with, beyond its image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerConfig {
    /// Replaces the image's entrypoint (and then its cmd too, unless `args` is given).
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd.
    pub args: Option<Vec<String>>,
    /// Added after the image's env, replacing variables of the same name.
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    /// `user[:group]`, names or numbers; default: the image's user, else root.
    pub user: Option<String>,
    pub hostname: String,
    pub volumes: Vec<VolumeMount>,
    pub resources: Resources,
}

/// Docker's default capability set.
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// System calls no container gets (they return EPERM): kernel, clock, module, keyring, tracing
/// and namespace escapes, in the spirit of Docker's default profile (which allows by list).
pub const BLOCKED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "perf_event_open",
    "personality",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The runtime spec for `config` on `image`, whose root filesystem is mounted at `rootfs`.
pub fn build(
    image: &ImageConfiguration,
    config: &ContainerConfig,
    rootfs: &Path,
) -> Result<Spec, SpecError> {
    let ic = image.config().clone().unwrap_or_default();
    let args: Vec<String> = match (&config.command, &config.args) {
        (Some(cmd), args) => cmd.iter().chain(args.iter().flatten()).cloned().collect(),
        (None, Some(args)) => ic
            .entrypoint()
            .iter()
            .flatten()
            .chain(args)
            .cloned()
            .collect(),
        (None, None) => ic
            .entrypoint()
            .iter()
            .flatten()
            .chain(ic.cmd().iter().flatten())
            .cloned()
            .collect(),
    };
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }

    let mut env = EnvList::default();
    for entry in ic.env().iter().flatten() {
        let (k, v) = entry
            .split_once('=')
            .ok_or_else(|| SpecError::Env(entry.clone()))?;
        env.set(k, v);
    }
    for (k, v) in &config.env {
        env.set(k, v);
    }
    if !env.has("PATH") {
        let (k, v) = DEFAULT_PATH.split_once('=').unwrap_or(("PATH", ""));
        env.set(k, v);
    }
    let user_spec = config
        .user
        .clone()
        .or_else(|| ic.user().clone())
        .unwrap_or_default();
    let user = resolve(rootfs, &user_spec)?;
    if !env.has("HOME") {
        env.set("HOME", user.home.as_deref().unwrap_or("/"));
    }
    env.set("HOSTNAME", &config.hostname);
    let env = env.into_entries();

    let cwd = config
        .workdir
        .clone()
        .or_else(|| ic.working_dir().clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(SpecError::Invalid(format!(
            "working directory {cwd:?} must be an absolute path"
        )));
    }

    let caps: std::collections::HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
    let mut capabilities = LinuxCapabilities::default();
    capabilities
        .set_bounding(Some(caps.clone()))
        .set_effective(Some(caps.clone()))
        .set_permitted(Some(caps.clone()))
        .set_inheritable(None)
        .set_ambient(None);

    let mut process_user = User::default();
    process_user
        .set_uid(user.uid)
        .set_gid(user.gid)
        .set_additional_gids(
            (!user.additional_gids.is_empty()).then_some(user.additional_gids.clone()),
        );
    // Open files: the node's own hard limit (raising it needs CAP_SYS_RESOURCE, which a node may
    // not grant), as both soft and hard limit of the container.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    let nofile = PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .hard(hard)
        .soft(hard)
        .build()
        .map_err(|e| SpecError::Invalid(e.to_string()))?;
    let mut process = Process::default();
    process
        .set_args(Some(args))
        .set_env(Some(env))
        .set_cwd(PathBuf::from(cwd))
        .set_user(process_user)
        .set_capabilities(Some(capabilities))
        .set_no_new_privileges(Some(true))
        .set_rlimits(Some(vec![nofile]))
        .set_terminal(Some(false));

    // proc, /dev, devpts, shm, mqueue, sysfs (ro) and the container's own cgroup (ro).
    let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts();
    for v in &config.volumes {
        if !v.destination.starts_with('/') || v.destination.split('/').any(|c| c == "..") {
            return Err(SpecError::Volume {
                destination: v.destination.clone(),
                reason: "must be an absolute path without '..'".into(),
            });
        }
        if !v.source.is_absolute() {
            return Err(SpecError::Volume {
                destination: v.destination.clone(),
                reason: format!("source {} must be absolute", v.source.display()),
            });
        }
        let mut m = Mount::default();
        let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
        options.push(if v.read_only { "ro" } else { "rw" }.to_string());
        m.set_destination(PathBuf::from(&v.destination))
            .set_typ(Some("bind".into()))
            .set_source(Some(v.source.clone()))
            .set_options(Some(options));
        mounts.push(m);
    }

    let mut linux = oci_spec::runtime::Linux::default();
    linux.set_resources(Some(oci_resources(&config.resources)));
    linux.set_seccomp(Some(default_seccomp()));

    let mut root = Root::default();
    root.set_path(rootfs.to_path_buf())
        .set_readonly(Some(false));
    let mut spec = Spec::default();
    spec.set_process(Some(process))
        .set_root(Some(root))
        .set_hostname(Some(config.hostname.clone()))
        .set_mounts(Some(mounts))
        .set_linux(Some(linux));
    Ok(spec)
}

/// Environment variables in first-set order; a later value replaces an earlier one.
#[derive(Default)]
struct EnvList {
    values: BTreeMap<String, String>,
    order: Vec<String>,
}

impl EnvList {
    fn set(&mut self, k: &str, v: &str) {
        if self.values.insert(k.to_string(), v.to_string()).is_none() {
            self.order.push(k.to_string());
        }
    }

    fn has(&self, k: &str) -> bool {
        self.values.contains_key(k)
    }

    fn into_entries(self) -> Vec<String> {
        self.order
            .iter()
            .map(|k| {
                format!(
                    "{k}={}",
                    self.values.get(k).map(String::as_str).unwrap_or("")
                )
            })
            .collect()
    }
}

/// The same limits in the spec's words, for external runtimes (ours reads `Resources`).
fn oci_resources(r: &Resources) -> LinuxResources {
    let mut res = LinuxResources::default();
    let mut memory = LinuxMemory::default();
    if let Some(limit) = r.memory_limit {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        memory.set_limit(Some(limit));
        if r.memory_swap_off {
            memory.set_swap(Some(limit));
        }
    }
    let mut cpu = LinuxCpu::default();
    if let Some((quota, period)) = r.cpu_quota {
        cpu.set_quota(Some(quota)).set_period(Some(period));
    }
    if let Some(w) = r.cpu_weight {
        cpu.set_shares(Some(super::cgroups::weight_to_shares(w)));
    }
    res.set_memory(Some(memory)).set_cpu(Some(cpu));
    if let Some(p) = r.pids_limit {
        let mut pids = LinuxPids::default();
        pids.set_limit(p);
        res.set_pids(Some(pids));
    }
    res
}

/// Allow everything but `BLOCKED_SYSCALLS`, which fail with EPERM.
pub fn default_seccomp() -> LinuxSeccomp {
    let mut blocked = LinuxSyscall::default();
    blocked
        .set_names(BLOCKED_SYSCALLS.iter().map(|s| s.to_string()).collect())
        .set_action(LinuxSeccompAction::ScmpActErrno)
        .set_errno_ret(Some(nix::errno::Errno::EPERM as u32));
    let mut seccomp = LinuxSeccomp::default();
    seccomp
        .set_default_action(LinuxSeccompAction::ScmpActAllow)
        .set_syscalls(Some(vec![blocked]));
    seccomp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(json: &str) -> Result<ImageConfiguration, Box<dyn std::error::Error>> {
        Ok(serde_json::from_str(json)?)
    }

    fn rootfs() -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("etc"))?;
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )?;
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\napp:x:1000:\n")?;
        Ok(dir)
    }

    const IMG: &str = r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
        "config":{"Entrypoint":["/entry"],"Cmd":["serve","--port","80"],"Env":["PATH=/bin","MODE=dev"],"User":"app","WorkingDir":"/srv"}}"#;

    fn args(spec: &Spec) -> Vec<String> {
        spec.process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .unwrap_or_default()
    }

    #[test]
    fn entrypoint_cmd_and_overrides_follow_docker() -> Result<(), Box<dyn std::error::Error>> {
        let (img, r) = (image(IMG)?, rootfs()?);
        let mut c = ContainerConfig {
            hostname: "h".into(),
            ..Default::default()
        };
        assert_eq!(
            args(&build(&img, &c, r.path())?),
            ["/entry", "serve", "--port", "80"]
        );
        c.args = Some(vec!["check".into()]);
        assert_eq!(args(&build(&img, &c, r.path())?), ["/entry", "check"]);
        c.command = Some(vec!["/bin/sh".into(), "-c".into()]);
        c.args = None;
        assert_eq!(
            args(&build(&img, &c, r.path())?),
            ["/bin/sh", "-c"],
            "a new entrypoint drops the image's cmd"
        );
        let empty = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
        )?;
        assert!(matches!(
            build(&empty, &ContainerConfig::default(), r.path()),
            Err(SpecError::NoCommand)
        ));
        Ok(())
    }

    #[test]
    fn env_user_workdir_caps_and_limits() -> Result<(), Box<dyn std::error::Error>> {
        let (img, r) = (image(IMG)?, rootfs()?);
        let c = ContainerConfig {
            hostname: "web-1".into(),
            env: vec![("MODE".into(), "prod".into()), ("EXTRA".into(), "1".into())],
            resources: Resources {
                memory_limit: Some(64 << 20),
                pids_limit: Some(50),
                ..Default::default()
            },
            ..Default::default()
        };
        let spec = build(&img, &c, r.path())?;
        let p = spec.process().clone().unwrap_or_default();
        assert_eq!(
            p.env().clone().unwrap_or_default(),
            [
                "PATH=/bin",
                "MODE=prod",
                "EXTRA=1",
                "HOME=/home/app",
                "HOSTNAME=web-1"
            ]
        );
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
        assert_eq!(p.cwd(), Path::new("/srv"));
        assert_eq!(
            p.capabilities()
                .as_ref()
                .and_then(|c| c.bounding().clone())
                .map(|b| b.len()),
            Some(14)
        );
        assert_eq!(p.no_new_privileges(), Some(true));
        let res = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().clone())
            .unwrap_or_default();
        assert_eq!(
            res.memory().as_ref().and_then(|m| m.limit()),
            Some(64 << 20)
        );
        assert_eq!(res.pids().as_ref().map(|p| p.limit()), Some(50));
        let root = ContainerConfig {
            user: Some("0".into()),
            hostname: "h".into(),
            ..Default::default()
        };
        assert_eq!(
            build(&img, &root, r.path())?
                .process()
                .as_ref()
                .map(|p| p.user().uid()),
            Some(0)
        );
        let bad = ContainerConfig {
            user: Some("nobody".into()),
            hostname: "h".into(),
            ..Default::default()
        };
        assert!(matches!(
            build(&img, &bad, r.path()),
            Err(SpecError::User(UserError::UnknownUser(_)))
        ));
        Ok(())
    }

    #[test]
    fn volumes_become_bind_mounts_and_bad_ones_are_refused()
    -> Result<(), Box<dyn std::error::Error>> {
        let (img, r) = (image(IMG)?, rootfs()?);
        let mut c = ContainerConfig {
            hostname: "h".into(),
            ..Default::default()
        };
        c.volumes = vec![VolumeMount {
            source: "/srv/data".into(),
            destination: "/data".into(),
            read_only: true,
        }];
        let spec = build(&img, &c, r.path())?;
        let m = spec
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new("/data"))
            .cloned();
        assert_eq!(
            m.and_then(|m| m.options().clone()),
            Some(vec![
                "rbind".to_string(),
                "rprivate".to_string(),
                "ro".to_string()
            ])
        );
        c.volumes[0].destination = "/data/../etc".into();
        assert!(build(&img, &c, r.path()).is_err());
        Ok(())
    }
}
