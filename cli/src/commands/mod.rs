//! Dispatch of each subcommand to the crate that does the work. Kept thin: logic lives in the
//! library crates.

use std::fmt;

mod client;
mod containers;
mod controller;
mod describe;
pub mod image;
mod run;
pub mod runtime;

use crate::args::{Cli, ClusterCommand, Command};

/// A role or command that exists in the interface but whose implementation has not landed.
/// It fails loudly with one line instead of pretending to work.
#[derive(Debug)]
pub struct NotBuilt {
    pub command: &'static str,
    pub issue: &'static str,
}

impl fmt::Display for NotBuilt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`tug {}` is not built yet (issue: {})",
            self.command, self.issue
        )
    }
}

impl std::error::Error for NotBuilt {}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let not_built = |command, issue| Err(NotBuilt { command, issue }.into());
    match cli.command {
        Command::Controller(args) => controller::run(&cli.global, args),
        Command::Agent(_) => not_built("agent", "agents, scheduling, reconciliation"),
        Command::Up => not_built("up", "agents, scheduling, reconciliation"),
        Command::Apply(args) => client::apply(&cli.global, &args.files),
        Command::Get(args) => client::get(&cli.global, &args),
        Command::Describe(args) => describe::describe(&cli.global, &args),
        Command::Delete(args) => client::delete(&cli.global, &args),
        Command::Cluster(ClusterCommand::Status) => client::cluster_status(&cli.global),
        Command::Logs(args) => containers::logs(&cli.global, &args.task, args.follow),
        Command::Exec(args) => containers::exec(&cli.global, &args.task, &args.command, &args.env),
        Command::Ps { all } => containers::ps(&cli.global, all),
        Command::Stop { names, time } => containers::stop(&cli.global, &names, time),
        Command::Rm { names, force } => containers::rm(&cli.global, &names, force),
        Command::Pause { name } => containers::pause(&cli.global, &name, true),
        Command::Unpause { name } => containers::pause(&cli.global, &name, false),
        Command::Scale(_) => not_built("scale", "agents, scheduling, reconciliation"),
        Command::Rollout(_) => not_built("rollout", "agents, scheduling, reconciliation"),
        Command::Nodes => not_built("nodes", "agents, scheduling, reconciliation"),
        Command::Drain(_) => not_built("drain", "agents, scheduling, reconciliation"),
        Command::Uncordon(_) => not_built("uncordon", "agents, scheduling, reconciliation"),
        Command::Run(args) => run::run(&cli.global, *args),
        Command::Runtime(cmd) => runtime::run(&cli.global, cmd),
        Command::Image(cmd) => image::run(&cli.global, cmd),
        Command::Monitor { state_dir } => {
            std::process::exit(tug_agent::runtime::monitor::main(&state_dir))
        }
    }
}
