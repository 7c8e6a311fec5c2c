//! The three documents a pull reads, parsed just far enough: image indexes (OCI index, Docker
//! manifest list), image manifests (OCI, Docker schema2) and the media types of their layers.

use serde::Deserialize;

use super::platform::Platform;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// What a pull accepts, OCI and Docker together (distribution answers 404 for an OCI manifest
/// to a client that does not accept the OCI type).
pub const ACCEPT: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub urls: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IndexPlatform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexEntry {
    #[serde(default)]
    pub media_type: Option<String>,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<IndexPlatform>,
}

impl IndexEntry {
    pub fn platform(&self) -> Option<Platform> {
        self.platform
            .as_ref()
            .map(|p| Platform::new(&p.os, &p.architecture, p.variant.as_deref()))
    }
}

#[derive(Debug, Clone)]
pub struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone)]
pub enum Document {
    Index(Vec<IndexEntry>),
    Manifest(ImageManifest),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<IndexEntry>>,
}

/// Parse a manifest or index; the error says what is wrong with it.
pub fn parse(bytes: &[u8]) -> Result<Document, String> {
    let raw: Raw =
        serde_json::from_slice(bytes).map_err(|e| format!("not a valid manifest: {e}"))?;
    if raw.schema_version != 2 {
        return Err(format!(
            "schema version {} (only 2 is supported; schema 1 images are obsolete)",
            raw.schema_version
        ));
    }
    match (
        raw.media_type.as_deref(),
        raw.manifests,
        raw.config,
        raw.layers,
    ) {
        (Some(OCI_INDEX | DOCKER_LIST) | None, Some(manifests), None, _) => {
            Ok(Document::Index(manifests))
        }
        (Some(OCI_MANIFEST | DOCKER_MANIFEST) | None, None, Some(config), Some(layers)) => {
            Ok(Document::Manifest(ImageManifest { config, layers }))
        }
        (Some(other), _, _, _) if !ACCEPT.contains(&other) => Err(format!("media type {other}")),
        _ => Err("neither an image manifest nor an index".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_manifests_with_and_without_media_type() {
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:a","size":1},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:b","size":2}]}"#;
        assert!(
            matches!(parse(m), Ok(Document::Manifest(ImageManifest { ref layers, .. })) if layers.len() == 1)
        );
        let i = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{"digest":"sha256:c","size":3,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}}]}"#;
        match parse(i) {
            Ok(Document::Index(entries)) => assert_eq!(
                entries[0].platform().map(|p| p.to_string()),
                Some("linux/arm64/v8".into())
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_schema1_artifacts_and_garbage() {
        assert!(parse(br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#).is_err());
        assert!(
            parse(
                br#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart","layers":[]}"#
            )
            .is_err()
        );
        assert!(parse(b"not json").is_err());
        assert!(parse(br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"d","size":-1},"layers":[]}"#).is_err());
    }
}
