//! Checks on values from outside that reach a file path or a shell command: a work item
//! key names the post-deploy log file, the repo and the shas are substituted into the
//! rollback command. Keys and repositories follow the git layer's one rule.

/// A work item key, by the git layer's one rule (`orchestrator_git::validate_work_item_key`).
pub fn work_item(v: &str) -> Result<&str, String> {
    let v = v.trim();
    orchestrator_git::validate_work_item_key(v).map_err(|e| e.to_string())
}

/// A repository, `owner/name`, by the git layer's one rule (`orchestrator_git::validate_repo`).
pub fn repo(v: &str) -> Result<&str, String> {
    let v = v.trim();
    orchestrator_git::validate_repo(v)
        .map(|_| v)
        .map_err(|e| e.to_string())
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
    fn keys_and_repos_are_the_git_layers_rule() {
        for (v, ok) in [
            ("ORCH-1", true),
            ("a_b.c", false),
            ("a/b", false),
            ("-rf", false),
        ] {
            assert_eq!(work_item(v).is_ok(), ok, "{v}");
            assert_eq!(
                orchestrator_git::validate_work_item_key(v).is_ok(),
                ok,
                "{v}"
            );
        }
        for (v, ok) in [
            ("acme/shop", true),
            ("acme/shop.git", false),
            ("x/y..z", false),
            ("x/$(id)", false),
        ] {
            assert_eq!(repo(v).is_ok(), ok, "{v}");
            assert_eq!(orchestrator_git::validate_repo(v).is_ok(), ok, "{v}");
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
