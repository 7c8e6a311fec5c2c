//! The image store against Debian's real registry from the test bed, with images made by umoci
//! and skopeo. Runs as root (overlay mounts).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tug_agent::image::rootfs::is_mounted;
use tug_agent::image::{
    CredentialStore, ImageError, ImageRecord, ImageRef, ImageStore, Platform, Progress, PullEvent,
    StoreConfig, mount_rootfs, remove_rootfs,
};
use tug_e2e::{Registry, RegistryOptions, TestImages};

type TestResult = Result<(), Box<dyn std::error::Error>>;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: ImageStore,
}

fn store_for(
    registry: &Registry,
    credentials: CredentialStore,
) -> Result<Fixture, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("images");
    let mut cfg = StoreConfig::new(&root);
    cfg.insecure_registries = vec![registry.host_port()];
    cfg.credentials = credentials;
    let store = ImageStore::open(cfg)?;
    Ok(Fixture {
        _dir: dir,
        root,
        store,
    })
}

/// Pull, recording every event.
async fn pull(
    store: &ImageStore,
    reference: &str,
    platform: &Platform,
) -> (Result<ImageRecord, ImageError>, Vec<PullEvent>) {
    let events = Mutex::new(Vec::new());
    let sink = |e: PullEvent| {
        if let Ok(mut v) = events.lock() {
            v.push(e)
        }
    };
    let result = match ImageRef::parse(reference) {
        Ok(r) => store.pull(&r, platform, &Progress(&sink)).await,
        Err(e) => Err(e.into()),
    };
    (result, events.into_inner().unwrap_or_default())
}

fn host() -> Platform {
    Platform::host()
}

fn names(dir: &Path) -> Result<Vec<String>, std::io::Error> {
    let mut v: Vec<String> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    v.sort();
    Ok(v)
}

/// Mount the image's rootfs under a temp dir, run `check`, then unmount and clean up.
fn with_rootfs(
    store: &ImageStore,
    record: &ImageRecord,
    check: impl FnOnce(&Path) -> TestResult,
) -> TestResult {
    let container = tempfile::tempdir()?;
    let rootfs = mount_rootfs(&store.layer_dirs(record)?, container.path())?;
    let outcome = check(&rootfs.path);
    remove_rootfs(&rootfs)?;
    assert!(!is_mounted(&rootfs.path)?);
    outcome
}

#[tokio::test]
async fn pulls_oci_and_docker_images_into_a_working_rootfs() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let f = store_for(&registry, CredentialStore::empty())?;
    for image in [&images.oci, &images.docker] {
        let (record, _) = pull(&f.store, &image.reference(&registry), &host()).await;
        let record = record?;
        assert_eq!(record.manifest_digest, image.digest);
        assert_eq!(record.layers.len(), 1);
        with_rootfs(&f.store, &record, |root| {
            assert!(root.join("bin/busybox").is_file());
            assert_eq!(
                fs::read_link(root.join("bin/sh"))?,
                PathBuf::from("/bin/busybox")
            );
            assert!(fs::read_to_string(root.join("etc/passwd"))?.starts_with("root:x:0:0:"));
            Ok(())
        })?;
        let config = f.store.config(&record)?;
        assert_eq!(
            config.config().as_ref().and_then(|c| c.cmd().clone()),
            Some(vec!["/bin/sh".to_string()])
        );
    }
    Ok(())
}

#[tokio::test]
async fn whiteouts_hide_files_and_opaque_dirs_hide_lower_content() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let f = store_for(&registry, CredentialStore::empty())?;
    let record = pull(&f.store, &images.layered.reference(&registry), &host())
        .await
        .0?;
    assert_eq!(record.layers.len(), 3);
    with_rootfs(&f.store, &record, |root| {
        assert!(
            !root.join("etc/removed.txt").exists(),
            "whited-out file visible"
        );
        assert!(root.join("etc/passwd").is_file(), "whiteout hid too much");
        assert_eq!(
            names(&root.join("data/replaced"))?,
            ["new.txt"],
            "opaque dir shows lower content"
        );
        assert_eq!(fs::read_to_string(root.join("data/kept.txt"))?, "kept\n");
        assert_eq!(
            fs::read_to_string(root.join("data/added.txt"))?,
            "from the upper layer\n"
        );
        Ok(())
    })
}

