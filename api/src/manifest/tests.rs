use std::path::PathBuf;

use super::service::{Probe, RestartPolicy, UpdateOrder, VolumeSource};
use super::*;

const HEAD: &str =
    "apiVersion: tug.dev/v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  image: busybox\n";

fn one_error(text: &str) -> String {
    match parse_str("svc.yaml", text) {
        Ok(v) => panic!("accepted: {v:?}"),
        Err(ManifestErrors(errors)) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            errors[0].to_string()
        }
    }
}

#[test]
fn a_full_manifest_parses_with_every_field() -> Result<(), ManifestErrors> {
    let text = "apiVersion: tug.dev/v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {app: web, tug.dev/tier: front}
spec:
  image: registry:5000/shop/web:1.2
  replicas: 3
  command: [/bin/httpd]
  args: [-f, -p, '8080']
  env:
    - {name: MODE, value: prod}
  ports:
    - {name: http, containerPort: 8080, hostPort: 80}
    - {containerPort: 5353, protocol: UDP}
  resources: {cpu: 500m, memory: 128Mi}
  volumes:
    - {name: data, containerPath: /data}
    - {hostPath: /etc/ssl, containerPath: /etc/ssl, readOnly: true}
  restartPolicy: OnFailure
  healthCheck:
    http: {path: /healthz, port: 8080}
    interval: 5s
    timeout: 500ms
    retries: 2
  stopGracePeriod: 30s
  placement:
    constraints: [zone==a, disk!=hdd]
    spread: zone
  update: {maxSurge: 2, maxUnavailable: 1, order: stop-first}
";
    let loaded = parse_str("web.yaml", text)?;
    let m = &loaded[0].manifest;
    assert_eq!(
        (m.metadata.name.0.as_str(), m.metadata.namespace.0.as_str()),
        ("web", "shop")
    );
    let s = &m.spec;
    assert_eq!(
        (s.replicas, s.resources.cpu, s.resources.memory),
        (3, Some(Cpu(500)), Some(Memory(128 << 20)))
    );
    assert_eq!(s.restart_policy, RestartPolicy::OnFailure);
    assert_eq!(
        s.volumes[0].source,
        VolumeSource::Name(service::Name("data".into()))
    );
    assert!(s.volumes[1].read_only);
    let hc = s.health_check.as_ref().map(|h| {
        (
            h.probe.clone(),
            h.interval.as_millis(),
            h.timeout.as_millis(),
            h.retries,
        )
    });
    assert_eq!(
        hc,
        Some((
            Probe::Http {
                path: "/healthz".into(),
                port: 8080
            },
            5000,
            500,
            2
        ))
    );
    assert_eq!(
        (s.update.max_surge, s.update.max_unavailable, s.update.order),
        (2, 1, UpdateOrder::StopFirst)
    );
    assert!(!s.placement.constraints[1].equal);

    let p = m.to_proto();
    let spec = p.spec.unwrap_or_default();
    assert_eq!(
        spec.resources.map(|r| (r.cpu_millis, r.memory_bytes)),
        Some((500, 128 << 20))
    );
    assert_eq!(
        spec.ports[1].protocol,
        i32::from(crate::v1::port_spec::Protocol::Udp)
    );
    assert_eq!(spec.stop_grace_period_ms, 30_000);
    assert_eq!(
        spec.placement.as_ref().map(|p| p.constraints.clone()),
        Some(vec!["zone==a".to_string(), "disk!=hdd".to_string()])
    );
    Ok(())
}

#[test]
fn defaults_fill_what_is_left_out() -> Result<(), ManifestErrors> {
    let m = &parse_str("svc.yaml", HEAD)?[0].manifest;
    assert_eq!(m.metadata.namespace.0, "default");
    assert_eq!(m.spec.replicas, 1);
    assert_eq!(m.spec.restart_policy, RestartPolicy::Always);
    assert_eq!(m.spec.stop_grace_period.as_millis(), 10_000);
    assert_eq!(
        (m.spec.update.max_surge, m.spec.update.max_unavailable),
        (1, 0)
    );
    Ok(())
}

