//! Compiles `proto/` with protox, a protobuf compiler written in Rust, so building tug needs no
//! system `protoc`.

use std::error::Error;

const PROTOS: &[&str] = &[
    "tug/v1/objects.proto",
    "tug/v1/control.proto",
    "tug/v1/raft.proto",
    "tug/v1/dispatcher.proto",
    "tug/v1/agent.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Clients print objects as JSON or YAML.
        .type_attribute(".tug.v1", "#[derive(serde::Serialize)]")
        // Set only after a template change, and 312 bytes inline: boxed, an unset one costs a
        // pointer in each of the controller's (many) stored services.
        .boxed(".tug.v1.Service.previous_spec")
        // Optional, and 56 bytes inline in every spec the controller stores (each service's and
        // each task's): boxed, an unset one costs a pointer.
        .boxed(".tug.v1.ServiceSpec.health_check")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
