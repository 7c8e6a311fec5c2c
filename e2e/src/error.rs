//! The test bed's one error type: every failure names what was being done and why it failed.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{tool}` is not installed: run `{install}` as root")]
    MissingTool {
        tool: &'static str,
        /// The command that installs it.
        install: &'static str,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("HTTP GET {url}: {message}")]
    Http { url: String, message: String },
    #[error("timed out after {seconds:.1}s waiting for {what}")]
    Timeout { what: String, seconds: f64 },
    #[error("{what} exited before it was ready ({status}); its log:\n{log}")]
    Died {
        what: String,
        status: String,
        log: String,
    },
    #[error("test images: {0}")]
    Images(String),
    #[error("test network: {0}")]
    Net(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attach a description of the operation to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sys {
            what: what(),
            source,
        })
    }
}
