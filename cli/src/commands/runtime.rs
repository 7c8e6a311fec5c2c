//! `tug runtime ...`: the built-in runtime with runc's verbs, on OCI bundles, so other tools
//! can drive it like runc. Containers live in `DATA/containers` (the same place as `tug run`'s).

use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use oci_spec::runtime::Spec;
use tug_agent::runtime::cgroups::Resources;
use tug_agent::runtime::container::Runtime;
use tug_agent::runtime::state::RuntimeOptions;

use crate::args::{GlobalArgs, RuntimeCommand};

pub fn open(global: &GlobalArgs) -> anyhow::Result<Runtime> {
    Ok(Runtime {
        root: global.data_dir.join("containers"),
        monitor_exe: std::env::current_exe().context("find the tug binary")?,
    })
}

pub fn run(global: &GlobalArgs, cmd: RuntimeCommand) -> anyhow::Result<()> {
    let rt = open(global)?;
    match cmd {
        RuntimeCommand::Create { id, bundle } => {
            let (spec, opts) = load_bundle(&bundle, &id)?;
            rt.create(&id, &spec, &opts)?;
        }
        RuntimeCommand::Start { id } => {
            rt.start(&id)?;
        }
        RuntimeCommand::State { id } => {
            println!("{}", serde_json::to_string_pretty(&oci_state(&rt, &id)?)?)
        }
        RuntimeCommand::Spec { bundle } => {
            let path = bundle.join("config.json");
            if path.exists() {
                bail!("{} exists already", path.display());
            }
            let mut spec = Spec::default();
            let mut root = oci_spec::runtime::Root::default();
            root.set_path("rootfs".into());
            spec.set_root(Some(root)).set_hostname(Some("tug".into()));
            spec.save(&path)
                .with_context(|| format!("write {}", path.display()))?;
        }
        RuntimeCommand::List => {
            for s in rt.list()? {
                println!(
                    "{}\t{:?}\t{}",
                    s.id,
                    s.status,
                    s.pid.map(|p| p.to_string()).unwrap_or_default()
                );
            }
        }
        RuntimeCommand::Kill { id, signal } => rt.kill(&id, parse_signal(&signal)?)?,
        RuntimeCommand::Delete { id, force } => rt.delete(&id, force)?,
        RuntimeCommand::Run { id, bundle } => {
            let (spec, opts) = load_bundle(&bundle, &id)?;
            rt.create(&id, &spec, &opts)?;
            let started = rt
                .start(&id)
                .map_err(anyhow::Error::from)
                .and_then(|_| super::run::follow(&rt, &id));
            let state = rt.wait(&id, None);
            let _ = rt.delete(&id, true);
            started?;
            std::process::exit(state?.exit_status().unwrap_or(255));
        }
    }
    Ok(())
}

/// The OCI runtime state document (what `runc state` prints).
fn oci_state(rt: &Runtime, id: &str) -> anyhow::Result<serde_json::Value> {
    let s = rt.state(id)?;
    let spec: Spec = tug_agent::runtime::state::read_json(&rt.dir(id).config())?;
    let status = match s.status {
        tug_agent::runtime::state::Status::Running if rt.is_paused(id) => "paused".to_string(),
        other => format!("{other:?}").to_lowercase(),
    };
    let bundle = spec
        .root()
        .as_ref()
        .and_then(|r| r.path().parent().map(|p| p.display().to_string()))
        .unwrap_or_default();
    Ok(serde_json::json!({
        "ociVersion": spec.version(),
        "id": s.id,
        "status": status,
        "pid": if s.status == tug_agent::runtime::state::Status::Stopped { 0 } else { s.pid.unwrap_or(0) },
        "bundle": bundle,
        "annotations": spec.annotations().clone().unwrap_or_default(),
        "created": humantime_secs(s.created_at),
        "exitCode": s.exit_status(),
        "oomKilled": s.oom_killed,
    }))
}

fn humantime_secs(secs: u64) -> String {
    tug_agent::runtime::logs::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// `TERM`, `SIGTERM` or `15`.
fn parse_signal(s: &str) -> anyhow::Result<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).with_context(|| format!("unknown signal {n}"));
    }
    let name = if s.starts_with("SIG") {
        s.to_string()
    } else {
        format!("SIG{s}")
    };
    Signal::from_str(&name.to_uppercase()).with_context(|| format!("unknown signal {s:?}"))
}

/// The bundle's spec (root made absolute) and tug's options from its cgroup path and limits.
fn load_bundle(bundle: &Path, id: &str) -> anyhow::Result<(Spec, RuntimeOptions)> {
    let bundle = bundle
        .canonicalize()
        .with_context(|| format!("bundle {}", bundle.display()))?;
    let mut spec = Spec::load(bundle.join("config.json"))
        .with_context(|| format!("read {}/config.json", bundle.display()))?;
    let mut root = spec.root().clone().context("config.json has no root")?;
    if root.path().is_relative() {
        root.set_path(bundle.join(root.path()));
    }
    if !root.path().is_dir() {
        bail!("root filesystem {} does not exist", root.path().display());
    }
    spec.set_root(Some(root));
    let linux = spec.linux().clone().unwrap_or_default();
    let cgroup_path = match linux.cgroups_path() {
        Some(p) if p.is_absolute() => p.to_string_lossy().trim_start_matches('/').to_string(),
        _ => format!("tug/{id}"),
    };
    let mut resources = Resources::default();
    if let Some(r) = linux.resources() {
        if let Some(m) = r.memory() {
            resources.memory_limit = m.limit().and_then(|l| u64::try_from(l).ok());
        }
        if let Some(c) = r.cpu()
            && let Some(q) = c.quota()
            && q > 0
        {
            resources.cpu_quota = Some((q, c.period().unwrap_or(100_000)));
        }
        if let Some(p) = r.pids() {
            resources.pids_limit = (p.limit() > 0).then_some(p.limit());
        }
    }
    resources.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((
        spec,
        RuntimeOptions {
            cgroup_path,
            resources,
            log_max_bytes: 10 << 20,
            log_max_files: 3,
            network_hook: None,
            oci_runtime: None,
        },
    ))
}