#[tokio::test]
async fn an_index_resolves_to_the_requested_platform() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let f = store_for(&registry, CredentialStore::empty())?;
    let reference = images.multiarch.reference(&registry);
    for (platform, expected) in [
        (Platform::host(), "linux/amd64\n"),
        (Platform::parse("linux/arm64")?, "linux/arm64/v8\n"),
    ] {
        let record = pull(&f.store, &reference, &platform).await.0?;
        assert_eq!(
            record.index_digest.as_deref(),
            Some(images.multiarch.digest.as_str())
        );
        with_rootfs(&f.store, &record, |root| {
            assert_eq!(fs::read_to_string(root.join("etc/tug-platform"))?, expected);
            Ok(())
        })?;
    }
    match pull(&f.store, &reference, &Platform::parse("linux/s390x")?)
        .await
        .0
    {
        Err(err @ ImageError::NoPlatform { .. }) => {
            let text = err.to_string();
            assert!(
                text.contains("linux/s390x")
                    && text.contains("linux/amd64")
                    && text.contains("linux/arm64/v8"),
                "{text}"
            );
        }
        other => panic!("expected NoPlatform, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn pull_by_digest_and_a_wrong_digest_fails() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let f = store_for(&registry, CredentialStore::empty())?;
    let record = pull(&f.store, &images.oci.digest_reference(&registry), &host())
        .await
        .0?;
    assert_eq!(record.manifest_digest, images.oci.digest);
    assert!(record.tag.is_none());
    let by_digest = ImageRef::parse(&images.oci.digest_reference(&registry))?;
    assert_eq!(f.store.get(&by_digest)?.manifest_digest, images.oci.digest);

    let missing = format!(
        "{}/{}@sha256:{}",
        registry.host_port(),
        images.oci.repository,
        "0".repeat(64)
    );
    match pull(&f.store, &missing, &host()).await.0 {
        Err(err @ ImageError::Registry { .. }) => {
            assert!(err.to_string().contains(&"0".repeat(64)), "{err}")
        }
        other => panic!("expected a registry error, got {other:?}"),
    }
    Ok(())
}

fn docker_config(
    dir: &Path,
    registry: &Registry,
    user: &str,
    password: &str,
) -> Result<CredentialStore, Box<dyn std::error::Error>> {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join("config.json");
    fs::write(
        &path,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
            registry.host_port()
        ),
    )?;
    Ok(CredentialStore::load(&path)?)
}

