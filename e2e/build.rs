//! Compiles `proto/` with protox (no system `protoc`), like `api/build.rs`: a client for the
//! subset of etcd's gRPC KV service that the controller benchmark writes through.

use std::error::Error;

const PROTOS: &[&str] = &["etcd/rpc.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
