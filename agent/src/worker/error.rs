//! The worker's errors. Most failures of a task are not errors of the worker: they become the
//! task's FAILED status. What is left is what stops the worker itself (its data dir, its listen
//! socket) and what ends one session with a controller (then it reconnects).

use std::path::PathBuf;

use crate::image::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("no controller address given: pass --join HOST:PORT")]
    NoControllers,
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open the image store: {0}")]
    Images(#[from] ImageError),
    #[error("serve the agent API: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("the agent API listener: {0}")]
    Listener(std::io::Error),
    #[error("cannot listen on {address} for /metrics: {source}")]
    MetricsListener {
        address: String,
        source: std::io::Error,
    },
    #[error("set up the agent's metrics: {0}")]
    Metrics(#[source] prometheus::Error),
    #[error("set up the node network: {0}")]
    Network(crate::network::NetworkError),
}

/// Why a session with a controller ended; the worker then picks the next controller.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("invalid controller address {address:?}: {source}")]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("connect to {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("{call} failed: {status}")]
    Rpc {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("{call} timed out")]
    Timeout { call: &'static str },
    #[error("the controller closed the assignments stream")]
    StreamEnded,
    #[error("the controller sent an assignments message of unknown kind {0}")]
    UnknownKind(i32),
}
