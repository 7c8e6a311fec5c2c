//! `tug image pull|ls|rm|prune|inspect`: the agent's image store, by hand.

use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use tug_agent::image::{
    CredentialStore, ImageRef, ImageStore, Platform, Progress, PullEvent, StoreConfig,
};

use crate::args::{GlobalArgs, ImageCommand};
use crate::output::{bytes, short_digest, table};

pub fn run(global: &GlobalArgs, cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Pull {
            reference,
            platform,
            auth_file,
        } => pull(global, &reference, platform.as_deref(), auth_file),
        ImageCommand::Ls => ls(global),
        ImageCommand::Rm { reference } => {
            let store = open(global, CredentialStore::empty())?;
            let removed = store.remove(&ImageRef::parse(&reference)?)?;
            println!(
                "removed {} ({})",
                removed.key(),
                short_digest(&removed.manifest_digest)
            );
            Ok(())
        }
        ImageCommand::Prune => {
            let store = open(global, CredentialStore::empty())?;
            let stats = store.prune(&HashSet::new())?;
            println!(
                "removed {} blobs and {} layers, {} freed",
                stats.blobs,
                stats.layers,
                bytes(stats.bytes)
            );
            Ok(())
        }
        ImageCommand::Inspect { reference } => inspect(global, &reference),
    }
}

pub fn open(global: &GlobalArgs, credentials: CredentialStore) -> anyhow::Result<ImageStore> {
    let mut cfg = StoreConfig::new(global.data_dir.join("images"));
    cfg.insecure_registries = global.insecure_registry.clone();
    cfg.credentials = credentials;
    Ok(ImageStore::open(cfg)?)
}

fn pull(
    global: &GlobalArgs,
    reference: &str,
    platform: Option<&str>,
    auth_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let reference = ImageRef::parse(reference)?;
    let platform = match platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    let credentials = match auth_file.or_else(CredentialStore::default_path) {
        Some(path) => CredentialStore::load(&path)?,
        None => CredentialStore::empty(),
    };
    let store = open(global, credentials)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let started = Instant::now();
    let display = Mutex::new(Display::new(std::io::stdout().is_terminal()));
    let sink = |e: PullEvent| {
        if let Ok(mut d) = display.lock() {
            d.event(e);
        }
    };
    let record = runtime.block_on(store.pull(&reference, &platform, &Progress(&sink)))?;
    if let Ok(mut d) = display.lock() {
        d.finish();
    }
    println!(
        "pulled {} ({}, {}, {}) in {:.1}s",
        record.key(),
        record.manifest_digest,
        record.platform,
        bytes(record.size()),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Per-layer progress like `docker pull`: redrawn in place on a terminal, one line per state
/// change otherwise.
struct Display {
    tty: bool,
    layers: BTreeMap<String, (usize, String)>,
    drawn: usize,
    last_draw: Instant,
}

impl Display {
    fn new(tty: bool) -> Display {
        Display {
            tty,
            layers: BTreeMap::new(),
            drawn: 0,
            last_draw: Instant::now(),
        }
    }

    fn event(&mut self, event: PullEvent) {
        let (digest, state, important) = match event {
            PullEvent::Resolved {
                reference,
                digest,
                layers,
                size,
            } => {
                self.line(&format!(
                    "{reference}: {digest}, {layers} layers, {}",
                    bytes(size)
                ));
                return;
            }
            PullEvent::BlobExists { digest, .. } => (digest, "already present".to_string(), true),
            PullEvent::BlobProgress {
                digest,
                done,
                total,
            } => (digest, progress_bar(done, total), done == 0),
            PullEvent::BlobDone { digest, size } => {
                (digest, format!("downloaded {}", bytes(size)), true)
            }
            PullEvent::LayerUnpacked { digest, .. } => (digest, "unpacked".to_string(), true),
        };
        let key = short_digest(&digest.to_string()).to_string();
        let order = self.layers.len();
        let entry = self
            .layers
            .entry(key.clone())
            .or_insert((order, String::new()));
        entry.1 = state.clone();
        if self.tty {
            if important || self.last_draw.elapsed() > Duration::from_millis(100) {
                self.redraw();
            }
        } else if important {
            println!("{key}: {state}");
        }
    }

    fn line(&mut self, text: &str) {
        if self.tty {
            self.clear();
        }
        println!("{text}");
        if self.tty {
            self.redraw();
        }
    }

    fn clear(&mut self) {
        let mut out = std::io::stdout().lock();
        for _ in 0..self.drawn {
            let _ = write!(out, "\x1b[1A\x1b[2K");
        }
        self.drawn = 0;
    }

    fn redraw(&mut self) {
        self.clear();
        let mut rows: Vec<(&usize, &String, &String)> =
            self.layers.iter().map(|(k, (o, s))| (o, k, s)).collect();
        rows.sort();
        let mut out = std::io::stdout().lock();
        for (_, key, state) in &rows {
            let _ = writeln!(out, "{key}: {state}");
        }
        let _ = out.flush();
        self.drawn = rows.len();
        self.last_draw = Instant::now();
    }

    fn finish(&mut self) {
        if self.tty {
            self.redraw();
        }
    }
}

fn progress_bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let filled = done
        .saturating_mul(WIDTH)
        .checked_div(total)
        .map_or(WIDTH, |f| f.min(WIDTH));
    format!(
        "downloading [{}{}] {}/{}",
        "=".repeat(filled as usize),
        " ".repeat((WIDTH - filled) as usize),
        bytes(done),
        bytes(total)
    )
}

fn ls(global: &GlobalArgs) -> anyhow::Result<()> {
    let store = open(global, CredentialStore::empty())?;
    let rows: Vec<Vec<String>> = store
        .list()?
        .into_iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.tag.clone().unwrap_or_else(|| "<none>".into()),
                short_digest(&r.manifest_digest).to_string(),
                r.platform.clone(),
                bytes(r.size()),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["NAME", "TAG", "DIGEST", "PLATFORM", "SIZE"], &rows)
    );
    Ok(())
}

fn inspect(global: &GlobalArgs, reference: &str) -> anyhow::Result<()> {
    let store = open(global, CredentialStore::empty())?;
    let record = store.get(&ImageRef::parse(reference)?)?;
    let config = store.config(&record)?;
    let c = config.config().clone().unwrap_or_default();
    let doc = serde_json::json!({
        "name": record.key(),
        "digest": record.manifest_digest,
        "indexDigest": record.index_digest,
        "platform": record.platform,
        "size": record.size(),
        "config": {
            "env": c.env(),
            "entrypoint": c.entrypoint(),
            "cmd": c.cmd(),
            "user": c.user(),
            "workingDir": c.working_dir(),
            "exposedPorts": c.exposed_ports(),
            "labels": c.labels(),
            "stopSignal": c.stop_signal(),
        },
        "layers": record.layers.iter().map(|l| serde_json::json!({"digest": l.digest, "size": l.size, "mediaType": l.media_type, "diffId": l.diff_id})).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