#[tokio::test]
async fn basic_auth_with_right_and_wrong_password() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(
        RegistryOptions::default()
            .with_images()
            .with_auth("tug", "s3cret"),
    )?;
    let creds_dir = tempfile::tempdir()?;
    let reference = images.oci.reference(&registry);

    let good = store_for(
        &registry,
        docker_config(creds_dir.path(), &registry, "tug", "s3cret")?,
    )?;
    assert_eq!(
        pull(&good.store, &reference, &host())
            .await
            .0?
            .manifest_digest,
        images.oci.digest
    );

    for creds in [
        docker_config(creds_dir.path(), &registry, "tug", "wrong")?,
        CredentialStore::empty(),
    ] {
        let bad = store_for(&registry, creds)?;
        match pull(&bad.store, &reference, &host()).await.0 {
            Err(ImageError::Registry { message, .. }) => {
                let m = message.to_lowercase();
                assert!(
                    m.contains("credentials") || m.contains("unauthorized"),
                    "{message}"
                )
            }
            other => panic!("expected an auth failure, got {other:?}"),
        }
        assert!(
            names(&bad.root.join("blobs/sha256"))?.is_empty(),
            "a refused pull stored blobs"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_tampered_blob_is_rejected_and_nothing_is_kept() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let f = store_for(&registry, CredentialStore::empty())?;
    // Find the busybox layer and flip one byte of it in the registry's storage (same size).
    let record = {
        let probe = store_for(&registry, CredentialStore::empty())?;
        pull(&probe.store, &images.oci.reference(&registry), &host())
            .await
            .0?
    };
    let layer = &record.layers[0].digest;
    let data = registry.blob_data_path(layer);
    let mut bytes = fs::read(&data)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&data, &bytes)?;

    match pull(&f.store, &images.oci.reference(&registry), &host())
        .await
        .0
    {
        Err(err @ ImageError::DigestMismatch { .. }) => {
            assert!(err.to_string().contains(layer.as_str()), "{err}")
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    let hex = layer.trim_start_matches("sha256:");
    assert!(
        !f.root.join("blobs/sha256").join(hex).exists(),
        "tampered blob stored"
    );
    assert!(
        names(&f.root.join("ingest"))?.is_empty(),
        "tampered bytes kept in ingest"
    );
    assert!(
        names(&f.root.join("layers"))?.is_empty(),
        "a layer was unpacked"
    );
    assert!(f.store.list()?.is_empty(), "an image record was written");

    // Truncated (shorter than the manifest says): also refused.
    fs::write(&data, &bytes[..mid])?;
    assert!(
        pull(&f.store, &images.oci.reference(&registry), &host())
            .await
            .0
            .is_err()
    );
    assert!(!f.root.join("blobs/sha256").join(hex).exists());
    Ok(())
}

#[tokio::test]
async fn registry_down_mid_pull_is_a_clear_error_and_a_retry_resumes() -> TestResult {
    let images = TestImages::get()?;
    let registry = Mutex::new(Registry::start_with(
        RegistryOptions::default().with_images(),
    )?);
    let (reference, f) = {
        let r = registry.lock().map_err(|_| "lock")?;
        (
            images.layered.reference(&r),
            store_for(&r, CredentialStore::empty())?,
        )
    };
    // Stop the registry as soon as the manifest and config are in: every layer fetch then fails.
    let stop_on_resolve = |e: PullEvent| {
        if matches!(e, PullEvent::Resolved { .. })
            && let Ok(mut r) = registry.lock()
        {
            let _ = r.pause();
        }
    };
    let first = f
        .store
        .pull(
            &ImageRef::parse(&reference)?,
            &host(),
            &Progress(&stop_on_resolve),
        )
        .await;
    match first {
        Err(err) => {
            let text = err.to_string();
            assert!(text.contains("cannot reach registry"), "{text}");
        }
        Ok(r) => panic!("pull succeeded with the registry down: {r:?}"),
    }
    assert!(f.store.list()?.is_empty());

    registry.lock().map_err(|_| "lock")?.restart()?;
    let (second, events) = pull(&f.store, &reference, &host()).await;
    assert_eq!(second?.layers.len(), 3);
    // The config fetched before the outage was kept and reused.
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PullEvent::BlobExists { .. })),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_partial_download_resumes_and_a_bad_partial_starts_over() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let probe = store_for(&registry, CredentialStore::empty())?;
    let layer = pull(&probe.store, &images.oci.reference(&registry), &host())
        .await
        .0?
        .layers[0]
        .clone();
    let hex = layer.digest.trim_start_matches("sha256:").to_string();
    let blob = fs::read(registry.blob_data_path(&layer.digest))?;

    // Half the blob already downloaded: the pull fetches only the rest.
    let f = store_for(&registry, CredentialStore::empty())?;
    fs::write(f.root.join("ingest").join(&hex), &blob[..blob.len() / 2])?;
    let (record, events) = pull(&f.store, &images.oci.reference(&registry), &host()).await;
    record?;
    let first_progress = events.iter().find_map(|e| match e {
        PullEvent::BlobProgress { digest, done, .. } if digest.hex() == hex => Some(*done),
        _ => None,
    });
    assert_eq!(
        first_progress,
        Some(blob.len() as u64 / 2),
        "did not resume at the offset"
    );
    assert_eq!(fs::read(f.root.join("blobs/sha256").join(&hex))?, blob);

    // Garbage where the first half should be: detected, discarded, downloaded again.
    let g = store_for(&registry, CredentialStore::empty())?;
    fs::write(g.root.join("ingest").join(&hex), vec![0u8; blob.len() / 2])?;
    pull(&g.store, &images.oci.reference(&registry), &host())
        .await
        .0?;
    assert_eq!(fs::read(g.root.join("blobs/sha256").join(&hex))?, blob);
    Ok(())
}

