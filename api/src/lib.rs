//! tug's wire contract.
//!
//! The protobuf definitions live in `api/proto/tug/v1/`; this crate compiles them (with a pure-Rust
//! protobuf compiler, so no system `protoc` is needed) into prost messages and tonic clients and
//! servers. Controller, agent, CLI and the end-to-end harness all talk through these types.

pub mod manifest;
pub mod metrics_http;
pub mod shared;

/// `tug.v1`: objects, the operator's Control service, and the Raft peer service.
pub mod v1 {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("tug.v1");
}

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn service_round_trips_through_the_wire_format() {
        let svc = v1::Service {
            metadata: Some(v1::ObjectMeta {
                name: "web".into(),
                namespace: "default".into(),
                labels: [("app".to_string(), "web".to_string())].into(),
                ..Default::default()
            }),
            spec: Some(
                v1::ServiceSpec {
                    image: "busybox:latest".into(),
                    replicas: 3,
                    ports: vec![v1::PortSpec {
                        name: "http".into(),
                        container_port: 80,
                        host_port: 8080,
                        protocol: v1::port_spec::Protocol::Tcp.into(),
                    }],
                    restart_policy: v1::RestartPolicy::OnFailure.into(),
                    ..Default::default()
                }
                .into(),
            ),
            previous_spec: None,
        };
        let bytes = svc.encode_to_vec();
        let back = v1::Service::decode(bytes.as_slice()).map_err(|e| e.to_string());
        assert_eq!(back, Ok(svc));
    }

    #[test]
    fn control_service_is_generated_for_both_sides() {
        // The controller implements the server trait; the CLI and the e2e harness use the client.
        assert_eq!(v1::control_server::SERVICE_NAME, "tug.v1.Control");
        let _client: Option<v1::control_client::ControlClient<tonic::transport::Channel>> = None;
    }
}
