//! Debian's real `docker-registry` (CNCF distribution 2.8) as a child process: its own config and
//! storage dir, on a loopback port or on a test host's address, optionally with htpasswd basic
//! auth and optionally pre-loaded with the test images. Stopped by PID when dropped.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::exec::{self, require};
use crate::http::{self, Credentials};
use crate::images::TestImages;
use crate::net::Host;
use crate::netns::Netns;
use crate::process::{self, ChildGuard};
use crate::token_server::TokenServer;

/// Port the registry listens on when it runs on a test host.
pub const HOST_PORT: u16 = 5000;
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The Accept header a client needs: distribution answers 404 for an OCI manifest unless the
/// OCI type is accepted, so OCI and Docker types go together.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Require these credentials (htpasswd, bcrypt) for every request.
    pub auth: Option<Credentials>,
    /// Require bearer tokens from a token server (started with the registry) that gives them
    /// to these credentials: the `WWW-Authenticate: Bearer realm=...` flow.
    pub token_auth: Option<Credentials>,
    /// Start with the test images (see `TestImages`) already stored.
    pub with_images: bool,
}

impl RegistryOptions {
    pub fn with_images(mut self) -> Self {
        self.with_images = true;
        self
    }

    pub fn with_token_auth(mut self, username: &str, password: &str) -> Self {
        self.token_auth = Some(Credentials {
            username: username.into(),
            password: password.into(),
        });
        self
    }

    pub fn with_auth(mut self, username: &str, password: &str) -> Self {
        self.auth = Some(Credentials {
            username: username.into(),
            password: password.into(),
        });
        self
    }
}

#[derive(Debug)]
pub struct Registry {
    // Field order is drop order: stop the process, then remove its files, then its namespace.
    child: ChildGuard,
    token_server: Option<TokenServer>,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    auth: Option<Credentials>,
    netns: Option<Arc<Netns>>,
}

impl Registry {
    /// An empty, anonymous registry on a free loopback port of this namespace.
    pub fn start() -> Result<Registry> {
        Self::start_with(RegistryOptions::default())
    }

    /// A registry on a free loopback port of this namespace.
    pub fn start_with(opts: RegistryOptions) -> Result<Registry> {
        // A free port can be taken by someone else before the registry binds it: try again.
        let mut last = None;
        for _ in 0..5 {
            let port = free_loopback_port()?;
            match Self::launch(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), None, &opts) {
                Err(err @ Error::Died { .. })
                    if err.to_string().contains("address already in use") =>
                {
                    last = Some(err)
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Error::Net("no free loopback port".into())))
    }

    /// A registry on a given address of this namespace (e.g. `127.0.0.1:5000`).
    pub fn start_at(addr: SocketAddr, opts: RegistryOptions) -> Result<Registry> {
        Self::launch(addr, None, &opts)
    }

    /// A registry running on test host `host`, listening on `host.addr():5000`, so every host of
    /// the test network can pull from it.
    pub fn start_on(host: &Host, opts: RegistryOptions) -> Result<Registry> {
        Self::launch(
            SocketAddr::from((host.addr(), HOST_PORT)),
            Some(host.netns().clone()),
            &opts,
        )
    }

    fn launch(
        addr: SocketAddr,
        netns: Option<Arc<Netns>>,
        opts: &RegistryOptions,
    ) -> Result<Registry> {
        let program = require("docker-registry")?;
        let dir = tempfile::Builder::new()
            .prefix("tug-e2e-registry-")
            .tempdir()
            .ctx(|| "create registry dir".into())?;
        let storage = dir.path().join("storage");
        if opts.with_images {
            TestImages::get()?.copy_registry_storage(&storage)?;
        } else {
            fs::create_dir_all(&storage).ctx(|| format!("create {}", storage.display()))?;
        }
        let htpasswd = match &opts.auth {
            Some(creds) => Some(write_htpasswd(dir.path(), creds)?),
            None => None,
        };
        let token_server = match &opts.token_auth {
            Some(creds) => {
                let ip = match addr.ip() {
                    std::net::IpAddr::V4(ip) => ip,
                    std::net::IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
                };
                let ts = match &netns {
                    Some(ns) => {
                        ns.run_in(|| TokenServer::start(dir.path(), ip, creds.clone()))??
                    }
                    None => TokenServer::start(dir.path(), ip, creds.clone())?,
                };
                Some(ts)
            }
            None => None,
        };
        let mut yaml = config_yaml(addr, &storage, htpasswd.as_deref());
        if let Some(ts) = &token_server {
            let _ = write!(
                yaml,
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                ts.realm(),
                crate::token_server::SERVICE,
                crate::token_server::ISSUER,
                ts.cert().display()
            );
        }
        let config = dir.path().join("config.yml");
        fs::write(&config, yaml).ctx(|| format!("write {}", config.display()))?;
        let log_path = dir.path().join("registry.log");
        let child = spawn_server(&program, &config, &log_path, netns.as_deref())?;
        let mut registry = Registry {
            child,
            token_server,
            dir,
            addr,
            auth: opts.auth.clone(),
            netns,
        };
        registry.wait_ready(&log_path)?;
        tracing::info!(addr = %registry.addr, pid = registry.child.pid(), "registry ready");
        Ok(registry)
    }

