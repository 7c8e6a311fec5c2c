//! The HTTP side of tug's Prometheus endpoints (DESIGN.md, "Observability"): a small HTTP/1
//! server (hyper) that answers `GET` on a few paths with what a handler renders. Controllers
//! serve `/metrics` and the service discovery document (`/sd`), agents `/metrics`.
//!
//! The handler runs on a blocking thread: rendering may read many cgroup files, and a scrape
//! must never hold up the async threads that do the role's real work. Values read only at
//! scrape time (cgroup files, Raft status) are assembled as [`Family`]s and rendered with the
//! registry's instruments by [`render`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Prometheus' text exposition format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Prometheus HTTP service discovery answers in JSON.
pub const JSON: &str = "application/json";

/// What a handler answers for a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// Renders the reply for a request path (`None`: 404). Called on a blocking thread.
pub type Handler = Arc<dyn Fn(&str) -> Option<Reply> + Send + Sync>;

/// One metric family assembled at scrape time from values read then.
#[derive(Debug)]
pub struct Family {
    inner: MetricFamily,
}

impl Family {
    /// A counter or a gauge family (other types are rendered as gauges).
    pub fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut inner = MetricFamily::default();
        inner.set_name(name.to_string());
        inner.set_help(help.to_string());
        inner.set_field_type(if kind == MetricType::COUNTER {
            MetricType::COUNTER
        } else {
            MetricType::GAUGE
        });
        Family { inner }
    }

    pub fn counter(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::COUNTER)
    }

    pub fn gauge(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::GAUGE)
    }

    /// One sample; every sample of a family must carry the same label names, in one order.
    pub fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let pairs = labels
            .iter()
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name((*name).to_string());
                pair.set_value((*value).to_string());
                pair
            })
            .collect();
        let mut metric = Metric::from_label(pairs);
        if self.inner.get_field_type() == MetricType::COUNTER {
            let mut counter = Counter::default();
            counter.set_value(value);
            metric.set_counter(counter);
        } else {
            let mut gauge = Gauge::default();
            gauge.set_value(value);
            metric.set_gauge(gauge);
        }
        self.inner.mut_metric().push(metric);
    }

    pub fn is_empty(&self) -> bool {
        self.inner.get_metric().is_empty()
    }
}

/// The text exposition of `registry`'s instruments and of `families` (read at scrape time).
/// Empty families are left out, as the registry leaves out instruments without samples.
pub fn render(registry: &Registry, families: Vec<Family>) -> Reply {
    let mut all = registry.gather();
    all.extend(
        families
            .into_iter()
            .filter(|f| !f.is_empty())
            .map(|f| f.inner),
    );
    all.sort_by(|a, b| a.name().cmp(b.name()));
    let mut body = Vec::with_capacity(64 * 1024);
    if let Err(err) = TextEncoder::new().encode(&all, &mut body) {
        tracing::warn!(cause = %err, "cannot encode metrics");
        body.clear();
    }
    Reply {
        content_type: TEXT_FORMAT,
        body,
    }
}

/// Serves `handler` on `listener` until `shutdown` resolves; open connections are closed then.
pub async fn serve(listener: TcpListener, handler: Handler, shutdown: impl Future<Output = ()>) {
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::debug!(cause = %err, "metrics listener: accept failed");
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| respond(handler.clone(), req));
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(cause = %err, "metrics connection ended");
            }
        });
    }
    connections.abort_all();
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = status;
    response
}

async fn respond<B>(
    handler: Handler,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        response
            .headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let path = req.uri().path().to_string();
    let rendered = tokio::task::spawn_blocking(move || handler(&path)).await;
    Ok(match rendered {
        Ok(Some(reply)) => {
            let mut response = Response::new(Full::new(Bytes::from(reply.body)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(reply.content_type),
            );
            response
        }
        Ok(None) => plain(StatusCode::NOT_FOUND, "not found\n"),
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, request: &str) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut out = String::new();
        stream.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[test]
    fn families_render_with_the_registry() -> Result<(), prometheus::Error> {
        let registry = Registry::new();
        let restarts = prometheus::IntCounter::new("restarts_total", "Restarts.")?;
        registry.register(Box::new(restarts.clone()))?;
        restarts.inc();
        let mut cpu = Family::counter("cpu_seconds_total", "CPU time.");
        cpu.add(&[("task", "a"), ("node", "n1")], 1.5);
        let mut mem = Family::gauge("memory_bytes", "Memory.");
        mem.add(&[("task", "a")], 42.0);
        let empty = Family::gauge("nothing", "Never set.");
        let text =
            String::from_utf8_lossy(&render(&registry, vec![mem, cpu, empty]).body).into_owned();
        assert!(
            text.contains("# TYPE cpu_seconds_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("cpu_seconds_total{task=\"a\",node=\"n1\"} 1.5\n"),
            "{text}"
        );
        assert!(text.contains("memory_bytes{task=\"a\"} 42\n"), "{text}");
        assert!(text.contains("restarts_total 1\n"), "{text}");
        assert!(!text.contains("nothing"), "{text}");
        let cpu_at = text.find("cpu_seconds_total").unwrap_or(usize::MAX);
        let mem_at = text.find("memory_bytes").unwrap_or(0);
        assert!(cpu_at < mem_at, "sorted by name:\n{text}");
        Ok(())
    }

    #[tokio::test]
    async fn paths_are_rendered_and_unknown_ones_are_404() -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let handler: Handler = Arc::new(|path| {
            (path == "/metrics").then(|| Reply {
                content_type: TEXT_FORMAT,
                body: b"up 1\n".to_vec(),
            })
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, handler, async {
            let _ = stopped.await;
        }));
        let ok = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await?;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("version=0.0.4") && ok.ends_with("up 1\n"),
            "{ok}"
        );
        let missing = get(
            addr,
            "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await?;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let _ = stop.send(());
        let _ = server.await;
        Ok(())
    }
}