#[tokio::test]
async fn shared_layers_are_stored_and_unpacked_once() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let f = store_for(&registry, CredentialStore::empty())?;
    let oci = pull(&f.store, &images.oci.reference(&registry), &host())
        .await
        .0?;
    let (docker, events) = pull(&f.store, &images.docker.reference(&registry), &host()).await;
    let docker = docker?;
    let layered = pull(&f.store, &images.layered.reference(&registry), &host())
        .await
        .0?;

    // skopeo's schema2 conversion keeps the layer blob; the layered image is built on busybox.
    assert_eq!(
        (&oci.layers[0].digest, &oci.layers[0].chain_id),
        (&docker.layers[0].digest, &docker.layers[0].chain_id)
    );
    assert_eq!(oci.layers[0].chain_id, layered.layers[0].chain_id);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, PullEvent::LayerUnpacked { .. })),
        "unpacked a layer twice"
    );
    assert!(events.iter().any(
        |e| matches!(e, PullEvent::BlobExists { digest, .. } if digest.to_string() == oci.layers[0].digest)
    ));
    assert_eq!(
        names(&f.root.join("layers"))?.len(),
        3,
        "busybox + 2 layered layers"
    );
    let layer_blobs: HashSet<&str> = [&oci, &docker, &layered]
        .iter()
        .flat_map(|r| r.layers.iter().map(|l| l.digest.as_str()))
        .collect();
    assert_eq!(layer_blobs.len(), 3);
    assert_eq!(f.store.list()?.len(), 3);
    Ok(())
}

#[tokio::test]
async fn concurrent_pulls_of_one_image_do_the_work_once() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let f = store_for(&registry, CredentialStore::empty())?;
    let reference = images.layered.reference(&registry);
    let platform = host();
    let ((a, ea), (b, eb)) = tokio::join!(
        pull(&f.store, &reference, &platform),
        pull(&f.store, &reference, &platform)
    );
    assert_eq!(a?.layers, b?.layers);
    let fetched = |events: &[PullEvent]| {
        events
            .iter()
            .filter(|e| matches!(e, PullEvent::BlobDone { .. }))
            .count()
    };
    let unpacked = |events: &[PullEvent]| {
        events
            .iter()
            .filter(|e| matches!(e, PullEvent::LayerUnpacked { .. }))
            .count()
    };
    assert_eq!(
        fetched(&ea) + fetched(&eb),
        4,
        "3 layers + config fetched once in all"
    );
    assert_eq!(unpacked(&ea) + unpacked(&eb), 3);
    Ok(())
}

#[tokio::test]
async fn containers_never_modify_image_layers() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let f = store_for(&registry, CredentialStore::empty())?;
    let record = pull(&f.store, &images.oci.reference(&registry), &host())
        .await
        .0?;
    let layer = f.store.layer_dirs(&record)?[0].clone();
    let passwd = fs::read(layer.join("etc/passwd"))?;

    let container = tempfile::tempdir()?;
    let rootfs = mount_rootfs(&f.store.layer_dirs(&record)?, container.path())?;
    fs::write(rootfs.path.join("etc/passwd"), "changed\n")?;
    fs::remove_file(rootfs.path.join("bin/ls"))?;
    fs::write(rootfs.path.join("new-file"), "x")?;
    assert!(
        mount_rootfs(&f.store.layer_dirs(&record)?, container.path()).is_err(),
        "mounted twice"
    );
    remove_rootfs(&rootfs)?;

    assert_eq!(fs::read(layer.join("etc/passwd"))?, passwd);
    assert!(fs::symlink_metadata(layer.join("bin/ls")).is_ok());
    assert!(!layer.join("new-file").exists());
    with_rootfs(&f.store, &record, |root| {
        assert_eq!(
            fs::read(root.join("etc/passwd"))?,
            passwd,
            "a new container sees the image as it was"
        );
        Ok(())
    })
}

