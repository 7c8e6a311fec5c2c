//! Image references as users write them, normalised the way Docker does: `busybox` is
//! `docker.io/library/busybox:latest`, `user/app:1.2` is `docker.io/user/app:1.2`, and
//! `host:5000/ns/app:tag@sha256:...` pins a digest (which then wins over the tag).

use std::fmt;

use oci_client::Reference;

#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    input: String,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    pub fn parse(input: &str) -> Result<ImageRef, ReferenceError> {
        let err = |reason: String| ReferenceError {
            input: input.to_string(),
            reason,
        };
        if input.trim() != input || input.is_empty() {
            return Err(err("empty, or surrounded by whitespace".into()));
        }
        let inner = Reference::try_from(input).map_err(|e| err(e.to_string()))?;
        if let Some(digest) = inner.digest() {
            crate::image::digest::Digest::parse(digest).map_err(|e| err(e.to_string()))?;
        }
        Ok(ImageRef { inner })
    }

    /// The registry as written (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// `library/busybox`, `ns/app`.
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// `registry/repository`, the name images are listed under.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry(), self.repository())
    }

    /// The same repository at another digest.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            inner: self.inner.clone_with_digest(digest.to_string()),
        }
    }

    pub(crate) fn oci(&self) -> &Reference {
        &self.inner
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.whole())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::ImageRef;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(s: &str) -> ImageRef {
        match ImageRef::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn short_names_are_docker_hub_library_images_at_latest() {
        let r = parse("busybox");
        assert_eq!(
            (r.registry(), r.repository(), r.tag(), r.digest()),
            ("docker.io", "library/busybox", Some("latest"), None)
        );
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
    }

    #[test]
    fn user_images_stay_in_their_namespace() {
        let r = parse("user/app:1.2");
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("docker.io", "user/app", Some("1.2"))
        );
    }

    #[test]
    fn registry_with_port_and_digest() {
        let r = parse(&format!("host:5000/ns/app@{D}"));
        assert_eq!(
            (r.registry(), r.repository(), r.tag(), r.digest()),
            ("host:5000", "ns/app", None, Some(D))
        );
        assert_eq!(r.name(), "host:5000/ns/app");
    }

    #[test]
    fn tag_and_digest_together_keep_both() {
        let r = parse(&format!("host:5000/app:tag@{D}"));
        assert_eq!(
            (r.repository(), r.tag(), r.digest()),
            ("app", Some("tag"), Some(D))
        );
        assert!(r.to_string().ends_with(D));
    }

    #[test]
    fn localhost_and_dotted_hosts_are_registries() {
        assert_eq!(parse("localhost/app").registry(), "localhost");
        assert_eq!(parse("registry.example.com/a/b/c:v1").repository(), "a/b/c");
    }

    #[test]
    fn invalid_references_are_clear_errors() {
        for bad in [
            "",
            " busybox",
            "Busybox",
            "busybox:",
            "busybox:bad tag",
            "host:5000/app@sha256:abc",
            "app@md5:0123456789abcdef0123456789abcdef",
            "a//b",
            "/app",
        ] {
            match ImageRef::parse(bad) {
                Ok(r) => panic!("{bad:?} parsed as {r}"),
                Err(e) => assert!(e.to_string().starts_with("invalid image reference"), "{e}"),
            }
        }
    }
}
