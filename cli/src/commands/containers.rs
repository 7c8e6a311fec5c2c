//! `tug ps`, `logs`, `stop`, `rm`, `pause`, `unpause`, `exec`: this machine's containers, the
//! ones `tug run` made (DATA/containers, their root filesystems under DATA/rootfs).

use std::time::Duration;

use anyhow::Context;
use tug_agent::image::{Rootfs, remove_rootfs};
use tug_agent::runtime::state::{Status, read_json};

use crate::args::GlobalArgs;
use crate::output::table;

use super::runtime::open;

pub fn ps(global: &GlobalArgs, all: bool) -> anyhow::Result<()> {
    let rt = open(global)?;
    let mut rows = Vec::new();
    for s in rt.list()? {
        if !all && s.status == Status::Stopped {
            continue;
        }
        let spec: Option<oci_spec::runtime::Spec> = read_json(&rt.dir(&s.id).config()).ok();
        let image = spec
            .as_ref()
            .and_then(|sp| sp.annotations().as_ref())
            .and_then(|a| a.get("tug.image").cloned())
            .unwrap_or_default();
        let command = spec
            .as_ref()
            .and_then(|sp| sp.process().as_ref())
            .and_then(|p| p.args().clone())
            .unwrap_or_default()
            .join(" ");
        let status = match s.status {
            Status::Running if rt.is_paused(&s.id) => "paused".to_string(),
            Status::Stopped => format!("exited ({})", s.exit_status().unwrap_or(255)),
            other => format!("{other:?}").to_lowercase(),
        };
        rows.push(vec![
            s.id.clone(),
            image,
            command.chars().take(40).collect(),
            status,
            s.pid.map(|p| p.to_string()).unwrap_or_default(),
        ]);
    }
    println!(
        "{}",
        table(&["NAME", "IMAGE", "COMMAND", "STATUS", "PID"], &rows)
    );
    Ok(())
}

pub fn logs(global: &GlobalArgs, name: &str, follow: bool) -> anyhow::Result<()> {
    let rt = open(global)?;
    let state = rt.state(name)?;
    if follow && state.status != Status::Stopped {
        return super::run::follow(&rt, name);
    }
    let opts: tug_agent::runtime::state::RuntimeOptions = read_json(&rt.dir(name).runtime())?;
    for line in tug_agent::runtime::logs::read_all(&rt.dir(name).log(), opts.log_max_files.max(2))?
    {
        if line.stream == "stderr" {
            eprint!("{}", line.log);
        } else {
            print!("{}", line.log);
        }
    }
    Ok(())
}

pub fn stop(global: &GlobalArgs, names: &[String], secs: u64) -> anyhow::Result<()> {
    let rt = open(global)?;
    for n in names {
        let s = rt.stop(n, Duration::from_secs(secs))?;
        println!("{n} exited ({})", s.exit_status().unwrap_or(255));
    }
    Ok(())
}

/// Remove containers and their root filesystems.
pub fn rm(global: &GlobalArgs, names: &[String], force: bool) -> anyhow::Result<()> {
    let rt = open(global)?;
    for n in names {
        rt.delete(n, force)?;
        remove_rootfs_of(global, n)?;
        println!("{n}");
    }
    Ok(())
}

/// Unmount and delete DATA/rootfs/NAME (what `tug run` mounted for it).
pub fn remove_rootfs_of(global: &GlobalArgs, name: &str) -> anyhow::Result<()> {
    let dir = global.data_dir.join("rootfs").join(name);
    if dir.exists() {
        let rootfs = Rootfs {
            path: dir.join("rootfs"),
            upper: dir.join("upper"),
            work: dir.join("work"),
        };
        remove_rootfs(&rootfs)?;
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(())
}

pub fn pause(global: &GlobalArgs, name: &str, paused: bool) -> anyhow::Result<()> {
    open(global)?.pause(name, paused)?;
    println!("{name}");
    Ok(())
}

pub fn exec(
    global: &GlobalArgs,
    name: &str,
    command: &[String],
    env: &[String],
) -> anyhow::Result<()> {
    let mut vars = Vec::new();
    for e in env {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("invalid --env {e:?}: expected NAME=VALUE"))?;
        vars.push((k.to_string(), v.to_string()));
    }
    let code = tug_agent::runtime::exec::exec(&open(global)?, name, command, &vars)?;
    std::process::exit(code)
}
