//! Running the real tools the test bed is made of (`ip`, `umoci`, `skopeo`, `docker-registry`, ...)
//! with errors that carry the command line and its stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::error::{Error, Result};

/// Every system tool the test bed uses; `e2e/install-deps.sh` installs them all.
pub const REQUIRED_TOOLS: &[&str] = &[
    "ip",
    "iptables",
    "busybox",
    "docker-registry",
    "htpasswd",
    "umoci",
    "skopeo",
    "tar",
    "chroot",
    "openssl",
];

/// The peers only the benchmarks run: `e2e/install-deps.sh` installs them with `--bench`.
const BENCH_TOOLS: &[&str] = &["etcd", "containerd", "ctr", "iperf3"];

/// The full path of `tool` on `PATH`, or a clear error saying how to install it.
pub fn require(tool: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
        .ok_or(Error::MissingTool {
            tool,
            install: install_command(tool),
        })
}

/// What installs `tool`.
fn install_command(tool: &str) -> &'static str {
    if BENCH_TOOLS.contains(&tool) {
        "e2e/install-deps.sh --bench"
    } else {
        "e2e/install-deps.sh"
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A command line as a human would type it, for error messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run to completion; a non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = output(cmd)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::Command {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Run to completion and return the output whatever the exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(std::process::Stdio::null());
    cmd.output().map_err(|source| Error::Io {
        what: format!("cannot run `{}`", describe(cmd)),
        source,
    })
}

/// `program args...`, run, stdout as a trimmed string.
pub fn stdout_of(program: &'static str, args: &[&str]) -> Result<String> {
    let out = run(Command::new(require(program)?).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_peer_names_the_bench_install() {
        let err = Error::MissingTool {
            tool: "etcd",
            install: install_command("etcd"),
        };
        assert_eq!(
            err.to_string(),
            "`etcd` is not installed: run `e2e/install-deps.sh --bench` as root"
        );
        assert_eq!(install_command("umoci"), "e2e/install-deps.sh");
        assert_eq!(install_command("ctr"), "e2e/install-deps.sh --bench");
    }
}
