//! Checks on values from outside that reach a file path or a shell command: a work item
//! key names the post-deploy log file, the repo and the shas are substituted into the
//! rollback command.

/// A work item key: printable, at most 200 characters, no leading `-` or `.`, no path separators.
pub fn work_item(v: &str) -> Result<&str, String> {
    let v = v.trim();
    if v.len() > 200 {
        return Err("must be at most 200 characters".to_owned());
    }
    if v.starts_with('-') || v.starts_with('.') {
        return Err("must not start with '-' or '.'".to_owned());
    }
    if v.contains("..") || v.contains('/') || v.contains('\\') {
        return Err("must not contain '..' or path separators".to_owned());
    }
    if v.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain spaces or control characters".to_owned());
    }
    Ok(v)
}

/// A repository, `owner/name`: ASCII letters, digits, `.`, `_`, `-`; no part starts with `-` or `.`.
pub fn repo(v: &str) -> Result<&str, String> {
    let v = v.trim();
    let parts: Vec<&str> = v.split('/').collect();
    if parts.len() != 2 {
        return Err("must be owner/name".to_owned());
    }
    for p in parts {
        if p.is_empty() || p.len() > 100 {
            return Err("owner and name must be 1 to 100 characters".to_owned());
        }
        if p.starts_with('-') || p.starts_with('.') {
            return Err("owner and name must not start with '-' or '.'".to_owned());
        }
        if !p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err("only letters, digits, '.', '_' and '-' are allowed".to_owned());
        }
    }
    if v.contains("..") {
        return Err("must not contain '..'".to_owned());
    }
    Ok(v)
}

/// A git commit id: 7 to 64 hexadecimal digits.
pub fn sha(v: &str) -> Result<&str, String> {
    let v = v.trim();
    if !(7..=64).contains(&v.len()) || !v.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("must be a commit id of 7 to 64 hexadecimal digits".to_owned());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_item_keys() {
        for ok in ["ORCH-1", "SHOP-1234", "a_b.c"] {
            assert!(work_item(ok).is_ok(), "{ok}");
        }
        for bad in [
            "-rf",
            ".hidden",
            "a/b",
            "a\\b",
            "a..b",
            "a b",
            "a\nb",
            &"x".repeat(201),
        ] {
            assert!(work_item(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repos() {
        for ok in ["acme/shop", "a-b/c.d_e", "Ops/Orchestrator"] {
            assert!(repo(ok).is_ok(), "{ok}");
        }
        for bad in [
            "shop", "a/b/c", "/b", "a/", "-x/y", "x/-y", ".x/y", "x/y..z", "x/y;rm", "x/y z",
            "x/$(id)",
        ] {
            assert!(repo(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shas() {
        assert!(sha("abc1234").is_ok());
        assert!(sha(&"f".repeat(40)).is_ok());
        for bad in ["abc123", "xyz1234", "abc1234;", &"a".repeat(65), ""] {
            assert!(sha(bad).is_err(), "{bad:?}");
        }
    }
}
