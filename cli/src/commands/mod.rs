//! Dispatch of each subcommand to the crate that does the work. Kept thin: logic lives in the
//! library crates.

mod agent;
mod client;
mod cluster;
mod containers;
mod controller;
mod describe;
pub mod image;
mod remote;
mod run;
pub mod runtime;
mod top;
mod up;

use tug_api::v1::NodeAvailability;

use crate::args::{Cli, ClusterCommand, Command, RolloutCommand, TopCommand};

/// The multi-threaded async runtime of the long-running roles (controller, agent, up), with
/// `workers` threads (default: one per CPU).
fn server_runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Controller(args) => controller::run(&cli.global, args),
        Command::Agent(args) => agent::run(&cli.global, args),
        Command::Up(args) => up::run(&cli.global, args),
        Command::Apply(args) => client::apply(&cli.global, &args.files),
        Command::Get(args) => client::get(&cli.global, &args),
        Command::Describe(args) => describe::describe(&cli.global, &args),
        Command::Delete(args) => client::delete(&cli.global, &args),
        Command::Cluster(ClusterCommand::Status) => client::cluster_status(&cli.global),
        Command::Logs(args) => remote::logs(&cli.global, &args),
        Command::Exec(args) => remote::exec(&cli.global, &args),
        Command::Ps { all } => containers::ps(&cli.global, all),
        Command::Stop { names, time } => containers::stop(&cli.global, &names, time),
        Command::Rm { names, force } => containers::rm(&cli.global, &names, force),
        Command::Pause { name } => containers::pause(&cli.global, &name, true),
        Command::Unpause { name } => containers::pause(&cli.global, &name, false),
        Command::Scale(args) => cluster::scale(
            &cli.global,
            args.namespace.as_deref(),
            &args.service,
            args.replicas,
        ),
        Command::Rollout(RolloutCommand::Status {
            service,
            namespace,
            timeout,
        }) => cluster::rollout_status(&cli.global, namespace.as_deref(), &service, timeout),
        Command::Rollout(RolloutCommand::Undo { service, namespace }) => {
            cluster::rollout_undo(&cli.global, namespace.as_deref(), &service)
        }
        Command::Nodes => cluster::nodes(&cli.global, None, false),
        Command::Top(TopCommand::Nodes { output }) => top::nodes(&cli.global, output),
        Command::Top(TopCommand::Services { namespace, output }) => {
            top::services(&cli.global, namespace.as_deref(), output)
        }
        Command::Drain(args) => {
            cluster::set_availability(&cli.global, &args.node, NodeAvailability::Drain)
        }
        Command::Uncordon(args) => {
            cluster::set_availability(&cli.global, &args.node, NodeAvailability::Active)
        }
        Command::Run(args) => run::run(&cli.global, *args),
        Command::Runtime(cmd) => runtime::run(&cli.global, cmd),
        Command::Image(cmd) => image::run(&cli.global, cmd),
        Command::Monitor { state_dir } => {
            std::process::exit(tug_agent::runtime::monitor::main(&state_dir))
        }
    }
}
