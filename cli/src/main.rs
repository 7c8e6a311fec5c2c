//! `tug`: every role of the orchestrator in one binary. Parses the command line, sets up logging
//! and hands over to the library crates; errors end here as one line on stderr.

mod args;
mod commands;
mod logging;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
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
