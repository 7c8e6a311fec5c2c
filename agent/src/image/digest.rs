//! Content digests (`sha256:<64 lowercase hex>`), the names of everything in the store.

use std::fmt;

use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} is not ALGORITHM:HEX")]
    Format(String),
    #[error("digest {0:?} uses an unsupported algorithm (only sha256 is supported)")]
    Algorithm(String),
    #[error("digest {0:?} is not 64 lowercase hex characters")]
    Hex(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let (algo, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Format(s.into()))?;
        if algo != "sha256" {
            return Err(DigestError::Algorithm(s.into()));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Hex(s.into()));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }

    /// The sha256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(Sha256::digest(bytes)),
        }
    }

    pub(crate) fn from_hasher(h: Sha256) -> Digest {
        Digest {
            hex: hex::encode(h.finalize()),
        }
    }

    /// The 64 hex characters, safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

#[cfg(test)]
mod tests {
    use super::Digest;

    #[test]
    fn parses_and_prints_sha256() {
        let d = Digest::of(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(matches!(Digest::parse(&d.to_string()), Ok(p) if p == d));
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha512:e3b0",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0",
            "sha256:../../../../etc/passwd0000000000000000000000000000000000000000",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }
}
