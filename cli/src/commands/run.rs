//! `tug run IMAGE [-- CMD...]`: one container on this machine, in the foreground, like
//! `docker run`: pull if needed, mount the rootfs, create and start, stream the output, exit
//! with the container's status, clean up. Ctrl-C stops the container (SIGTERM, then SIGKILL).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{SigSet, Signal};
use tug_agent::image::{CredentialStore, ImageError, ImageRef, Platform, Progress, unmount_rootfs};
use tug_agent::runtime::cgroups::Resources;
use tug_agent::runtime::container::Runtime;
use tug_agent::runtime::logs::LogLine;
use tug_agent::runtime::spec::{ContainerConfig, VolumeMount};
use tug_agent::runtime::state::{RuntimeOptions, Status};
use tug_agent::supervisor::restarts::{Backoff, Decision, Exit, RestartPolicy, RestartTracker};
use tug_agent::worker::launch::{self, Launch};
use tug_api::manifest::{Cpu, Memory};

use crate::args::{GlobalArgs, RunArgs};

const FORWARDED: [Signal; 4] = [
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

pub fn run(global: &GlobalArgs, args: RunArgs) -> anyhow::Result<()> {
    // Signals are waited for by one thread; block them before any thread exists. SIGINT and
    // SIGTERM stop the container (TERM, grace, KILL); FORWARDED ones go to it as they are.
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGINT);
    stop_signals.add(Signal::SIGTERM);
    for sig in FORWARDED {
        stop_signals.add(sig);
    }
    stop_signals
        .thread_block()
        .context("block SIGINT/SIGTERM")?;

    let mut cc = container_config(&args, &global.data_dir)?;
    let restart: RestartPolicy = args.restart.parse().map_err(anyhow::Error::msg)?;
    if args.detach && restart != RestartPolicy::Never {
        bail!(
            "--restart needs tug run in the foreground (detached containers are restarted by the agent)"
        );
    }
    let reference = ImageRef::parse(&args.image)?;
    let platform = match &args.platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    let credentials = match CredentialStore::default_path() {
        Some(path) => CredentialStore::load(&path)?,
        None => CredentialStore::empty(),
    };
    let store = super::image::open(global, credentials)?;
    let record = match store.get(&reference) {
        Ok(r) => r,
        Err(ImageError::NotFound(_)) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start the async runtime")?;
            eprintln!("pulling {reference}");
            rt.block_on(store.pull(&reference, &platform, &Progress(&|_| {})))?
        }
        Err(e) => return Err(e.into()),
    };
    let id = args.name.clone().unwrap_or_else(random_id);
    let runtime = super::runtime::open(global)?;
    if runtime.dir(&id).path().exists() {
        bail!(
            "a container named {id} exists already (remove it with tug rm {id}, or pick another --name)"
        );
    }
    let rootfs_dir = launch::rootfs_dir(&global.data_dir, &id);
    if rootfs_dir.exists() {
        bail!(
            "{} exists already: remove it or pick another --name",
            rootfs_dir.display()
        );
    }
    let remove_all_rootfs = || {
        if let Err(e) = launch::remove_rootfs_of(&global.data_dir, &id) {
            eprintln!("tug: cleanup: {e}");
        }
    };

    cc.hostname = args
        .hostname
        .clone()
        .unwrap_or_else(|| id.chars().take(12).collect());
    let opts = RuntimeOptions {
        cgroup_path: format!("tug/{id}"),
        resources: cc.resources.clone(),
        log_max_bytes: 10 << 20,
        log_max_files: 3,
        network_hook: args.network_hook.clone(),
        oci_runtime: args.oci_runtime.clone(),
    };
    let launched = launch::create(
        &store,
        &runtime,
        &global.data_dir,
        &record,
        Launch {
            id: id.clone(),
            config: cc.clone(),
            annotations: [("tug.image".to_string(), reference.to_string())].into(),
            options: opts,
        },
    )?;
    let (spec, opts, rootfs) = (launched.spec, launched.options, launched.rootfs);
    if args.detach {
        if let Err(e) = runtime.start(&id) {
            let _ = runtime.delete(&id, true);
            remove_all_rootfs();
            return Err(e.into());
        }
        println!("{id}");
        return Ok(());
    }

    // From here the container exists: SIGINT/SIGTERM stop it, and no restart follows.
    let stopping = Arc::new(AtomicBool::new(false));
    let (rt2, id2, grace, stop2) = (
        runtime.clone(),
        id.clone(),
        Duration::from_secs(args.stop_timeout),
        stopping.clone(),
    );
    std::thread::spawn(move || {
        while let Ok(sig) = stop_signals.wait() {
            if FORWARDED.contains(&sig) {
                let _ = rt2.kill(&id2, sig);
                continue;
            }
            stop2.store(true, Ordering::SeqCst);
            let _ = rt2.stop(&id2, grace);
            return;
        }
    });
    let mut tracker = RestartTracker::new(restart, Backoff::default());
    let (outcome, state) = loop {
        let began = Instant::now();
        let outcome = runtime
            .start(&id)
            .map_err(anyhow::Error::from)
            .and_then(|_| follow(&runtime, &id));
        let state = runtime.wait(&id, None);
        let decision = match (&outcome, &state) {
            (Ok(()), Ok(s)) => {
                let exit = Exit {
                    code: s.exit_code,
                    signal: s.signal,
                    ran_for: began.elapsed(),
                };
                tracker.on_exit(exit, stopping.load(Ordering::SeqCst))
            }
            _ => Decision::Stop,
        };
        let Decision::Restart { after } = decision else {
            break (outcome, state);
        };
        let code = state
            .as_ref()
            .ok()
            .and_then(|s| s.exit_status())
            .unwrap_or(255);
        eprintln!(
            "tug: container {id} exited with {code}; restart {} in {after:?}",
            tracker.restarts()
        );
        if let Err(e) = runtime.delete(&id, true) {
            break (Err(e.into()), state);
        }
        let deadline = Instant::now() + after;
        while Instant::now() < deadline && !stopping.load(Ordering::SeqCst) {
            std::thread::sleep(
                Duration::from_millis(10).min(deadline.saturating_duration_since(Instant::now())),
            );
        }
        if stopping.load(Ordering::SeqCst) {
            break (Ok(()), state);
        }
        if let Err(e) = runtime.create(&id, &spec, &opts) {
            break (Err(e.into()), state);
        }
    };
    if args.rm {
        if runtime.dir(&id).path().exists()
            && let Err(e) = runtime.delete(&id, true)
        {
            eprintln!("tug: cleanup: {e}");
        }
        remove_all_rootfs();
    } else if let Err(e) = unmount_rootfs(&rootfs) {
        // Kept like docker run without --rm: what it wrote stays in its upper dir until tug rm.
        eprintln!("tug: cleanup: {e}");
    }
    outcome?;
    let state = state?;
    if state.oom_killed {
        eprintln!(
            "tug: container {id} was killed: out of memory (limit {})",
            cc.resources
                .memory_limit
                .map(|m| Memory(m).to_string())
                .unwrap_or_default()
        );
    }
    let status = state.exit_status().unwrap_or(255);
    std::process::exit(status)
}

