//! Test images made with the real tools, from Debian's `busybox-static`: `umoci` builds them as an
//! OCI layout, `skopeo` pushes them into a real registry.
//!
//! | image | what | layers |
//! |---|---|---|
//! | `tug-test/busybox:oci` | OCI manifest, one gzip layer (busybox + applet links, passwd/group) | 1 |
//! | `tug-test/busybox:docker` | the same converted to Docker v2 schema2 (`--format v2s2`) | 1 |
//! | `tug-test/layered:latest` | busybox, a layer adding files, a layer with a whiteout (`etc/.wh.removed.txt`) and an opaque whiteout (`data/replaced/.wh..wh..opq`) | 3 |
//! | `tug-test/multiarch:latest` | OCI index with a `linux/amd64` and a `linux/arm64/v8` entry; each adds `/etc/tug-platform` naming its platform | 2 each |
//!
//! The arm64 entry carries the same (amd64) busybox binary: it exists to test platform
//! resolution, and `/etc/tug-platform` shows which entry was chosen.
//!
//! umoci's output is not reproducible (timestamps), so the build is cached by its inputs (recipe
//! version, busybox binary, tool versions) under `target/tug-e2e-cache`, once for all test
//! processes (a file lock serialises concurrent builders). The cache also keeps a registry storage
//! tree holding all four, which `Registry` copies to start pre-loaded in milliseconds.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::exec::{self, require};
use crate::registry::Registry;

/// Bump when anything below changes what gets built.
const RECIPE_VERSION: &str = "tug-e2e-images-1";
const LAYOUT_DIR: &str = "oci";
const ROOTFS_DIR: &str = "rootfs";
const STORAGE_DIR: &str = "registry-storage";
const INDEX_FILE: &str = "images.json";

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// One image as pushed to the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestImage {
    /// Repository path inside a registry, e.g. `tug-test/busybox`.
    pub repository: String,
    pub tag: String,
    /// Digest of the manifest (or index) as stored in the registry.
    pub digest: String,
    pub media_type: String,
    /// Layer count of the manifest; 0 for an index.
    pub layers: usize,
    /// `os/arch[/variant]` of each platform it offers.
    pub platforms: Vec<String>,
    /// Tag of this image in the cached OCI layout.
    pub layout_tag: String,
}

impl TestImage {
    /// `repository:tag`.
    pub fn repo_tag(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }

    /// `HOST:PORT/repository:tag` in `registry`.
    pub fn reference(&self, registry: &Registry) -> String {
        registry.reference(&self.repo_tag())
    }