    /// Stop the registry and start it again on the same address with the same storage (to test
    /// what clients do while it is down, then after it is back).
    pub fn restart(&mut self) -> Result<()> {
        self.child.stop(Duration::from_secs(5))?;
        let program = require("docker-registry")?;
        let (config, log_path) = (
            self.dir.path().join("config.yml"),
            self.dir.path().join("registry.log"),
        );
        self.child = spawn_server(&program, &config, &log_path, self.netns.as_deref())?;
        self.wait_ready(&log_path)
    }

    /// Stop the registry, keeping its storage, until `restart`.
    pub fn pause(&mut self) -> Result<()> {
        self.child.stop(Duration::from_secs(5)).map(drop)
    }

    /// The file holding blob `digest` (`sha256:...`) in the registry's storage, to tamper with.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage_dir().join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2.min(hex.len())]
        ))
    }

    fn wait_ready(&mut self, log_path: &Path) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(Error::Died {
                    what: "docker-registry".into(),
                    status: status.to_string(),
                    log: fs::read_to_string(log_path).unwrap_or_default(),
                });
            }
            // 200 when anonymous, 401 when auth is on: either way it is serving.
            if let Ok(resp) = self.get_anonymous("/v2/", &[])
                && (resp.status == 200 || resp.status == 401)
            {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(Error::Timeout {
                    what: format!("docker-registry on {}", self.addr),
                    seconds: READY_TIMEOUT.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `HOST:PORT`, as it appears in image references.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// `HOST:PORT/repository:tag` for a repository in this registry.
    pub fn reference(&self, repository_and_tag: &str) -> String {
        format!("{}/{repository_and_tag}", self.addr)
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.auth.as_ref()
    }

    /// The token server, when the registry uses bearer tokens.
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token_server.as_ref()
    }

    /// The namespace it runs in, if it runs on a test host.
    pub fn netns(&self) -> Option<&Arc<Netns>> {
        self.netns.as_ref()
    }

    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// GET `path` (e.g. `/v2/`), with this registry's credentials if it has any.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<http::Response> {
        let auth = self.auth.as_ref().map(Credentials::basic_header);
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(auth) = &auth {
            all.push(("Authorization", auth));
        }
        http::get(
            &format!("http://{}{path}", self.addr),
            &all,
            self.netns.as_deref(),
        )
    }

    /// GET `path` without credentials.
    pub fn get_anonymous(&self, path: &str, headers: &[(&str, &str)]) -> Result<http::Response> {
        http::get(
            &format!("http://{}{path}", self.addr),
            headers,
            self.netns.as_deref(),
        )
    }

    /// The manifest (or index) of `repository` at `reference` (tag or digest), as JSON.
    pub fn manifest(&self, repository: &str, reference: &str) -> Result<http::Response> {
        self.get(
            &format!("/v2/{repository}/manifests/{reference}"),
            &[("Accept", MANIFEST_ACCEPT)],
        )
    }

    /// Stop the registry now (SIGTERM, then SIGKILL after `grace`).
    pub fn stop(mut self, grace: Duration) -> Result<()> {
        self.child.stop(grace).map(drop)
    }
}

fn spawn_server(
    program: &Path,
    config: &Path,
    log_path: &Path,
    netns: Option<&Netns>,
) -> Result<ChildGuard> {
    let log = fs::File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .ctx(|| format!("open {}", log_path.display()))?;
    let log_err = log.try_clone().ctx(|| "dup log file".into())?;
    let mut cmd = match netns {
        Some(ns) => ns.command(program),
        None => Command::new(program),
    };
    cmd.arg("serve")
        .arg(config)
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    process::spawn(&mut cmd)
}

fn free_loopback_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ctx(|| "bind a loopback port".into())?;
    Ok(listener
        .local_addr()
        .ctx(|| "read bound port".into())?
        .port())
}

fn write_htpasswd(dir: &Path, creds: &Credentials) -> Result<PathBuf> {
    // distribution accepts bcrypt entries only: -B.
    let out = exec::run(Command::new(require("htpasswd")?).args([
        "-B",
        "-b",
        "-n",
        &creds.username,
        &creds.password,
    ]))?;
    let path = dir.join("htpasswd");
    fs::write(&path, &out.stdout).ctx(|| format!("write {}", path.display()))?;
    Ok(path)
}

fn config_yaml(addr: SocketAddr, storage: &Path, htpasswd: Option<&Path>) -> String {
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {addr}\n  secret: tug-e2e-{pid}\n",
        storage = storage.display(),
        pid = std::process::id(),
    );
    if let Some(path) = htpasswd {
        let _ = write!(
            yaml,
            "auth:\n  htpasswd:\n    realm: tug-e2e\n    path: {}\n",
            path.display()
        );
    }
    yaml
}
