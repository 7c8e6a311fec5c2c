//! Tests of the test bed itself: the registry, the images, the hosts. Run as root (CI does).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tug_e2e::images::{DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use tug_e2e::{Registry, RegistryOptions, TestImages, TestNet};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn registry_answers_v2_and_stops_by_pid() -> TestResult {
    let registry = Registry::start()?;
    let resp = registry.get("/v2/", &[])?;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("Docker-Distribution-Api-Version"),
        Some("registry/2.0")
    );
    assert!(registry.addr().ip().is_loopback());
    let pid = registry.pid();
    let storage = registry.storage_dir();
    assert!(pid_alive(pid));
    registry.stop(Duration::from_secs(5))?;
    assert!(!pid_alive(pid), "registry {pid} still running after stop");
    assert!(!storage.exists(), "storage dir left behind");
    Ok(())
}

#[test]
fn registry_with_htpasswd_requires_basic_auth() -> TestResult {
    let registry = Registry::start_with(RegistryOptions::default().with_auth("tug", "s3cret"))?;
    let anon = registry.get_anonymous("/v2/", &[])?;
    assert_eq!(anon.status, 401);
    let challenge = anon.header("WWW-Authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Basic realm="), "{challenge}");
    assert_eq!(registry.get("/v2/", &[])?.status, 200);
    let wrong = tug_e2e::Credentials {
        username: "tug".into(),
        password: "nope".into(),
    };
    let bad = registry.get_anonymous("/v2/", &[("Authorization", &wrong.basic_header())])?;
    assert_eq!(bad.status, 401);
    Ok(())
}

fn manifest_json(
    registry: &Registry,
    repo: &str,
    reference: &str,
) -> Result<(String, serde_json::Value, String), Box<dyn std::error::Error>> {
    let resp = registry.manifest(repo, reference)?;
    assert_eq!(
        resp.status,
        200,
        "{repo}:{reference}: {}",
        String::from_utf8_lossy(&resp.body)
    );
    let content_type = resp.header("Content-Type").unwrap_or_default().to_string();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&resp.body)));
    assert_eq!(resp.header("Docker-Content-Digest"), Some(digest.as_str()));
    Ok((content_type, resp.json()?, digest))
}

/// A blob, checked against its digest.
fn blob(
    registry: &Registry,
    repo: &str,
    digest: &str,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let resp = registry.get(&format!("/v2/{repo}/blobs/{digest}"), &[])?;
    assert_eq!(resp.status, 200, "blob {digest}");
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&resp.body))),
        digest
    );
    Ok(resp.body)
}

