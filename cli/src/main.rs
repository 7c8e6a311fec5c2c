//! `tug`: every role of the orchestrator in one binary. Parses the command line, sets up logging
//! and hands over to the library crates; errors end here as one line on stderr.

mod allocator;
mod args;
mod commands;
mod logging;
mod output;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: allocator::ByRole = allocator::ByRole;

fn main() -> ExitCode {
    if let Some(code) = monitor_mode() {
        return code;
    }
    let cli = args::Cli::parse();
    logging::init(cli.global.log_format);
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tug: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `tug __monitor STATE_DIR`, the per-container monitor that tug starts once per container
/// (DESIGN.md): it skips the command-line parser, which builds the description of every
/// subcommand, so that a container starts sooner and its monitor stays smaller. Any other
/// command line, this one with more arguments included, goes to the parser.
fn monitor_mode() -> Option<ExitCode> {
    let mut argv = std::env::args_os().skip(1);
    if argv.next()? != "__monitor" {
        return None;
    }
    let (Some(dir), None) = (argv.next(), argv.next()) else {
        return None;
    };
    // The same values as the parser's `--log-format` / TUG_LOG_FORMAT.
    let format = std::env::var("TUG_LOG_FORMAT")
        .ok()
        .and_then(|v| <args::LogFormat as clap::ValueEnum>::from_str(&v, false).ok())
        .unwrap_or(args::LogFormat::Human);
    logging::init(format);
    let code = tug_agent::runtime::monitor::main(std::path::Path::new(&dir));
    Some(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
