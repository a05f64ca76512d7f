//! Validation of the names that reach git or a file path from outside (a webhook, an RPC):
//! nothing that git could read as an option (a leading `-`), nothing that climbs out of a
//! directory (`..`), no path separators where none belong, no control characters.

use std::fmt;

/// A name that failed validation; the message says which rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} '{shown}' is not valid: {reason}")]
pub struct InvalidName {
    pub what: &'static str,
    /// The value with control characters escaped, so that a log line stays one line.
    pub shown: String,
    pub reason: &'static str,
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> InvalidName {
    let shown: String = value
        .chars()
        .take(80)
        .flat_map(char::escape_debug)
        .collect();
    InvalidName {
        what,
        shown,
        reason,
    }
}

/// Rules every name shares: not empty, bounded, no leading `-`, no control characters.
fn common(what: &'static str, value: &str, max: usize) -> Result<(), InvalidName> {
    if value.is_empty() {
        return Err(invalid(what, value, "it is empty"));
    }
    if value.len() > max {
        return Err(invalid(what, value, "it is too long"));
    }
    if value.starts_with('-') {
        return Err(invalid(what, value, "it starts with '-'"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(invalid(what, value, "it holds a control character"));
    }
    if value.contains("..") {
        return Err(invalid(what, value, "it holds '..'"));
    }
    Ok(())
}

/// Checks a work item key such as `ORCH-65`: a project identifier (letters, digits, `_`,
/// starting with a letter or digit), a dash, and a sequence number.
pub fn validate_work_item_key(key: &str) -> Result<&str, InvalidName> {
    const WHAT: &str = "work item key";
    common(WHAT, key, 64)?;
    let Some((ident, seq)) = key.rsplit_once('-') else {
        return Err(invalid(WHAT, key, "expected IDENT-NUMBER, e.g. ORCH-65"));
    };
    let ident_ok = !ident.is_empty()
        && ident.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && ident
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    let seq_ok = !seq.is_empty() && seq.len() <= 12 && seq.chars().all(|c| c.is_ascii_digit());
    if !ident_ok || !seq_ok {
        return Err(invalid(WHAT, key, "expected IDENT-NUMBER, e.g. ORCH-65"));
    }
    Ok(key)
}

/// A repository as `owner/name`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName {
    pub owner: String,
    pub name: String,
}

impl RepoName {
    /// Parses and validates `owner/name`.
    pub fn parse(repo: &str) -> Result<Self, InvalidName> {
        validate_repo(repo)
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// Checks a repository `owner/name`: exactly one `/`, each part of letters, digits, `-`,
/// `_` and `.`, neither starting with `-` or `.`.
pub fn validate_repo(repo: &str) -> Result<RepoName, InvalidName> {
    const WHAT: &str = "repo";
    common(WHAT, repo, 201)?;
    let Some((owner, name)) = repo.split_once('/') else {
        return Err(invalid(WHAT, repo, "expected owner/name"));
    };
    for part in [owner, name] {
        if part.is_empty() || part.len() > 100 {
            return Err(invalid(WHAT, repo, "expected owner/name"));
        }
        if part.starts_with('-') || part.starts_with('.') {
            return Err(invalid(WHAT, repo, "a part starts with '-' or '.'"));
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                WHAT,
                repo,
                "only letters, digits, '-', '_' and '.' are allowed, with one '/'",
            ));
        }
    }
    if name.ends_with(".git") {
        return Err(invalid(WHAT, repo, "give the name without '.git'"));
    }
    Ok(RepoName {
        owner: owner.to_owned(),
        name: name.to_owned(),
    })
}

/// Checks a branch name: git's own rules (`git check-ref-format --branch`) plus ours — no
/// leading `-`, no `..`, no spaces. Slashes separate components, as in `orch/ORCH-65`.
pub fn validate_branch(branch: &str) -> Result<&str, InvalidName> {
    const WHAT: &str = "branch";
    common(WHAT, branch, 200)?;
    if branch.chars().any(|c| {
        c.is_whitespace() || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\' | '\u{7f}')
    }) {
        return Err(invalid(
            WHAT,
            branch,
            "it holds a space or one of ~ ^ : ? * [ \\",
        ));
    }
    if branch.contains("@{") || branch == "@" {
        return Err(invalid(WHAT, branch, "it holds '@{' or is '@'"));
    }
    if branch.ends_with('/') || branch.ends_with('.') || branch.ends_with(".lock") {
        return Err(invalid(WHAT, branch, "it ends with '/', '.' or '.lock'"));
    }
    for comp in branch.split('/') {
        if comp.is_empty() {
            return Err(invalid(
                WHAT,
                branch,
                "it has an empty component ('//' or a leading '/')",
            ));
        }
        if comp.starts_with('.') || comp.starts_with('-') || comp.ends_with(".lock") {
            return Err(invalid(
                WHAT,
                branch,
                "a component starts with '.' or '-', or ends with '.lock'",
            ));
        }
    }
    Ok(branch)
}

/// Whether `sha` is a full commit id as git prints it: 40 (SHA-1) or 64 (SHA-256) hex digits.
pub fn is_commit_id(sha: &str) -> bool {
    matches!(sha.len(), 40 | 64) && sha.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks a relative file path inside a repository, such as
/// `docs/work-items/ORCH-65/review.md`: no leading `/` or `-`, no `..` or `.` components.
pub fn validate_path(path: &str) -> Result<&str, InvalidName> {
    const WHAT: &str = "path";
    common(WHAT, path, 1000)?;
    if path.starts_with('/') || path.contains('\\') {
        return Err(invalid(
            WHAT,
            path,
            "it must be relative, with '/' separators",
        ));
    }
    for comp in path.split('/') {
        if comp.is_empty() || comp == "." || comp.starts_with('-') {
            return Err(invalid(
                WHAT,
                path,
                "it has an empty, '.' or '-'-leading component",
            ));
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_item_keys() {
        for ok in ["ORCH-65", "A-1", "proj_2-123456789012", "9X-7"] {
            assert!(validate_work_item_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-ORCH-1", "ORCH", "ORCH-", "-1", "ORCH-1a", "OR/CH-1", "ORCH-1\n", "../x-1",
            "OR CH-1", "_X-1", "ORCH--1",
        ] {
            assert!(validate_work_item_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repos() {
        let r = validate_repo("acme/app.web").expect("valid");
        assert_eq!((r.owner.as_str(), r.name.as_str()), ("acme", "app.web"));
        assert_eq!(r.to_string(), "acme/app.web");
        for bad in [
            "",
            "acme",
            "acme/",
            "/app",
            "acme/app/x",
            "-acme/app",
            "acme/-app",
            "acme/..",
            "acme/.hidden",
            "acme/a..b",
            "acme/app.git",
            "acme/ap p",
            "acme/app\0",
            "ac:me/app",
        ] {
            assert!(validate_repo(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn branches() {
        for ok in ["main", "orch/ORCH-65", "feature/a.b_c-d", "v1.2"] {
            assert!(validate_branch(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-main", "a..b", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b", "a@{1}", "@",
            "a/", "a.", "a.lock", "a//b", "/a", "a/.b", "a/-b", "a\nb", "a\tb",
        ] {
            assert!(validate_branch(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths() {
        assert!(validate_path("docs/work-items/ORCH-1/review.md").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a/./b",
            "-a",
            "a/-b",
            "a\\b",
            "a\0",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_message_names_the_rule_and_escapes_control_characters() {
        let e = validate_branch("a\nb").unwrap_err();
        assert_eq!(
            e.to_string(),
            "branch 'a\\nb' is not valid: it holds a control character"
        );
    }
}
