//! A realistically sized image for benchmarks (about 50 MB unpacked, 30 MB compressed, 5
//! layers): busybox, then layers of many small text files, mid-sized binaries (incompressible),
//! a large semi-compressible file and a small config change. Content comes from a seeded
//! generator, so every machine builds the same bytes; built once with umoci and cached like the
//! test images.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, IoContext, Result};
use crate::exec::{self, require};
use crate::images::{TestImage, TestImages};
use crate::registry::Registry;

const RECIPE: &str = "tug-e2e-bench-image-1";
pub const TAG: &str = "bench";

#[derive(Debug)]
pub struct BenchImage {
    layout: PathBuf,
    /// Total size of the layer files before compression.
    pub unpacked_bytes: u64,
    pub files: u64,
}

static BENCH: OnceLock<std::result::Result<BenchImage, String>> = OnceLock::new();

impl BenchImage {
    pub fn get() -> Result<&'static BenchImage> {
        BENCH
            .get_or_init(|| build().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Images(e.clone()))
    }

    /// Push it to `registry` as `tug-test/bench:bench`; returns the reference.
    pub fn push(&self, registry: &Registry) -> Result<String> {
        let image = TestImage {
            repository: "tug-test/bench".into(),
            tag: TAG.into(),
            digest: String::new(),
            media_type: crate::images::OCI_MANIFEST.into(),
            layers: 5,
            platforms: vec!["linux/amd64".into()],
            layout_tag: TAG.into(),
        };
        crate::images::push_layout(&self.layout, &image, registry)?;
        Ok(image.reference(registry))
    }
}

/// xorshift64*: fast, seeded, good enough to make bytes that do not compress.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn random_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// Words from a small vocabulary: compresses about as well as source code or docs.
    fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "container",
            "orchestrator",
            "registry",
            "layer",
            "manifest",
            "digest",
            "namespace",
            "cgroup",
            "the",
            "of",
            "and",
            "to",
            "fn",
            "let",
            "mut",
            "impl",
            "struct",
            "return",
            "error",
            "result",
            "node",
            "task",
            "service",
            "replica",
            "schedule",
            "network",
            "bridge",
            "route",
            "address",
            "0x7f",
            "{",
            "}",
            "(",
            ")",
            ";",
            "\n",
        ];
        let mut v = Vec::with_capacity(len + 16);
        while v.len() < len {
            v.extend_from_slice(WORDS[self.below(WORDS.len() as u64) as usize].as_bytes());
            v.push(b' ');
        }
        v.truncate(len);
        v
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).ctx(|| format!("create {}", p.display()))?;
    }
    let mut f = fs::File::create(path).ctx(|| format!("create {}", path.display()))?;
    f.write_all(bytes)
        .ctx(|| format!("write {}", path.display()))
}

/// Stage one layer's files; returns (bytes, files).
fn stage(dir: &Path, layer: usize, rng: &mut Rng) -> Result<(u64, u64)> {
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut put = |rel: String, content: Vec<u8>| -> Result<()> {
        bytes += content.len() as u64;
        files += 1;
        write_file(&dir.join(rel), &content)
    };
    match layer {
        // Many small text files, like an interpreter's standard library.
        0 => {
            for i in 0..3000 {
                let len = 1024 + rng.below(7 * 1024) as usize;
                put(
                    format!("usr/lib/app/pkg{:02}/mod{i:04}.py", i % 40),
                    rng.text(len),
                )?;
            }
        }
        // Mid-sized binaries: half incompressible, half code-like.
        1 => {
            for i in 0..80 {
                let len = 64 * 1024 + rng.below(192 * 1024) as usize;
                let content = if i % 2 == 0 {
                    rng.random_bytes(len)
                } else {
                    rng.text(len)
                };
                put(
                    format!("usr/lib/x86_64-linux-gnu/libbench{i:02}.so"),
                    content,
                )?;
            }
        }
        // One large file, mixed.
        2 => {
            let mut content = Vec::new();
            for i in 0..16 {
                content.extend(if i % 4 == 0 {
                    rng.random_bytes(1 << 20)
                } else {
                    rng.text(1 << 20)
                });
            }
            put("opt/app/data.bin".into(), content)?;
        }
        // A small config change on top.
        _ => {
            put(
                "etc/app/config.toml".into(),
                b"[server]\nlisten = \"0.0.0.0:8080\"\nworkers = 4\n".to_vec(),
            )?;
        }
    }
    Ok((bytes, files))
}

fn build() -> Result<BenchImage> {
    let base = TestImages::get()?;
    let root = crate::images::cache_root();
    let dir = root.join(format!(
        "bench-{}",
        &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(format!(
            "{RECIPE}{}",
            base.oci.digest
        )))[..16]
    ));
    let lock_path = root.join("lock");
    let lock_file =
        fs::File::create(&lock_path).ctx(|| format!("create {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .ctx(|| "lock image cache".into())?;
    let marker = dir.join("stats.json");
    if !marker.exists() {
        let tmp = root.join(format!("building-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        let layout = tmp.join("oci");
        exec::run(
            Command::new(require("cp")?)
                .arg("-a")
                .arg(base.layout())
                .arg(&layout),
        )?;
        let at = |tag: &str| format!("{}:{tag}", layout.display());
        let mut rng = Rng(0x7467_6265_6e63_6821);
        let (mut bytes, mut files) = (0, 0);
        let mut from = "busybox".to_string();
        for layer in 0..4 {
            let stage_dir = tmp.join(format!("stage{layer}"));
            let (b, f) = stage(&stage_dir, layer, &mut rng)?;
            bytes += b;
            files += f;
            let tar = tmp.join(format!("layer{layer}.tar"));
            exec::run(
                Command::new(require("tar")?)
                    .args([
                        "--sort=name",
                        "--owner=0",
                        "--group=0",
                        "--numeric-owner",
                        "--mtime=@1700000000",
                        "-C",
                    ])
                    .arg(&stage_dir)
                    .arg("-cf")
                    .arg(&tar)
                    .arg("."),
            )?;
            exec::run(
                Command::new(require("umoci")?)
                    .args(["raw", "add-layer", "--image", &at(&from), "--tag", TAG])
                    .arg(&tar),
            )?;
            from = TAG.to_string();
            fs::remove_dir_all(&stage_dir).ctx(|| "remove stage".into())?;
            fs::remove_file(&tar).ctx(|| "remove tar".into())?;
        }
        fs::write(
            tmp.join("stats.json"),
            format!("{{\"bytes\":{bytes},\"files\":{files}}}"),
        )
        .ctx(|| "write stats".into())?;
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&tmp, &dir).ctx(|| "move bench image into place".into())?;
    }
    let stats: serde_json::Value = serde_json::from_slice(
        &fs::read(&marker).ctx(|| "read stats".into())?,
    )
    .map_err(|source| Error::Json {
        what: "bench stats".into(),
        source,
    })?;
    Ok(BenchImage {
        layout: dir.join("oci"),
        unpacked_bytes: stats["bytes"].as_u64().unwrap_or(0),
        files: stats["files"].as_u64().unwrap_or(0),
    })
}