    /// `HOST:PORT/repository@sha256:...` in `registry`.
    pub fn digest_reference(&self, registry: &Registry) -> String {
        format!(
            "{}/{}@{}",
            registry.host_port(),
            self.repository,
            self.digest
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Catalog {
    oci: TestImage,
    docker: TestImage,
    layered: TestImage,
    multiarch: TestImage,
}

/// The built test images (see the module docs).
#[derive(Debug)]
pub struct TestImages {
    root: PathBuf,
    pub oci: TestImage,
    pub docker: TestImage,
    pub layered: TestImage,
    pub multiarch: TestImage,
}

static IMAGES: OnceLock<std::result::Result<TestImages, String>> = OnceLock::new();

impl TestImages {
    /// The test images, built on first use in this run (or found in the cache).
    pub fn get() -> Result<&'static TestImages> {
        IMAGES
            .get_or_init(|| load_or_build().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Images(e.clone()))
    }

    pub fn all(&self) -> [&TestImage; 4] {
        [&self.oci, &self.docker, &self.layered, &self.multiarch]
    }

    /// The OCI image layout holding every image (tags: `busybox`, `layered`, `multiarch`, ...).
    pub fn layout(&self) -> PathBuf {
        self.root.join(LAYOUT_DIR)
    }

    /// The busybox image's root filesystem, unpacked (read-only: copy or overlay it).
    pub fn rootfs(&self) -> PathBuf {
        self.root.join(ROOTFS_DIR)
    }

    /// Copy the pre-loaded registry storage tree to `dest` (which must not exist).
    pub fn copy_registry_storage(&self, dest: &Path) -> Result<()> {
        exec::run(
            Command::new(require("cp")?)
                .arg("-a")
                .arg(self.root.join(STORAGE_DIR))
                .arg(dest),
        )?;
        Ok(())
    }

    /// Push `image` into `registry` with skopeo, as a user would (with its credentials, from
    /// inside its namespace if it runs on a test host). Returns the pushed digest.
    pub fn push(&self, image: &TestImage, registry: &Registry) -> Result<String> {
        push_layout(&self.layout(), image, registry)
    }
}

pub(crate) fn cache_root() -> PathBuf {
    match std::env::var_os("TUG_E2E_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tug-e2e-cache"),
    }
}

fn load_or_build() -> Result<TestImages> {
    let root = cache_root();
    fs::create_dir_all(&root).ctx(|| format!("create {}", root.display()))?;
    let key = cache_key()?;
    let dir = root.join(format!("images-{}", &key[..16]));

    let lock_path = root.join("lock");
    let lock_file =
        fs::File::create(&lock_path).ctx(|| format!("create {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .ctx(|| format!("lock {}", lock_path.display()))?;

    if !dir.join(INDEX_FILE).exists() {
        let started = Instant::now();
        remove_other_builds(&root, &dir);
        let tmp = root.join(format!("building-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).ctx(|| format!("remove {}", tmp.display()))?;
        }
        fs::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        let built = build(&tmp).and_then(|catalog| {
            let json = serde_json::to_vec_pretty(&catalog).map_err(|source| Error::Json {
                what: "image catalog".into(),
                source,
            })?;
            fs::write(tmp.join(INDEX_FILE), json).ctx(|| "write image catalog".into())
        });
        if let Err(err) = built {
            let _ = fs::remove_dir_all(&tmp);
            return Err(err);
        }
        fs::rename(&tmp, &dir).ctx(|| format!("move {} into place", tmp.display()))?;
        tracing::info!(dir = %dir.display(), secs = started.elapsed().as_secs_f64(), "built test images");
    }

    let raw =
        fs::read(dir.join(INDEX_FILE)).ctx(|| format!("read {}/{INDEX_FILE}", dir.display()))?;
    let c: Catalog = serde_json::from_slice(&raw).map_err(|source| Error::Json {
        what: format!("{}/{INDEX_FILE}", dir.display()),
        source,
    })?;
    Ok(TestImages {
        root: dir,
        oci: c.oci,
        docker: c.docker,
        layered: c.layered,
        multiarch: c.multiarch,
    })
}

/// Old cache entries (other recipe or tool versions) and half-built leftovers.
fn remove_other_builds(root: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path != keep && (name.starts_with("images-") || name.starts_with("building-")) {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// Hash of everything that decides what the build produces.
fn cache_key() -> Result<String> {
    let busybox = require("busybox")?;
    let mut h = Sha256::new();
    h.update(RECIPE_VERSION);
    h.update(fs::read(&busybox).ctx(|| format!("read {}", busybox.display()))?);
    for (tool, arg) in [
        ("umoci", "--version"),
        ("skopeo", "--version"),
        ("docker-registry", "--version"),
    ] {
        h.update(exec::stdout_of(tool, &[arg])?);
    }
    Ok(hex::encode(h.finalize()))
}

fn umoci(args: &[&str]) -> Result<()> {
    exec::run(Command::new(require("umoci")?).args(args)).map(drop)
}

fn build(dir: &Path) -> Result<Catalog> {
    let layout = dir.join(LAYOUT_DIR);
    let layout_s = layout.to_string_lossy().into_owned();
    let at = |tag: &str| format!("{layout_s}:{tag}");

    // (a) busybox: one gzip layer.
    umoci(&["init", "--layout", &layout_s])?;
    umoci(&["new", "--image", &at("base")])?;
    let bundle = dir.join("bundle");
    let bundle_s = bundle.to_string_lossy().into_owned();
    umoci(&["unpack", "--image", &at("base"), &bundle_s])?;
    populate_busybox_rootfs(&bundle.join("rootfs"))?;
    umoci(&["repack", "--image", &at("busybox"), &bundle_s])?;
    umoci(&[
        "config",
        "--image",
        &at("busybox"),
        "--author",
        "tug-e2e",
        "--config.cmd",
        "/bin/sh",
        "--config.env",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "--config.workingdir",
        "/",
    ])?;
    fs::rename(bundle.join("rootfs"), dir.join(ROOTFS_DIR))
        .ctx(|| "keep the busybox rootfs".into())?;
    fs::remove_dir_all(&bundle).ctx(|| "remove umoci bundle".into())?;

    // (c) layered: a layer adding files, then one deleting a file and replacing a directory.
    let lower = write_layer_tar(
        dir,
        "lower",
        &[
            ("etc/removed.txt", "deleted by the upper layer's whiteout\n"),
            ("data/kept.txt", "kept\n"),
            (
                "data/replaced/old-a.txt",
                "hidden by the upper layer's opaque whiteout\n",
            ),
            (
                "data/replaced/sub/old-b.txt",
                "hidden by the upper layer's opaque whiteout\n",
            ),
        ],
    )?;
    let upper = write_layer_tar(
        dir,
        "upper",
        &[
            ("etc/.wh.removed.txt", ""),
            ("data/replaced/.wh..wh..opq", ""),
            ("data/replaced/new.txt", "from the upper layer\n"),
            ("data/added.txt", "from the upper layer\n"),
        ],
    )?;
    umoci(&[
        "raw",
        "add-layer",
        "--image",
        &at("busybox"),
        "--tag",
        "layered",
        &path_str(&lower),
    ])?;
    umoci(&[
        "raw",
        "add-layer",
        "--image",
        &at("layered"),
        &path_str(&upper),
    ])?;

    // (d) multiarch: one manifest per platform, then an index over both.
    let mut entries = Vec::new();
    for (arch, variant) in [("amd64", None), ("arm64", Some("v8"))] {
        let platform = match variant {
            Some(v) => format!("linux/{arch}/{v}"),
            None => format!("linux/{arch}"),
        };
        let tar = write_layer_tar(dir, arch, &[("etc/tug-platform", &format!("{platform}\n"))])?;
        umoci(&[
            "raw",
            "add-layer",
            "--image",
            &at("busybox"),
            "--tag",
            arch,
            &path_str(&tar),
        ])?;
        umoci(&[
            "config",
            "--image",
            &at(arch),
            "--architecture",
            arch,
            "--os",
            "linux",
        ])?;
        let mut desc = layout_descriptor(&layout, arch)?;
        let mut p = json!({ "architecture": arch, "os": "linux" });
        if let Some(v) = variant {
            p["variant"] = json!(v);
        }
        desc["platform"] = p;
        if let Some(obj) = desc.as_object_mut() {
            obj.remove("annotations");
        }
        entries.push(desc);
    }
    add_index(&layout, "multiarch", entries)?;

    for f in ["lower", "upper", "amd64", "arm64"] {
        let _ = fs::remove_file(dir.join(format!("{f}.tar")));
    }

    // Push everything into a fresh registry and keep its storage as the pre-loaded template.
    let mut catalog = Catalog {
        oci: image(
            "tug-test/busybox",
            "oci",
            "busybox",
            OCI_MANIFEST,
            1,
            &["linux/amd64"],
        ),
        docker: image(
            "tug-test/busybox",
            "docker",
            "busybox",
            DOCKER_MANIFEST,
            1,
            &["linux/amd64"],
        ),
        layered: image(
            "tug-test/layered",
            "latest",
            "layered",
            OCI_MANIFEST,
            3,
            &["linux/amd64"],
        ),
        multiarch: image(
            "tug-test/multiarch",
            "latest",
            "multiarch",
            OCI_INDEX,
            0,
            &["linux/amd64", "linux/arm64/v8"],
        ),
    };
    let registry = Registry::start()?;
    for img in [
        &mut catalog.oci,
        &mut catalog.docker,
        &mut catalog.layered,
        &mut catalog.multiarch,
    ] {
        img.digest = push_layout(&layout, img, &registry)?;
    }
    let storage = registry.storage_dir();
    exec::run(
        Command::new(require("cp")?)
            .arg("-a")
            .arg(&storage)
            .arg(dir.join(STORAGE_DIR)),
    )?;
    registry.stop(Duration::from_secs(5))?;
    Ok(catalog)
}

fn image(
    repo: &str,
    tag: &str,
    layout_tag: &str,
    media_type: &str,
    layers: usize,
    platforms: &[&str],
) -> TestImage {
    TestImage {
        repository: repo.into(),
        tag: tag.into(),
        digest: String::new(),
        media_type: media_type.into(),
        layers,
        platforms: platforms.iter().map(|p| p.to_string()).collect(),
        layout_tag: layout_tag.into(),
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The busybox root filesystem: the static binary, its applet links (made by busybox itself, so
/// they point at /bin/busybox), and the files a runtime expects to find.
fn populate_busybox_rootfs(rootfs: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home/tug", "tmp", "var", "proc",
        "sys", "dev",
    ] {
        fs::create_dir_all(rootfs.join(d)).ctx(|| format!("create {d} in rootfs"))?;
    }
    let set_mode = |rel: &str, mode: u32| {
        fs::set_permissions(rootfs.join(rel), fs::Permissions::from_mode(mode))
            .ctx(|| format!("chmod {rel}"))
    };
    set_mode("tmp", 0o1777)?;
    set_mode("root", 0o700)?;
    std::os::unix::fs::chown(rootfs.join("home/tug"), Some(1000), Some(1000))
        .ctx(|| "chown home/tug".into())?;
    let busybox = require("busybox")?;
    fs::copy(&busybox, rootfs.join("bin/busybox")).ctx(|| "copy busybox".into())?;
    set_mode("bin/busybox", 0o755)?;
    exec::run(Command::new(require("chroot")?).arg(rootfs).args([
        "/bin/busybox",
        "--install",
        "-s",
    ]))?;
    for (path, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\ntug:x:1000:1000:tug test user:/home/tug:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\ntug:x:1000:\nnogroup:x:65534:\n"),
        ("etc/tug-test-image", "busybox\n"),
    ] {
        fs::write(rootfs.join(path), text).ctx(|| format!("write {path}"))?;
    }
    Ok(())
}

/// An uncompressed layer tar of `files` (path, content), owned by root, made with GNU tar.
fn write_layer_tar(dir: &Path, name: &str, files: &[(&str, &str)]) -> Result<PathBuf> {
    let stage = dir.join(format!("stage-{name}"));
    let mut tops = Vec::new();
    for (path, content) in files {
        let full = stage.join(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
        }
        let mut f = fs::File::create(&full).ctx(|| format!("create {}", full.display()))?;
        f.write_all(content.as_bytes())
            .ctx(|| format!("write {}", full.display()))?;
        if let Some(top) = path.split('/').next()
            && !tops.contains(&top)
        {
            tops.push(top);
        }
    }
    let tar = dir.join(format!("{name}.tar"));
    exec::run(
        Command::new(require("tar")?)
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@1700000000",
            ])
            .arg("-C")
            .arg(&stage)
            .arg("-cf")
            .arg(&tar)
            .args(&tops),
    )?;
    fs::remove_dir_all(&stage).ctx(|| format!("remove {}", stage.display()))?;
    Ok(tar)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let raw = fs::read(path).ctx(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&raw).map_err(|source| Error::Json {
        what: path.display().to_string(),
        source,
    })
}

/// The descriptor the layout's index.json holds for `tag`.
fn layout_descriptor(layout: &Path, tag: &str) -> Result<serde_json::Value> {
    let index = read_json(&layout.join("index.json"))?;
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["annotations"][REF_NAME] == tag)
        .cloned()
        .ok_or_else(|| {
            Error::Images(format!(
                "tag {tag} missing from {}/index.json",
                layout.display()
            ))
        })
}

/// Write an image index over `manifests` as a blob and tag it `tag` in the layout.
fn add_index(layout: &Path, tag: &str, manifests: Vec<serde_json::Value>) -> Result<()> {
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    let bytes = serde_json::to_vec(&index).map_err(|source| Error::Json {
        what: "index".into(),
        source,
    })?;
    let hex = hex::encode(Sha256::digest(&bytes));
    let blob = layout.join("blobs/sha256").join(&hex);
    fs::write(&blob, &bytes).ctx(|| format!("write {}", blob.display()))?;

    let top_path = layout.join("index.json");
    let mut top = read_json(&top_path)?;
    let desc = json!({
        "mediaType": OCI_INDEX,
        "digest": format!("sha256:{hex}"),
        "size": bytes.len(),
        "annotations": { REF_NAME: tag },
    });
    match top["manifests"].as_array_mut() {
        Some(list) => list.push(desc),
        None => {
            return Err(Error::Images(format!(
                "{} has no manifests list",
                top_path.display()
            )));
        }
    }
    let out = serde_json::to_vec(&top).map_err(|source| Error::Json {
        what: "index.json".into(),
        source,
    })?;
    fs::write(&top_path, out).ctx(|| format!("write {}", top_path.display()))
}

/// Push `image` (its `layout_tag`) from an OCI layout into `registry` with skopeo.
pub(crate) fn push_layout(layout: &Path, image: &TestImage, registry: &Registry) -> Result<String> {
    let skopeo = require("skopeo")?;
    let digest_file = tempfile::NamedTempFile::new().ctx(|| "create digest file".into())?;
    let mut cmd = match registry.netns() {
        Some(ns) => ns.command(&skopeo),
        None => Command::new(&skopeo),
    };
    cmd.args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
    ]);
    if let Some(c) = registry.credentials() {
        cmd.arg("--dest-creds")
            .arg(format!("{}:{}", c.username, c.password));
    }
    match image.media_type.as_str() {
        DOCKER_MANIFEST => {
            cmd.args(["--format", "v2s2"]);
        }
        OCI_INDEX => {
            cmd.arg("--all");
        }
        _ => {}
    }
    cmd.arg("--digestfile").arg(digest_file.path());
    cmd.arg(format!("oci:{}:{}", layout.display(), image.layout_tag));
    cmd.arg(format!("docker://{}", image.reference(registry)));
    exec::run(&mut cmd)?;
    let digest = fs::read_to_string(digest_file.path()).ctx(|| "read pushed digest".into())?;
    Ok(digest.trim().to_string())
}