fn container_config(args: &RunArgs, data_dir: &Path) -> anyhow::Result<ContainerConfig> {
    let mut env = Vec::new();
    for e in &args.env {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("invalid --env {e:?}: expected NAME=VALUE"))?;
        tug_api::manifest::names::check_env_name(k).map_err(anyhow::Error::msg)?;
        env.push((k.to_string(), v.to_string()));
    }
    let mut volumes = Vec::new();
    for v in &args.volumes {
        let parts: Vec<&str> = v.split(':').collect();
        let (src, dst, ro) = match parts.as_slice() {
            [s, d] => (*s, *d, false),
            [s, d, "ro"] => (*s, *d, true),
            [s, d, "rw"] => (*s, *d, false),
            _ => bail!("invalid --volume {v:?}: expected HOST_PATH:CONTAINER_PATH[:ro]"),
        };
        // NAME:... is a named volume kept under the data dir; /PATH:... a directory of the node.
        let source = if src.starts_with('/') {
            let p = PathBuf::from(src);
            if !p.exists() {
                bail!("invalid --volume {v:?}: {src} does not exist");
            }
            p
        } else {
            tug_api::manifest::names::check_dns_label("volume name", src).map_err(|e| {
                anyhow::anyhow!("invalid --volume {v:?}: {e} (or give an absolute host path)")
            })?;
            let p = data_dir.join("volumes").join(src);
            std::fs::create_dir_all(&p)
                .with_context(|| format!("create volume {}", p.display()))?;
            p
        };
        volumes.push(VolumeMount {
            source,
            destination: dst.to_string(),
            read_only: ro,
        });
    }
    let memory = args
        .memory
        .as_deref()
        .map(Memory::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let cpus = args
        .cpus
        .as_deref()
        .map(Cpu::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let resources = Resources {
        memory_limit: memory.map(|m| m.0),
        cpu_quota: cpus.map(|c| (i64::try_from(c.0 * 100).unwrap_or(i64::MAX), 100_000)),
        pids_limit: args.pids_limit,
        ..Resources::default()
    };
    resources.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(ContainerConfig {
        command: args.entrypoint.clone().map(|e| vec![e]),
        args: (!args.command.is_empty()).then(|| args.command.clone()),
        env,
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        hostname: String::new(),
        volumes,
        resources,
    })
}

fn random_id() -> String {
    let mut bytes = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (t as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Print the container's log as it grows until the container has stopped.
pub fn follow(runtime: &Runtime, id: &str) -> anyhow::Result<()> {
    let path: PathBuf = runtime.dir(id).log();
    let mut offset = 0u64;
    let mut inode = 0u64;
    let mut partial = Vec::new();
    loop {
        let stopped = runtime
            .state(id)
            .map(|s| s.status == Status::Stopped)
            .unwrap_or(true);
        if let Ok(mut f) = std::fs::File::open(&path) {
            let meta = f.metadata()?;
            if meta.ino() != inode || meta.len() < offset {
                (inode, offset) = (meta.ino(), 0);
            }
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            offset += f.read_to_end(&mut buf)? as u64;
            partial.extend_from_slice(&buf);
            while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = partial.drain(..=pos).collect();
                if let Ok(l) = serde_json::from_slice::<LogLine>(&line) {
                    if l.stream == "stderr" {
                        let _ = std::io::stderr().write_all(l.log.as_bytes());
                    } else {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(l.log.as_bytes());
                        let _ = out.flush();
                    }
                }
            }
        }
        if stopped {
            return Ok(());
        }
        // Wake at once when the container stops, else look at the log again soon.
        match runtime.wait(id, Some(Duration::from_millis(20))) {
            Ok(_) | Err(tug_agent::runtime::container::ContainerError::Timeout(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