fn tar_entries(gzipped: &[u8]) -> Result<BTreeSet<String>, Box<dyn std::error::Error>> {
    let mut child = Command::new("tar")
        .args(["-tzf", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or("no stdin")?.write_all(gzipped)?;
    let out = child.wait_with_output()?;
    assert!(out.status.success(), "tar -tz failed");
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(|l| l.trim_end_matches('/').to_string())
        .collect())
}

#[test]
fn test_images_have_the_expected_media_types_and_layers() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;

    // (a) OCI, one gzip layer holding busybox and its applet links.
    let (ct, m, digest) = manifest_json(&registry, &images.oci.repository, &images.oci.tag)?;
    assert_eq!(ct, OCI_MANIFEST);
    assert_eq!(digest, images.oci.digest);
    let layers = m["layers"].as_array().ok_or("no layers")?;
    assert_eq!(layers.len(), 1);
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer_digest = layers[0]["digest"].as_str().ok_or("digest")?;
    let entries = tar_entries(&blob(&registry, &images.oci.repository, layer_digest)?)?;
    for path in ["bin/busybox", "bin/sh", "etc/passwd", "etc/group"] {
        assert!(entries.contains(path), "{path} missing from busybox layer");
    }
    let config = blob(
        &registry,
        &images.oci.repository,
        m["config"]["digest"].as_str().ok_or("config")?,
    )?;
    let config: serde_json::Value = serde_json::from_slice(&config)?;
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["/bin/sh"]));

    // The same image by digest.
    let (_, _, by_digest) = manifest_json(&registry, &images.oci.repository, &images.oci.digest)?;
    assert_eq!(by_digest, images.oci.digest);

    // (b) Docker v2 schema2.
    let (ct, m, digest) = manifest_json(&registry, &images.docker.repository, &images.docker.tag)?;
    assert_eq!(ct, DOCKER_MANIFEST);
    assert_eq!(digest, images.docker.digest);
    assert_eq!(m["layers"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );

    // (c) layered: the top layer deletes a file and replaces a directory.
    let (ct, m, _) = manifest_json(&registry, &images.layered.repository, &images.layered.tag)?;
    assert_eq!(ct, OCI_MANIFEST);
    let layers = m["layers"].as_array().ok_or("no layers")?;
    assert_eq!(layers.len(), 3);
    let lower = tar_entries(&blob(
        &registry,
        &images.layered.repository,
        layers[1]["digest"].as_str().ok_or("d")?,
    )?)?;
    assert!(
        lower.contains("etc/removed.txt") && lower.contains("data/replaced/old-a.txt"),
        "{lower:?}"
    );
    let upper = tar_entries(&blob(
        &registry,
        &images.layered.repository,
        layers[2]["digest"].as_str().ok_or("d")?,
    )?)?;
    assert!(
        upper.contains("etc/.wh.removed.txt"),
        "no whiteout in {upper:?}"
    );
    assert!(
        upper.contains("data/replaced/.wh..wh..opq"),
        "no opaque whiteout in {upper:?}"
    );
    assert!(upper.contains("data/replaced/new.txt"), "{upper:?}");

    // (d) an index with amd64 and arm64 entries, each a pullable manifest of that platform.
    let (ct, index, digest) = manifest_json(
        &registry,
        &images.multiarch.repository,
        &images.multiarch.tag,
    )?;
    assert_eq!(ct, OCI_INDEX);
    assert_eq!(digest, images.multiarch.digest);
    let entries = index["manifests"].as_array().ok_or("no manifests")?;
    let platforms: Vec<(String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["platform"]["architecture"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                e["digest"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        platforms.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        ["amd64", "arm64"]
    );
    for (arch, digest) in &platforms {
        let (ct, m, _) = manifest_json(&registry, &images.multiarch.repository, digest)?;
        assert_eq!(ct, OCI_MANIFEST);
        assert_eq!(m["layers"].as_array().map(Vec::len), Some(2));
        let config = blob(
            &registry,
            &images.multiarch.repository,
            m["config"]["digest"].as_str().ok_or("config")?,
        )?;
        let config: serde_json::Value = serde_json::from_slice(&config)?;
        assert_eq!(config["architecture"], arch.as_str());
    }

    // The unpacked rootfs is there for runtime tests.
    assert!(images.rootfs().join("bin/busybox").is_file());
    Ok(())
}

#[test]
fn skopeo_pushes_into_an_authenticated_registry() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_auth("pusher", "pw"))?;
    let digest = images.push(&images.oci, &registry)?;
    assert_eq!(
        digest, images.oci.digest,
        "same content, same manifest digest"
    );
    let (ct, _, _) = manifest_json(&registry, &images.oci.repository, &images.oci.tag)?;
    assert_eq!(ct, OCI_MANIFEST);
    assert_eq!(
        registry
            .get_anonymous(&format!("/v2/{}/tags/list", images.oci.repository), &[])?
            .status,
        401
    );
    Ok(())
}

fn root_namespace_state() -> Result<(String, String), Box<dyn std::error::Error>> {
    let links = Command::new("ip").args(["-o", "link", "show"]).output()?;
    let routes = Command::new("ip")
        .args(["route", "show", "table", "all"])
        .output()?;
    let names: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_string()))
        .collect();
    Ok((
        names.join(","),
        String::from_utf8_lossy(&routes.stdout).into_owned(),
    ))
}

#[test]
fn hosts_reach_each_other_a_cut_host_cannot_and_heals() -> TestResult {
    let before = root_namespace_state()?;
    let net = TestNet::new(3)?;
    assert_eq!(
        root_namespace_state()?,
        before,
        "the test network touched the root namespace"
    );
    let (h0, h1, h2) = (net.host(0), net.host(1), net.host(2));
    assert_ne!(h0.addr(), h1.addr());
    assert!(h0.ping(h1.addr())?, "h0 cannot ping h1");
    assert!(h1.ping(h2.addr())?, "h1 cannot ping h2");

    net.cut(h1)?;
    assert!(!h0.ping(h1.addr())?, "cut host still answers");
    assert!(!h1.ping(h2.addr())?, "cut host still reaches out");
    assert!(h0.ping(h2.addr())?, "the others lost each other");

    net.heal(h1)?;
    assert!(h0.ping(h1.addr())?, "healed host unreachable");

    net.partition(h0, h2)?;
    assert!(!h0.ping(h2.addr())?);
    assert!(!h2.ping(h0.addr())?);
    assert!(
        h0.ping(h1.addr())? && h2.ping(h1.addr())?,
        "partition cut too much"
    );
    net.unpartition(h0, h2)?;
    assert!(h0.ping(h2.addr())?);
    Ok(())
}

