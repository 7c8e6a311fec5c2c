//! tug's test bed, usable from any crate's tests and from benchmarks.
//!
//! - [`Registry`]: Debian's real `docker-registry` on a loopback port or on a test host, with its
//!   own storage, optional htpasswd auth, optionally pre-loaded with the test images.
//! - [`TestImages`]: real OCI and Docker images built with `umoci` and pushed with `skopeo`, from
//!   `busybox-static`; built once per run and cached by their inputs.
//! - [`TestNet`]: "hosts" (network namespaces) on a test bridge that lives in its own namespace,
//!   with cut/heal and pairwise partitions; nothing touches the machine's own interfaces.
//!
//! Everything is cleaned up when dropped, also when a test panics; namespaces left by a test
//! process that was killed are swept by the next one. Needs root and the tools that
//! `e2e/install-deps.sh` installs.

pub mod bench;
pub mod bench_image;
pub mod bundle;
pub mod cluster;
pub mod error;

pub mod exec;
pub mod http;
pub mod images;
pub mod net;
pub mod netns;
pub mod peers;
pub mod process;
pub mod prometheus;
pub mod redirect;
pub mod registry;
pub mod sim_agent;
pub mod token_server;

/// `etcdserverpb`: the subset of etcd's KV service (Put) that the controller benchmark drives;
/// see `e2e/proto/etcd/rpc.proto`.
pub mod etcdpb {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

pub use error::{Error, Result};
pub use http::Credentials;
pub use images::{TestImage, TestImages};
pub use net::{Host, TestNet};
pub use netns::Netns;
pub use process::{ChildGuard, spawn};
pub use registry::{Registry, RegistryOptions};
