//! A registry front that answers every blob request with `307 Temporary Redirect` to the real
//! registry on another port, as registries backed by object storage (S3, GCS) do, and passes
//! everything else through. Clients must follow the redirect (and must not depend on
//! credentials being sent to the storage host).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::registry::Registry;

pub struct RedirectingFront {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
    redirects: Arc<AtomicUsize>,
}

impl RedirectingFront {
    /// A front on a free loopback port for `registry` (which must be on loopback too).
    pub fn start(registry: &Registry) -> Result<RedirectingFront> {
        let server = tiny_http::Server::http((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| Error::Net(format!("redirecting front: {e}")))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| Error::Net("front has no IP address".into()))?;
        let server = Arc::new(server);
        let redirects = Arc::new(AtomicUsize::new(0));
        let backend = registry.addr();
        let (srv, count) = (server.clone(), redirects.clone());
        let thread = std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into();
            for request in srv.incoming_requests() {
                let url = request.url().to_string();
                if url.contains("/blobs/sha256:") {
                    count.fetch_add(1, Ordering::SeqCst);
                    let location = format!("http://{backend}{url}");
                    let mut response = tiny_http::Response::empty(307);
                    if let Some(h) = header("Location", &location) {
                        response.add_header(h);
                    }
                    let _ = request.respond(response);
                    continue;
                }
                let _ = proxy(&agent, backend, request);
            }
        });
        Ok(RedirectingFront {
            server,
            thread: Some(thread),
            addr,
            redirects,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `HOST:PORT` of the front, for image references.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// How many blob requests were redirected.
    pub fn redirects(&self) -> usize {
        self.redirects.load(Ordering::SeqCst)
    }
}

/// A header, or None if it is not valid HTTP (then it is left out).
fn header(name: &str, value: &str) -> Option<tiny_http::Header> {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

/// Pass a GET or HEAD through to the registry, keeping the headers a client needs.
fn proxy(
    agent: &ureq::Agent,
    backend: SocketAddr,
    request: tiny_http::Request,
) -> std::io::Result<()> {
    let url = format!("http://{backend}{}", request.url());
    let mut req = match request.method() {
        tiny_http::Method::Head => agent.head(&url),
        _ => agent.get(&url),
    };
    for h in request.headers() {
        let name = h.field.as_str().as_str();
        if name.eq_ignore_ascii_case("Accept")
            || name.eq_ignore_ascii_case("Authorization")
            || name.eq_ignore_ascii_case("Range")
        {
            req = req.header(name, h.value.as_str());
        }
    }
    match req.call() {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let mut headers = Vec::new();
            for (k, v) in resp.headers() {
                let keep = [
                    "content-type",
                    "docker-content-digest",
                    "www-authenticate",
                    "docker-distribution-api-version",
                ];
                if keep.contains(&k.as_str()) {
                    headers.extend(header(k.as_str(), &String::from_utf8_lossy(v.as_bytes())));
                }
            }
            let body = resp
                .body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_vec()
                .unwrap_or_default();
            let mut response = tiny_http::Response::from_data(body).with_status_code(status);
            for h in headers {
                response.add_header(h);
            }
            request.respond(response)
        }
        Err(e) => {
            request.respond(tiny_http::Response::from_string(e.to_string()).with_status_code(502))
        }
    }
}

impl std::fmt::Debug for RedirectingFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedirectingFront")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for RedirectingFront {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
