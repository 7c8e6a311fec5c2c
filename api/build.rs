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
        // Optional, and 56 bytes inline in every spec the controller stores (each service's and
        // each task's): boxed, an unset one costs a pointer.
        .boxed(".tug.v1.ServiceSpec.health_check")
        .compile_fds(fds)?;
    share_specs()?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

/// The fields of type `ServiceSpec` in `Service` (`spec`, `previous_spec`) and `Task` (`spec`).
const SPEC_FIELDS: usize = 3;

/// Makes every `ServiceSpec` field a `Shared<ServiceSpec>` (`src/shared.rs`), which encodes the
/// same: the controller holds a spec once for a service and all its tasks, and a copy of a task
/// copies a pointer. prost-build has no option for a field's Rust type, so the generated code is
/// edited; the build fails if it no longer has exactly the expected fields.
fn share_specs() -> Result<(), Box<dyn Error>> {
    let path = std::path::Path::new(&std::env::var("OUT_DIR")?).join("tug.v1.rs");
    let code = std::fs::read_to_string(&path)?;
    let field = "::core::option::Option<ServiceSpec>,";
    let found = code.matches(field).count();
    if found != SPEC_FIELDS {
        return Err(format!(
            "expected {SPEC_FIELDS} fields of type ServiceSpec in the generated code, found \
             {found}: update SPEC_FIELDS in api/build.rs (and whatever shares specs)"
        )
        .into());
    }
    let shared = code.replace(
        field,
        "::core::option::Option<crate::shared::Shared<ServiceSpec>>,",
    );
    std::fs::write(&path, shared)?;
    Ok(())
}
