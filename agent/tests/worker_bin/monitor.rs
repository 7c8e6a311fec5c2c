//! The monitor executable for `agent/tests/worker.rs`: the `tug` binary's `__monitor STATE_DIR`
//! mode without the rest of the CLI, so the agent crate's own tests can start containers.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next()) {
        (Some(mode), Some(dir)) if mode == "__monitor" => {
            let code = tug_agent::runtime::monitor::main(&PathBuf::from(dir));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        _ => {
            eprintln!("usage: tug-agent-test-monitor __monitor STATE_DIR");
            ExitCode::from(2)
        }
    }
}
