//! Pull and unpack the same multi-layer image (about 50 MB unpacked) from a local registry with
//! tug, with `skopeo copy` + `umoci unpack`, and with containerd's `ctr image pull`, cold each
//! time; print medians and ratios, and how far tug is from the loopback download limit and from
//! the unpack limit (`tar -xzf` of every layer, all in parallel).
//!
//! Before each timed run the machine's dirty data is written out (`sync`), so that no contender
//! pays, in its own writes or fsyncs, for the disk writes the one before it left behind, and
//! every blob is fetched once from the registry, so that each contender finds the registry's
//! files in the page cache (this machine pages out memory idle for a few seconds: DAMON).
//! What the contenders wrote is deleted only at the end: this machine's ext4 has no journal, and
//! without one ext4 steps over every inode deleted in the last 30 seconds when it creates a
//! file, so a contender that ran right after the deletion of the one before it would create
//! its files several times slower.
//!
//! Run: `e2e/bench.sh pull` (builds release binaries, installs the peers).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use tug_e2e::bench::{Samples, report};
use tug_e2e::bench_image::BenchImage;
use tug_e2e::peers::Containerd;
use tug_e2e::{Registry, RegistryOptions, exec};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-pull: {err}");
            ExitCode::FAILURE
        }
    }
}

fn tug_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let tug = exe.with_file_name("tug");
    if tug.is_file() {
        Ok(tug)
    } else {
        Err(format!(
            "{} not found: build it first (cargo build --release -p tug)",
            tug.display()
        )
        .into())
    }
}

fn check(out: std::process::Output, what: &str) -> Result<()> {
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into())
    }
}

fn run() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let tug = tug_binary()?;
    let image = BenchImage::get()?;
    let registry = Registry::start_with(RegistryOptions::default())?;
    let reference = image.push(&registry)?;
    let host = registry.host_port();
    println!(
        "image {reference}: {} files, {:.1} MB unpacked; {runs} cold runs each\n",
        image.files,
        image.unpacked_bytes as f64 / 1e6
    );

    let mut ours = Samples::new("tug image pull");
    let mut skopeo = Samples::new("skopeo copy + umoci unpack");
    let mut ctr = Samples::new("containerd: ctr image pull");
    let mut download = Samples::new("limit: download all blobs");
    let mut untar = Samples::new("limit: tar -xzf all layers");
    let layers = layer_blobs(&registry)?;
    let mut keep = Vec::new();
    let mut daemons = Vec::new();
    for _ in 0..runs {
        let data = tempfile::tempdir()?;
        settle(&registry, &layers)?;
        ours.time(|| {
            check(
                Command::new(&tug)
                    .arg("--data-dir")
                    .arg(data.path())
                    .args(["--insecure-registry", &host, "image", "pull", &reference])
                    .output()?,
                "tug image pull",
            )
        })?;

        let dir = tempfile::tempdir()?;
        let layout = format!("oci:{}/layout:bench", dir.path().display());
        settle(&registry, &layers)?;
        skopeo.time(|| -> Result<()> {
            check(
                Command::new("skopeo")
                    .args([
                        "--insecure-policy",
                        "copy",
                        "--quiet",
                        "--src-tls-verify=false",
                        &format!("docker://{reference}"),
                        &layout,
                    ])
                    .output()?,
                "skopeo copy",
            )?;
            check(
                Command::new("umoci")
                    .args([
                        "unpack",
                        "--image",
                        &format!("{}/layout:bench", dir.path().display()),
                    ])
                    .arg(dir.path().join("bundle"))
                    .output()?,
                "umoci unpack",
            )
        })?;

        let mut containerd = Containerd::start()?;
        settle(&registry, &layers)?;
        ctr.time(|| {
            check(
                containerd.ctr(&["image", "pull", "--plain-http", &reference])?,
                "ctr image pull",
            )
        })?;
        containerd.stop();
        daemons.push(containerd);

        settle(&registry, &layers)?;
        download.time(|| fetch_all(&registry, &layers))?;
        let blobs = fetch_all_to_disk(&registry, &layers)?;
        settle(&registry, &layers)?;
        let mut untarred = None;
        untar.time(|| untar_all(&blobs.1).map(|out| untarred = Some(out)))?;
        keep.extend([data, dir, blobs.0]);
        keep.extend(untarred);
    }
    println!(
        "{}",
        report(
            "pull + unpack, cold (lower is better)",
            &[ours.clone(), skopeo, ctr, download.clone(), untar.clone()]
        )
    );
    let floor = download.median().max(untar.median()).as_secs_f64();
    println!(
        "tug takes {:.2}x the larger of the two limits (download {:.0} ms, unpack {:.0} ms): the rest is digest checks, whiteouts, metadata and bookkeeping (the pull itself does not fsync: agent/src/image/durability.rs).",
        ours.median().as_secs_f64() / floor,
        download.median().as_secs_f64() * 1e3,
        untar.median().as_secs_f64() * 1e3,
    );
    Ok(())
}

/// Write out every filesystem's dirty data and bring the registry's blobs into the page cache
/// (see the module's documentation).
fn settle(registry: &Registry, layers: &[String]) -> Result<()> {
    nix::unistd::sync();
    fetch_all(registry, layers)
}

/// `/v2/<repo>/blobs/<digest>` paths of the image's layers.
fn layer_blobs(registry: &Registry) -> Result<Vec<String>> {
    let m = registry.manifest("tug-test/bench", "bench")?.json()?;
    Ok(m["layers"]
        .as_array()
        .ok_or("manifest without layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str())
        .map(|d| format!("/v2/tug-test/bench/blobs/{d}"))
        .collect())
}

fn fetch_all(registry: &Registry, paths: &[String]) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .iter()
            .map(|p| s.spawn(move || registry.get(p, &[]).map(|r| r.body.len())))
            .collect();
        for h in handles {
            h.join().map_err(|_| "download thread panicked")??;
        }
        Ok(())
    })
}

fn fetch_all_to_disk(
    registry: &Registry,
    paths: &[String],
) -> Result<(tempfile::TempDir, Vec<PathBuf>)> {
    let dir = tempfile::tempdir()?;
    let mut files = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let f = dir.path().join(format!("{i}.tar.gz"));
        std::fs::write(&f, registry.get(p, &[])?.body)?;
        files.push(f);
    }
    Ok((dir, files))
}

/// Unpack every layer in parallel into a new directory (returned, to be deleted later).
fn untar_all(blobs: &[PathBuf]) -> Result<tempfile::TempDir> {
    let out = tempfile::tempdir()?;
    std::thread::scope(|s| {
        let handles: Vec<_> = blobs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let dest = out.path().join(i.to_string());
                s.spawn(move || -> std::result::Result<(), String> {
                    std::fs::create_dir(&dest).map_err(|e| e.to_string())?;
                    exec::run(Command::new("tar").arg("-xzf").arg(b).arg("-C").arg(&dest))
                        .map_err(|e| e.to_string())?;
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "tar thread panicked")??;
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    Ok(out)
}
