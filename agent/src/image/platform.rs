//! Platforms (`os/arch[/variant]`) and how an image index entry is chosen for one.

use std::fmt;

#[derive(Debug, thiserror::Error)]
#[error("invalid platform {0:?}: expected OS/ARCH or OS/ARCH/VARIANT, e.g. linux/arm64/v8")]
pub struct PlatformError(String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Platform, PlatformError> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform::new(os, arch, None)),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Platform::new(os, arch, Some(v))),
            _ => Err(PlatformError(s.to_string())),
        }
    }

    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// The platform of the machine this runs on, in OCI's words (`linux/amd64`, `linux/arm64/v8`).
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        let variant = (arch == "arm64").then_some("v8");
        Platform::new(std::env::consts::OS, arch, variant)
    }

    /// Whether an index entry for `other` can run as `self`. A variant asked for must match
    /// (arm64 without a variant is v8); no variant asked for takes any.
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        let norm = |p: &Platform| match (p.architecture.as_str(), p.variant.as_deref()) {
            ("arm64", None) => Some("v8".to_string()),
            (_, v) => v.map(str::to_string),
        };
        match &self.variant {
            None => true,
            Some(_) => norm(self) == norm(other),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Platform;

    #[test]
    fn parse_and_match() -> Result<(), super::PlatformError> {
        let amd = Platform::parse("linux/amd64")?;
        let arm = Platform::parse("linux/arm64/v8")?;
        assert_eq!(arm.to_string(), "linux/arm64/v8");
        assert!(amd.matches(&Platform::new("linux", "amd64", None)));
        assert!(!amd.matches(&Platform::new("linux", "arm64", Some("v8"))));
        assert!(
            arm.matches(&Platform::new("linux", "arm64", None)),
            "arm64 is v8 by default"
        );
        assert!(!arm.matches(&Platform::new("linux", "arm64", Some("v9"))));
        assert!(
            Platform::parse("linux/arm64")
                .map(|p| p.matches(&arm))
                .unwrap_or(false)
        );
        assert!(!amd.matches(&Platform::new("windows", "amd64", None)));
        Ok(())
    }

    #[test]
    fn bad_platforms_are_errors() {
        for bad in [
            "linux",
            "linux/",
            "/amd64",
            "linux/amd64/v8/x",
            "linux/am d64",
        ] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_is_linux_here() {
        assert_eq!(Platform::host().os, "linux");
    }
}
