//! A Docker registry token server (the `WWW-Authenticate: Bearer realm=...` flow) for the test
//! bed's registry: it checks HTTP basic credentials and issues RS256 JWTs with the requested
//! `access`, signed by `openssl` with a key whose self-signed certificate the registry trusts
//! (`auth.token.rootcertbundle`). Served by `tiny_http` on a loopback port (or inside a host's
//! namespace) from its own thread.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::error::{Error, IoContext, Result};
use crate::exec::{self, require};
use crate::http::Credentials;

pub const SERVICE: &str = "tug-e2e-registry";
pub const ISSUER: &str = "tug-e2e-token-issuer";

pub struct TokenServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
    cert: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    /// Generate a signing key in `dir` and serve tokens to `creds` on a free port of `ip`.
    pub fn start(dir: &Path, ip: Ipv4Addr, creds: Credentials) -> Result<TokenServer> {
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        exec::run(
            Command::new(require("openssl")?)
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=tug-e2e-token",
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        )?;
        let der = exec::run(
            Command::new(require("openssl")?)
                .args(["x509", "-outform", "DER", "-in"])
                .arg(&cert),
        )?
        .stdout;
        let x5c = STANDARD.encode(der);
        let server = tiny_http::Server::http((ip, 0))
            .map_err(|e| Error::Net(format!("token server: {e}")))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| Error::Net("token server has no IP address".into()))?;
        let server = Arc::new(server);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (srv, log) = (server.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            for request in srv.incoming_requests() {
                let url = request.url().to_string();
                if let Ok(mut l) = log.lock() {
                    l.push(url.clone());
                }
                let auth = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"))
                    .map(|h| h.value.as_str().to_string());
                let (status, body) = match issue(&url, auth.as_deref(), &creds, &key, &x5c) {
                    Ok(token) => (
                        200,
                        format!(
                            r#"{{"token":"{token}","access_token":"{token}","expires_in":300}}"#
                        ),
                    ),
                    Err(msg) => (
                        401,
                        format!(r#"{{"errors":[{{"code":"UNAUTHORIZED","message":"{msg}"}}]}}"#),
                    ),
                };
                let response = tiny_http::Response::from_string(body).with_status_code(status);
                let _ = request.respond(response);
            }
        });
        Ok(TokenServer {
            server,
            thread: Some(thread),
            addr,
            cert,
            requests,
        })
    }

    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// Every request URL (path and query) the server has seen.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Check the basic credentials and sign a token granting the scope asked for.
fn issue(
    url: &str,
    auth: Option<&str>,
    creds: &Credentials,
    key: &Path,
    x5c: &str,
) -> std::result::Result<String, String> {
    if auth != Some(creds.basic_header().as_str()) {
        return Err("bad or missing credentials".into());
    }
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut access = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if k == "scope" {
            // repository:NAME:ACTIONS (NAME may be percent-encoded)
            let scope = v
                .replace("%3A", ":")
                .replace("%2F", "/")
                .replace("%2C", ",");
            let parts: Vec<&str> = scope.splitn(3, ':').collect();
            if let [kind, name, actions] = parts.as_slice() {
                let actions: Vec<&str> = actions.split(',').collect();
                access.push(serde_json::json!({ "type": kind, "name": name, "actions": actions }));
            }
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = serde_json::json!({ "typ": "JWT", "alg": "RS256", "x5c": [x5c] });
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": creds.username, "aud": SERVICE,
        "exp": now + 300, "nbf": now.saturating_sub(60), "iat": now, "jti": format!("{now}-{}", std::process::id()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = sign(key, signing_input.as_bytes()).map_err(|e| e.to_string())?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// RSASSA-PKCS1-v1_5 with SHA-256 (JWT's RS256), by openssl.
fn sign(key: &Path, data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new(require("openssl")?)
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| "start openssl".into())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(data).ctx(|| "write to openssl".into())?;
    }
    let out = child.wait_with_output().ctx(|| "wait for openssl".into())?;
    if !out.status.success() {
        return Err(Error::Command {
            command: "openssl dgst -sign".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    Ok(out.stdout)
}
