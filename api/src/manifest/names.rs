//! Names: object names and namespaces are DNS-1123 labels; label keys and values follow the
//! Kubernetes rules; environment variable names are POSIX.

/// Lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63.
pub fn check_dns_label(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {s:?}: use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit"
        ))
    }
}

fn label_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)
}

/// `name` or `prefix/name` (prefix a DNS subdomain); name at most 63 of `[A-Za-z0-9._-]`.
pub fn check_label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let prefix_ok = prefix
        .is_none_or(|p| p.len() <= 253 && p.split('.').all(|l| check_dns_label("", l).is_ok()));
    if prefix_ok && label_segment(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid label key {s:?}: use [prefix/]name with at most 63 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Empty, or at most 63 of `[A-Za-z0-9._-]` starting and ending with a letter or digit.
pub fn check_label_value(key: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || label_segment(s) {
        Ok(())
    } else {
        Err(format!(
            "invalid value {s:?} for label {key:?}: at most 63 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
pub fn check_env_name(s: &str) -> Result<(), String> {
    let ok = s
        .as_bytes()
        .first()
        .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid environment variable name {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["web", "a", "my-app-2", &"a".repeat(63)] {
            assert!(check_dns_label("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "-web", "web-", "my_app", "a.b", &"a".repeat(64)] {
            assert!(check_dns_label("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_and_env() {
        assert!(check_label_key("app").is_ok() && check_label_key("tug.dev/zone").is_ok());
        assert!(
            check_label_key("").is_err()
                && check_label_key("a/b/c").is_err()
                && check_label_key("-x").is_err()
        );
        assert!(check_label_value("k", "").is_ok() && check_label_value("k", "v1.2_x").is_ok());
        assert!(check_label_value("k", "a b").is_err());
        assert!(check_env_name("PATH").is_ok() && check_env_name("_X1").is_ok());
        assert!(
            check_env_name("1X").is_err()
                && check_env_name("A-B").is_err()
                && check_env_name("").is_err()
        );
    }
}
