//! Registry credentials from a Docker-style `config.json` (`{"auths": {"HOST": {"auth":
//! base64("user:pass")}}}`), as written by `docker login`, `skopeo login` or by hand.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read registry credentials {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registry credentials {path} are not valid JSON: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "registry credentials {path}: the entry for {registry} has an `auth` that is not base64 of USER:PASSWORD"
    )]
    BadAuth { path: PathBuf, registry: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Basic { username: String, password: String },
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Credentials for every registry, loaded once.
#[derive(Debug, Default)]
pub struct CredentialStore {
    path: Option<PathBuf>,
    file: ConfigFile,
}

impl CredentialStore {
    /// No credentials: every registry is anonymous.
    pub fn empty() -> CredentialStore {
        CredentialStore::default()
    }

    /// Load `path`; a missing file means no credentials.
    pub fn load(path: &Path) -> Result<CredentialStore, CredentialsError> {
        let raw = match std::fs::read(path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(CredentialStore::empty());
            }
            Err(source) => {
                return Err(CredentialsError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        let file = serde_json::from_slice(&raw).map_err(|source| CredentialsError::Parse {
            path: path.into(),
            source,
        })?;
        Ok(CredentialStore {
            path: Some(path.into()),
            file,
        })
    }

    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
    }

    /// Credentials for `registry` (`host[:port]`, `docker.io` for Docker Hub).
    pub fn for_registry(&self, registry: &str) -> Result<Credentials, CredentialsError> {
        let wanted = normalize(registry);
        let Some((key, entry)) = self.file.auths.iter().find(|(k, _)| normalize(k) == wanted)
        else {
            return Ok(Credentials::Anonymous);
        };
        let bad = || CredentialsError::BadAuth {
            path: self.path.clone().unwrap_or_default(),
            registry: key.clone(),
        };
        if let Some(auth) = &entry.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad())?;
            let text = String::from_utf8(raw).map_err(|_| bad())?;
            let (username, password) = text.split_once(':').ok_or_else(bad)?;
            return Ok(Credentials::Basic {
                username: username.into(),
                password: password.into(),
            });
        }
        match (&entry.username, &entry.password) {
            (Some(u), Some(p)) => Ok(Credentials::Basic {
                username: u.clone(),
                password: p.clone(),
            }),
            _ => Ok(Credentials::Anonymous),
        }
    }
}

/// `https://index.docker.io/v1/`, `index.docker.io`, `docker.io` are all Docker Hub; other keys
/// may carry a scheme or a path.
fn normalize(key: &str) -> String {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(json: &str) -> Result<CredentialStore, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.json");
        std::fs::write(&path, json)?;
        Ok(CredentialStore::load(&path)?)
    }

    #[test]
    fn reads_base64_auth_and_plain_fields() -> Result<(), Box<dyn std::error::Error>> {
        let s = store(
            r#"{"auths": {
            "127.0.0.1:5000": {"auth": "dHVnOnMzY3I6ZXQ="},
            "https://index.docker.io/v1/": {"username": "hub", "password": "pw"}
        }}"#,
        )?;
        assert_eq!(
            s.for_registry("127.0.0.1:5000")?,
            Credentials::Basic {
                username: "tug".into(),
                password: "s3cr:et".into()
            }
        );
        assert_eq!(
            s.for_registry("docker.io")?,
            Credentials::Basic {
                username: "hub".into(),
                password: "pw".into()
            }
        );
        assert_eq!(s.for_registry("other:5000")?, Credentials::Anonymous);
        Ok(())
    }

    #[test]
    fn missing_file_is_anonymous_and_bad_file_is_an_error() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        assert_eq!(
            CredentialStore::load(&dir.path().join("nope.json"))?.for_registry("x")?,
            Credentials::Anonymous
        );
        assert!(store("{not json").is_err());
        let s = store(r#"{"auths": {"h": {"auth": "!!!"}}}"#)?;
        assert!(s.for_registry("h").is_err());
        Ok(())
    }
}
