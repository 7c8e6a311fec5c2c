//! `tug image ...` through the binary, against the test bed's real registry.

use std::process::{Command, Output};

use tug_e2e::{Registry, RegistryOptions, TestImages};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn tug(
    data: &std::path::Path,
    registry: &Registry,
    args: &[&str],
) -> Result<Output, std::io::Error> {
    Command::new(env!("CARGO_BIN_EXE_tug"))
        .arg("--data-dir")
        .arg(data)
        .args(["--insecure-registry", &registry.host_port()])
        .args(args)
        .env("DOCKER_CONFIG", data.join("no-docker-config"))
        .output()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn pull_list_inspect_remove_prune() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let data = tempfile::tempdir()?;
    let layered = images.layered.reference(&registry);

    let out = tug(data.path(), &registry, &["image", "pull", &layered])?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("3 layers"), "{stdout}");
    assert!(
        stdout.contains("unpacked"),
        "no per-layer progress: {stdout}"
    );
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with(&format!("pulled {layered} ("))),
        "{stdout}"
    );

    let out = tug(data.path(), &registry, &["image", "ls"])?;
    let (stdout, _) = text(&out);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("DIGEST") && lines[0].contains("SIZE")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("tug-test/layered") && l.contains(&images.layered.digest[7..19])),
        "{stdout}"
    );

    let out = tug(data.path(), &registry, &["image", "inspect", &layered])?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["config"]["cmd"], serde_json::json!(["/bin/sh"]));
    assert_eq!(doc["layers"].as_array().map(Vec::len), Some(3));

    let out = tug(data.path(), &registry, &["image", "rm", &layered])?;
    assert!(out.status.success());
    let out = tug(data.path(), &registry, &["image", "prune"])?;
    let (stdout, _) = text(&out);
    assert!(stdout.contains("3 layers"), "{stdout}");
    let out = tug(data.path(), &registry, &["image", "inspect", &layered])?;
    assert!(!out.status.success());
    Ok(())
}

#[test]
fn mistakes_are_one_line_errors_that_change_nothing() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let data = tempfile::tempdir()?;
    let multiarch = images.multiarch.reference(&registry);
    for (args, needle) in [
        (
            vec!["image", "pull", "Not A Ref"],
            "invalid image reference",
        ),
        (
            vec!["image", "pull", "--platform", "linux", &multiarch],
            "invalid platform",
        ),
        (
            vec!["image", "pull", "--platform", "linux/s390x", &multiarch],
            "linux/arm64/v8",
        ),
        (
            vec!["image", "pull", "127.0.0.1:1/nothing:here"],
            "cannot reach registry",
        ),
        (vec!["image", "rm", "never/pulled"], "not in the store"),
    ] {
        let out = tug(data.path(), &registry, &args)?;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout}{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let out = tug(data.path(), &registry, &["image", "ls"])?;
    assert_eq!(
        text(&out).0.lines().count(),
        1,
        "only the header: nothing was stored"
    );
    Ok(())
}
