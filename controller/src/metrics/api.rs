//! API request metrics: a tower layer around the controller's gRPC server counting requests
//! and timing them by method and status code.
//!
//! The code is the `grpc-status` of the response headers: errors of unary calls travel there
//! ("trailers-only" responses); a response without it succeeded as far as the headers tell (a
//! stream that fails later is counted as OK). The latency is the time to the response headers,
//! which for unary calls is the whole call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, exponential_buckets};
use tonic::codegen::http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

/// The instruments; cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    pub requests: IntCounterVec,
    pub seconds: HistogramVec,
}

impl ApiMetrics {
    pub fn new() -> prometheus::Result<Self> {
        Ok(ApiMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "tug_api_requests_total",
                    "gRPC requests served, by method and status code.",
                ),
                &["method", "code"],
            )?,
            seconds: HistogramVec::new(
                HistogramOpts::new(
                    "tug_api_request_duration_seconds",
                    "Time to answer a gRPC request (to its response headers), by method.",
                )
                .buckets(exponential_buckets(0.0005, 2.0, 16)?),
                &["method"],
            )?,
        })
    }

    fn record(&self, method: &str, code: &str, seconds: f64) {
        self.requests.with_label_values(&[method, code]).inc();
        self.seconds.with_label_values(&[method]).observe(seconds);
    }
}

/// `/tug.v1.Control/Apply` -> `Control/Apply`; anything not ours is `other` (bounded labels).
pub fn method_label(path: &str) -> String {
    match path.strip_prefix("/tug.v1.") {
        Some(rest) if rest.contains('/') && !rest.ends_with('/') => rest.to_string(),
        _ => "other".to_string(),
    }
}

/// The status code name of a `grpc-status` header value ("OK" without one).
pub fn code_label(grpc_status: Option<&[u8]>) -> String {
    let Some(value) = grpc_status else {
        return "OK".to_string();
    };
    let number = std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok());
    match number.map(tonic::Code::from_i32) {
        Some(tonic::Code::Ok) => "OK".to_string(),
        Some(code) => format!("{code:?}"),
        None => "Unknown".to_string(),
    }
}

#[derive(Debug, Clone)]
pub struct ApiMetricsLayer(pub ApiMetrics);

impl<S> Layer<S> for ApiMetricsLayer {
    type Service = ApiMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiMetricsService<S> {
    inner: S,
    metrics: ApiMetrics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ApiMetricsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let method = method_label(request.uri().path());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => {
                    code_label(response.headers().get("grpc-status").map(|v| v.as_bytes()))
                }
                Err(_) => "Unavailable".to_string(),
            };
            metrics.record(&method, &code, started.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_readable() {
        assert_eq!(method_label("/tug.v1.Control/Apply"), "Control/Apply");
        assert_eq!(
            method_label("/tug.v1.Dispatcher/ReportStatus"),
            "Dispatcher/ReportStatus"
        );
        assert_eq!(method_label("/evil/x"), "other");
        assert_eq!(method_label("/tug.v1.Control/"), "other");
        assert_eq!(code_label(None), "OK");
        assert_eq!(code_label(Some(b"0")), "OK");
        assert_eq!(code_label(Some(b"5")), "NotFound");
        assert_eq!(code_label(Some(b"14")), "Unavailable");
        assert_eq!(code_label(Some(b"x")), "Unknown");
    }
}