#[test]
fn each_mistake_has_its_exact_error() {
    let cases: &[(&str, &str)] = &[
        (
            "  replica: 3\n",
            "svc.yaml:7:3: spec: unknown field `replica`, expected one of `image`, `replicas`, `command`, `args`, `env`, `ports`, `resources`, `volumes`, `restartPolicy`, `healthCheck`, `stopGracePeriod`, `placement`, `update`",
        ),
        (
            "  replicas: -1\n",
            "svc.yaml:7:13: spec.replicas: replicas must be between 0 and 4294967295, got -1",
        ),
        (
            "  replicas: many\n",
            "svc.yaml:7:13: spec.replicas: invalid type: string \"many\", expected a number of replicas",
        ),
        (
            "  resources: {memory: 12MB}\n",
            "svc.yaml:7:23: spec.resources.memory: invalid memory quantity \"12MB\": use bytes or a suffix such as 128Mi, 1Gi, 500M",
        ),
        (
            "  resources: {cpu: 1.5m}\n",
            "svc.yaml:7:20: spec.resources.cpu: invalid cpu quantity \"1.5m\": use cores (0.5, 2) or millicores (500m)",
        ),
        (
            "  resources: {cpu: 0}\n",
            "svc.yaml:7:20: spec.resources.cpu: quantity \"0\" must be more than zero (leave it out for no limit)",
        ),
        (
            "  stopGracePeriod: 10\n",
            "svc.yaml:7:20: spec.stopGracePeriod: duration 10 has no unit: write e.g. 10s or 10ms",
        ),
        (
            "  stopGracePeriod: 10 sec\n",
            "svc.yaml:7:20: spec.stopGracePeriod: invalid duration \"10 sec\": use a number and a unit, e.g. 500ms, 10s, 1m30s, 2h",
        ),
        (
            "  ports:\n    - {containerPort: 80}\n    - {containerPort: 80}\n",
            "svc.yaml:6:3: spec: duplicate port: containerPort 80/TCP is listed twice",
        ),
        (
            "  ports:\n    - {containerPort: 80, hostPort: 8080}\n    - {containerPort: 81, hostPort: 8080}\n",
            "svc.yaml:6:3: spec: duplicate port: hostPort 8080/TCP is listed twice",
        ),
        (
            "  ports:\n    - {containerPort: 70000}\n",
            "svc.yaml:8:23: spec.ports[0].containerPort: port 70000 is out of range 1-65535",
        ),
        (
            "  ports:\n    - {containerPort: 80, protocol: SCTP}\n",
            "svc.yaml:8:37: spec.ports[0].protocol: unknown variant `SCTP`, expected `TCP` or `UDP`",
        ),
        (
            "  env:\n    - {name: 1BAD, value: x}\n",
            "svc.yaml:8:14: spec.env[0].name: invalid environment variable name \"1BAD\"",
        ),
        (
            "  env:\n    - {name: A}\n    - {name: A}\n",
            "svc.yaml:6:3: spec: environment variable \"A\" is set twice",
        ),
        (
            "  restartPolicy: Sometimes\n",
            "svc.yaml:7:18: spec.restartPolicy: unknown variant `Sometimes`, expected one of `Always`, `OnFailure`, `Never`",
        ),
        (
            "  healthCheck: {interval: 5s}\n",
            "svc.yaml:6:3: spec: healthCheck needs exactly one of exec, http or tcp",
        ),
        (
            "  healthCheck: {tcp: {port: 80}, interval: 1s, timeout: 2s}\n",
            "svc.yaml:6:3: spec: healthCheck timeout 2s is longer than its interval 1s",
        ),
        (
            "  volumes:\n    - {containerPath: data, name: d}\n",
            "svc.yaml:8:5: spec.volumes: volume containerPath \"data\" must be an absolute path",
        ),
        (
            "  volumes:\n    - {containerPath: /d, name: d, hostPath: /x}\n",
            "svc.yaml:8:5: spec.volumes: volume at \"/d\" needs exactly one of name or hostPath",
        ),
        (
            "  placement: {constraints: [zone=a]}\n",
            "svc.yaml:7:29: spec.placement.constraints[0]: invalid constraint \"zone=a\": write LABEL==VALUE or LABEL!=VALUE",
        ),
        (
            "  update: {maxSurge: 0, maxUnavailable: 0}\n",
            "svc.yaml:6:3: spec: update: maxSurge and maxUnavailable cannot both be 0 (the rollout could never make progress)",
        ),
    ];
    for (extra, expected) in cases {
        assert_eq!(
            one_error(&format!("{HEAD}{extra}")),
            *expected,
            "for {extra:?}"
        );
    }
    let whole: &[(&str, &str)] = &[
        (
            "apiVersion: tug.dev/v2\nkind: Service\n",
            "svc.yaml:1:13: apiVersion: unknown variant `tug.dev/v2`, expected `tug.dev/v1`",
        ),
        (
            "apiVersion: tug.dev/v1\nkind: Deployment\n",
            "svc.yaml:2:7: kind: unknown variant `Deployment`, expected `Service`",
        ),
        (
            "apiVersion: tug.dev/v1\nkind: Service\nmetadata:\n  name: Web_1\nspec:\n  image: x\n",
            "svc.yaml:4:9: metadata.name: invalid name \"Web_1\": use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit",
        ),
        (
            "apiVersion: tug.dev/v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  replicas: 2\n",
            "svc.yaml:6:3: spec: missing field `image`",
        ),
        (
            "apiVersion: tug.dev/v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  image: Bad/Image\n",
            "svc.yaml:6:10: spec.image: invalid image reference \"Bad/Image\": invalid reference format",
        ),
    ];
    for (text, expected) in whole {
        assert_eq!(one_error(text), *expected, "for {text:?}");
    }
}