#[tokio::test]
async fn prune_removes_only_what_nothing_uses() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let f = store_for(&registry, CredentialStore::empty())?;
    let oci = pull(&f.store, &images.oci.reference(&registry), &host())
        .await
        .0?;
    let layered = pull(&f.store, &images.layered.reference(&registry), &host())
        .await
        .0?;

    // In use by a mounted rootfs: kept even after its name is removed.
    let container = tempfile::tempdir()?;
    let rootfs = mount_rootfs(&f.store.layer_dirs(&layered)?, container.path())?;
    f.store
        .remove(&ImageRef::parse(&images.layered.reference(&registry))?)?;
    let stats = f.store.prune(&HashSet::new())?;
    assert_eq!(stats.layers, 0, "removed a mounted layer");
    assert_eq!(
        stats.blobs, 4,
        "its 2 layer blobs, manifest and config: {stats:?}"
    );
    assert_eq!(names(&f.root.join("layers"))?.len(), 3);
    remove_rootfs(&rootfs)?;

    let stats = f.store.prune(&HashSet::new())?;
    assert_eq!(stats.layers, 2, "the two layers only the layered image had");
    assert_eq!(stats.blobs, 0);
    assert_eq!(
        f.store.layer_dirs(&oci)?.len(),
        1,
        "the busybox layer is still used"
    );
    let kept = names(&f.root.join("blobs/sha256"))?;
    for blob in oci.blobs() {
        assert!(
            kept.contains(&blob.trim_start_matches("sha256:").to_string()),
            "pruned {blob}"
        );
    }
    assert!(
        f.store
            .get(&ImageRef::parse(&images.layered.reference(&registry))?)
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn bearer_token_challenge_flow() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(
        RegistryOptions::default()
            .with_images()
            .with_token_auth("tug", "t0ken"),
    )?;
    let challenge = registry.get_anonymous("/v2/", &[])?;
    assert_eq!(challenge.status, 401);
    let header = challenge
        .header("WWW-Authenticate")
        .unwrap_or_default()
        .to_string();
    assert!(header.starts_with("Bearer realm="), "{header}");

    let creds_dir = tempfile::tempdir()?;
    let reference = images.oci.reference(&registry);
    let good = store_for(
        &registry,
        docker_config(creds_dir.path(), &registry, "tug", "t0ken")?,
    )?;
    assert_eq!(
        pull(&good.store, &reference, &host())
            .await
            .0?
            .manifest_digest,
        images.oci.digest
    );
    let asked = registry.token_server().ok_or("no token server")?.requests();
    assert!(
        asked
            .iter()
            .any(|u| u.contains("scope=repository") && u.contains("busybox") && u.contains("pull")),
        "token server never asked for the pull scope: {asked:?}"
    );

    let bad = store_for(
        &registry,
        docker_config(creds_dir.path(), &registry, "tug", "nope")?,
    )?;
    match pull(&bad.store, &reference, &host()).await.0 {
        Err(err @ ImageError::Registry { .. }) => {
            assert!(err.to_string().contains("refused the credentials"), "{err}")
        }
        other => panic!("expected an auth failure, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn redirects_to_blob_storage_are_followed() -> TestResult {
    let images = TestImages::get()?;
    let registry = Registry::start_with(RegistryOptions::default().with_images())?;
    let front = tug_e2e::redirect::RedirectingFront::start(&registry)?;
    let dir = tempfile::tempdir()?;
    let mut cfg = StoreConfig::new(dir.path().join("images"));
    cfg.insecure_registries = vec![front.host_port(), registry.host_port()];
    let store = ImageStore::open(cfg)?;
    let reference = format!("{}/{}", front.host_port(), images.layered.repo_tag());
    let record = pull(&store, &reference, &host()).await.0?;
    assert_eq!(record.manifest_digest, images.layered.digest);
    assert!(
        front.redirects() >= 4,
        "config and 3 layers redirected: {}",
        front.redirects()
    );
    Ok(())
}
