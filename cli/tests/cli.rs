//! The binary's interface: every role of DESIGN.md is listed; bad settings fail in one line.

use std::process::{Command, Output};

fn tug(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_tug")).args(args).output() {
        Ok(out) => out,
        Err(err) => panic!("cannot run tug: {err}"),
    }
}

#[test]
fn help_lists_every_role_and_command_of_the_design() {
    let out = tug(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "controller",
        "agent",
        "up",
        "apply",
        "get",
        "describe",
        "delete",
        "logs",
        "exec",
        "scale",
        "rollout",
        "nodes",
        "drain",
        "uncordon",
        "run",
        "runtime",
        "image",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "`{cmd}` missing from --help:\n{help}"
        );
    }
    for flag in [
        "--data-dir",
        "--controller",
        "--insecure-registry",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn runtime_help_lists_the_oci_verbs() {
    let out = tug(&["runtime", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for verb in ["create", "start", "state", "kill", "delete", "run"] {
        assert!(help.contains(verb), "{verb} missing from runtime --help");
    }
}

#[test]
fn roles_refuse_bad_settings_in_one_line() {
    for (args, says) in [
        (&["agent", "--join", " "][..], "--join"),
        (&["up", "--listen", "nonsense"][..], "nonsense"),
        (
            &["agent", "--join", "127.0.0.1:1", "--labels", "zone"][..],
            "KEY=VALUE",
        ),
    ] {
        let out = tug(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn bad_usage_is_a_usage_error() {
    let out = tug(&["controller"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--id"));
}

#[test]
fn a_controller_needs_at_least_one_worker_thread() {
    let out = tug(&["controller", "--id", "1", "--worker-threads", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "invalid value '0' for '--worker-threads <WORKER_THREADS>': 0 is not in 1..=1024"
        ),
        "{stderr}"
    );
}

#[test]
fn data_dir_comes_from_the_environment() {
    // The global flags also read TUG_*; a bad value there is reported like a bad flag.
    let out = match Command::new(env!("CARGO_BIN_EXE_tug"))
        .env("TUG_LOG_FORMAT", "xml")
        .arg("nodes")
        .output()
    {
        Ok(out) => out,
        Err(err) => panic!("cannot run tug: {err}"),
    };
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("xml"));
}