#[test]
fn broken_yaml_is_one_error_and_never_hangs() {
    let e = one_error("apiVersion: tug.dev/v1\nkind: [Service\n");
    assert!(e.starts_with("svc.yaml:2:"), "{e}");
}

#[test]
fn several_documents_and_their_line_numbers() {
    let text = format!(
        "{HEAD}---\n{}\n---\n",
        HEAD.replace("name: web", "name: api")
            .replace("image: busybox", "image: busybox\n  replicas: x")
    );
    assert_eq!(
        one_error(&text),
        "svc.yaml:14:13: spec.replicas: invalid type: string \"x\", expected a number of replicas"
    );
    let two = format!("{HEAD}---\n{}---\n", HEAD.replace("name: web", "name: api"));
    assert_eq!(parse_str("svc.yaml", &two).map(|v| v.len()), Ok(2));
}

#[test]
fn a_directory_is_all_or_nothing() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("a.yaml"), HEAD)?;
    std::fs::write(dir.path().join("b.yml"), HEAD.replace("web", "api"))?;
    std::fs::write(dir.path().join("notes.txt"), "not a manifest")?;
    assert_eq!(load(&[dir.path().to_path_buf()])?.len(), 2);

    std::fs::write(
        dir.path().join("c.yaml"),
        format!("{HEAD}  replicas: -3\n").replace("web", "bad"),
    )?;
    let err = load(&[dir.path().to_path_buf()])
        .err()
        .ok_or("accepted a bad directory")?;
    assert_eq!(err.0.len(), 1);
    assert!(
        err.0[0].to_string().ends_with(
            "c.yaml:7:13: spec.replicas: replicas must be between 0 and 4294967295, got -3"
        ),
        "{err}"
    );

    std::fs::write(dir.path().join("c.yaml"), HEAD)?;
    let err = load(&[dir.path().to_path_buf()])
        .err()
        .ok_or("accepted a duplicate")?;
    assert!(
        err.to_string()
            .contains("service default/web is also defined in"),
        "{err}"
    );

    let err = load(&[dir.path().join("missing.yaml")])
        .err()
        .ok_or("accepted a missing file")?;
    assert!(
        err.to_string().contains("missing.yaml: cannot read"),
        "{err}"
    );
    Ok(())
}

#[test]
fn every_example_manifest_is_valid() -> Result<(), ManifestErrors> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests"));
    let loaded = load(&[dir])?;
    assert!(
        loaded.len() >= 3,
        "expected the examples in manifests/: {}",
        loaded.len()
    );
    for l in loaded {
        let p = l.manifest.to_proto();
        assert!(p.spec.is_some_and(|s| !s.image.is_empty()), "{}", l.file);
    }
    Ok(())
}