#[test]
fn processes_run_inside_hosts_and_talk_across_them() -> TestResult {
    let net = TestNet::new(2)?;
    let (h0, h1) = (net.host(0), net.host(1));
    let www = tempfile::tempdir()?;
    std::fs::write(www.path().join("index.html"), "hello from h0\n")?;
    let docroot = www.path().to_string_lossy().into_owned();
    let server = h0.spawn(&["busybox", "httpd", "-f", "-p", "8080", "-h", &docroot])?;
    let url = format!("http://{}:8080/index.html", h0.addr());
    let mut fetched = None;
    for _ in 0..100 {
        let out = h1.output(&["timeout", "2", "busybox", "wget", "-q", "-O", "-", &url])?;
        if out.status.success() {
            fetched = Some(String::from_utf8(out.stdout)?);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fetched.as_deref(), Some("hello from h0\n"));

    // The server lives in h0's namespace, not in the test process's.
    assert!(h0.netns().pids()?.contains(&(server.pid() as i32)));
    // The test process itself can open connections from inside a host.
    let mut conn = h1.connect(SocketAddr::from((h0.addr(), 8080)), Duration::from_secs(2))?;
    conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    assert!(reply.contains("hello from h0"), "{reply}");

    let pid = server.pid();
    drop(server);
    assert!(!pid_alive(pid));
    Ok(())
}

#[test]
fn registry_on_a_host_serves_every_host() -> TestResult {
    let mut net = TestNet::new(2)?;
    net.add_host("reg")?;
    let reg_host = net.by_name("reg").ok_or("no reg host")?;
    let registry = Registry::start_on(reg_host, RegistryOptions::default().with_images())?;
    assert_eq!(registry.addr().ip(), reg_host.addr());

    let images = TestImages::get()?;
    let url = format!(
        "http://{}/v2/{}/manifests/{}",
        registry.host_port(),
        images.oci.repository,
        images.oci.tag
    );
    let accept = format!("Accept: {}", tug_e2e::registry::MANIFEST_ACCEPT);
    for host in [net.host(0), net.host(1)] {
        let out = host.output(&[
            "timeout", "3", "busybox", "wget", "-q", "--header", &accept, "-O", "-", &url,
        ])?;
        assert!(
            out.status.success(),
            "{} cannot pull: {}",
            host.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        // umoci writes OCI manifests without the optional `mediaType` field: the registry's
        // Content-Type (checked through `Registry::manifest` below) is what names the type.
        let m: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(m["schemaVersion"], 2);
        assert_eq!(m["layers"].as_array().map(Vec::len), Some(1));
    }
    // The test process reaches it too, through the registry's namespace.
    assert_eq!(registry.get("/v2/", &[])?.status, 200);
    let (ct, _, digest) = manifest_json(&registry, &images.oci.repository, &images.oci.tag)?;
    assert_eq!(
        (ct.as_str(), digest.as_str()),
        (OCI_MANIFEST, images.oci.digest.as_str())
    );

    net.cut(reg_host)?;
    let out = net
        .host(0)
        .output(&["timeout", "2", "busybox", "wget", "-q", "-O", "-", &url])?;
    assert!(
        !out.status.success(),
        "registry reachable from a cut-off host"
    );
    Ok(())
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn everything_is_removed_when_a_test_panics() -> TestResult {
    let mut names = Vec::new();
    let mut pid = 0;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> TestResult {
        let mut net = TestNet::new(2)?;
        net.add_host("reg")?;
        let registry =
            Registry::start_on(net.by_name("reg").ok_or("reg")?, RegistryOptions::default())?;
        pid = registry.pid();
        names = net
            .hosts()
            .iter()
            .map(|h| h.netns().name().to_string())
            .collect();
        names.push(net.bridge_netns().name().to_string());
        assert!(names.iter().all(|n| netns_exists(n)));
        panic!("simulated test failure");
    }));
    assert!(outcome.is_err(), "the closure should have panicked");
    assert_eq!(names.len(), 4);
    for name in &names {
        assert!(!netns_exists(name), "{name} left behind");
    }
    assert!(pid != 0 && !pid_alive(pid), "registry {pid} left running");
    Ok(())
}

#[test]
fn namespaces_of_dead_test_processes_are_swept() -> TestResult {
    // A PID that certainly belongs to no live process: a child we started and reaped.
    let mut child = Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    let name = format!("{}{dead}-0-stale", tug_e2e::netns::PREFIX);
    let status = Command::new("ip").args(["netns", "add", &name]).status()?;
    assert!(status.success());
    tug_e2e::netns::sweep_stale();
    let left = netns_exists(&name);
    if left {
        let _ = Command::new("ip").args(["netns", "delete", &name]).status();
    }
    assert!(!left, "stale namespace {name} not swept");
    Ok(())
}
