//! `exec`: run another process inside a running container. The caller forks; the child joins the
//! container's cgroup and namespaces (ipc, uts, net, pid, cgroup, then mount), forks again (a
//! new pid namespace applies to children only), and the grandchild takes on the container
//! process's working dir, rlimits, no_new_privs, user, capabilities and seccomp before exec.
//! stdio is the caller's; the exit status comes back through both forks.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;

use nix::sched::{CloneFlags, setns};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use oci_spec::runtime::Spec;

use super::cgroups::{Cgroup, CgroupDriver};
use super::container::{ContainerError, Runtime};
use super::state::{RuntimeOptions, Status, read_json};
use super::{seccomp, security};

/// Run `command` in container `id` with its environment plus `env`; returns the exit status
/// (128 + signal for a signal). Call from a single-threaded process.
pub fn exec(
    rt: &Runtime,
    id: &str,
    command: &[String],
    env: &[(String, String)],
) -> Result<i32, ContainerError> {
    let failed = |message: String| ContainerError::Failed {
        id: id.into(),
        message,
    };
    let state = rt.state(id)?;
    let pid = match (state.status, state.pid) {
        (Status::Running, Some(pid)) => pid,
        (status, _) => {
            return Err(ContainerError::WrongState {
                id: id.into(),
                status,
                what: "only a running container can exec",
            });
        }
    };
    if command.is_empty() {
        return Err(failed("no command given".into()));
    }
    let dir = rt.dir(id);
    let spec: Spec = read_json(&dir.config())?;
    let opts: RuntimeOptions = read_json(&dir.runtime())?;
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| failed("the container has no process spec".into()))?;
    let mut envs = process.env().clone().unwrap_or_default();
    for (k, v) in env {
        envs.retain(|e| !e.starts_with(&format!("{k}=")));
        envs.push(format!("{k}={v}"));
    }
    process
        .set_args(Some(command.to_vec()))
        .set_env(Some(envs.clone()));
    let filters = match spec.linux().as_ref().and_then(|l| l.seccomp().clone()) {
        Some(p) => seccomp::compile(&p).map_err(|e| failed(e.to_string()))?,
        None => Vec::new(),
    };
    let cgroup = CgroupDriver::detect()
        .and_then(|d| Cgroup::open(&d, &opts.cgroup_path))
        .map_err(|e| failed(e.to_string()))?;
    // Open the namespaces now: the pid may be gone by the time the child looks.
    let mut namespaces = Vec::new();
    for (name, flag) in [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let f = File::open(format!("/proc/{pid}/ns/{name}"))
            .map_err(|e| failed(format!("open the {name} namespace of {pid}: {e}")))?;
        namespaces.push((f, flag));
    }
    let cstr = |s: &str| CString::new(s).map_err(|_| failed(format!("{s:?} contains a NUL byte")));
    let argv: Vec<CString> = command.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let envp: Vec<CString> = envs.iter().map(|e| cstr(e)).collect::<Result<_, _>>()?;

    // SAFETY: the caller is single-threaded (documented requirement).
    match unsafe { fork() }.map_err(|e| failed(format!("fork: {e}")))? {
        ForkResult::Parent { child } => Ok(exit_status(
            waitpid(child, None).map_err(|e| failed(format!("wait: {e}")))?,
        )),
        ForkResult::Child => {
            let code = match join_and_run(&cgroup, &namespaces, &process, &filters, &argv, &envp) {
                Ok(code) => code,
                Err(msg) => {
                    eprintln!("tug: exec in {id}: {msg}");
                    126
                }
            };
            std::process::exit(code)
        }
    }
}

fn exit_status(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 255,
    }
}

fn join_and_run(
    cgroup: &Cgroup,
    namespaces: &[(File, CloneFlags)],
    process: &oci_spec::runtime::Process,
    filters: &[seccompiler::BpfProgram],
    argv: &[CString],
    envp: &[CString],
) -> Result<i32, String> {
    // This process has a single thread (see the caller).
    cgroup.join_single_threaded().map_err(|e| e.to_string())?;
    for (f, flag) in namespaces {
        setns(f, *flag).map_err(|e| format!("join namespace {flag:?}: {e}"))?;
    }
    // SAFETY: still single-threaded.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => Ok(exit_status(
            waitpid(child, None).map_err(|e| format!("wait: {e}"))?,
        )),
        ForkResult::Child => {
            let result = (|| -> Result<std::convert::Infallible, String> {
                std::env::set_current_dir(process.cwd())
                    .map_err(|e| format!("working directory {}: {e}", process.cwd().display()))?;
                security::set_rlimits(process).map_err(|e| e.to_string())?;
                security::set_no_new_privs(process).map_err(|e| e.to_string())?;
                security::drop_privileges(process).map_err(|e| e.to_string())?;
                seccomp::apply(filters).map_err(|e| e.to_string())?;
                let first = argv.first().ok_or("no command")?;
                let path = if first.as_bytes().contains(&b'/') {
                    first.clone()
                } else {
                    let env_path = envp
                        .iter()
                        .filter_map(|e| e.to_str().ok())
                        .find_map(|e| e.strip_prefix("PATH="))
                        .unwrap_or("/usr/sbin:/usr/bin:/sbin:/bin");
                    let name = first.to_string_lossy();
                    let found = env_path
                        .split(':')
                        .map(|d| std::path::Path::new(d).join(name.as_ref()))
                        .find(|p| p.is_file());
                    let found = found.ok_or_else(|| {
                        format!("executable {name:?} not found in $PATH ({env_path})")
                    })?;
                    CString::new(found.as_os_str().as_bytes())
                        .map_err(|_| "bad path".to_string())?
                };
                let err = nix::unistd::execve(&path, argv, envp).err();
                Err(format!(
                    "exec {path:?}: {}",
                    err.map(|e| e.to_string()).unwrap_or_default()
                ))
            })();
            match result {
                Ok(never) => match never {},
                Err(msg) => {
                    eprintln!("tug: exec: {msg}");
                    std::process::exit(127)
                }
            }
        }
    }
}
