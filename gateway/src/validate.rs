//! Checks on values from a webhook that later reach git or a path (repository, branch) or
//! an id column: no option injection, no path traversal, no control characters.

/// A repository `owner/name`: two segments of `[A-Za-z0-9._-]`, neither starting with `-`
/// or `.`, no `..`.
pub fn repo(repo: &str) -> Result<(), &'static str> {
    let Some((owner, name)) = repo.split_once('/') else {
        return Err("expected owner/name");
    };
    for seg in [owner, name] {
        if seg.is_empty() {
            return Err("empty owner or name");
        }
        if seg.len() > 100 {
            return Err("too long");
        }
        if seg.starts_with('-') || seg.starts_with('.') {
            return Err("a segment starts with '-' or '.'");
        }
        if seg.contains("..") {
            return Err("contains '..'");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err("only letters, digits, '.', '_' and '-' are allowed");
        }
    }
    Ok(())
}

/// A branch name as git accepts it (`git check-ref-format --branch`), and never one that
/// reads as an option.
pub fn branch(branch: &str) -> Result<(), &'static str> {
    if branch.is_empty() {
        return Err("empty");
    }
    if branch.len() > 255 {
        return Err("too long");
    }
    if branch.starts_with('-') {
        return Err("starts with '-'");
    }
    if branch.contains("..") || branch.contains("//") || branch.contains("@{") {
        return Err("contains '..', '//' or '@{'");
    }
    if branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with('.')
        || branch.ends_with(".lock")
        || branch == "@"
    {
        return Err("not a valid ref name");
    }
    if branch.split('/').any(|c| c.starts_with('.')) {
        return Err("a component starts with '.'");
    }
    if branch
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
    {
        return Err("contains a space, a control character or one of ~^:?*[\\");
    }
    Ok(())
}

/// An opaque id from outside (a delivery id, a Plane uuid): 1 to 128 printable ASCII
/// characters without spaces.
pub fn opaque_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("empty");
    }
    if id.len() > 128 {
        return Err("longer than 128 characters");
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only printable ASCII without spaces is allowed");
    }
    if id.starts_with('-') {
        return Err("starts with '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repos() {
        for ok in ["acme/app", "a-b/c.d_e", "anbraten/test-repo"] {
            assert_eq!(repo(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "acme", "acme/", "/app", "a/b/c", "-a/b", "a/-b", ".a/b", "a/..", "a/b..c",
            "a b/c", "a/b\n", "a/b;rm",
        ] {
            assert!(repo(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn branches() {
        for ok in ["main", "orch/ORCH-42", "anbraten-patch-1", "feature/a.b"] {
            assert_eq!(branch(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-f",
            "--upload-pack=x",
            "a..b",
            "a//b",
            "/a",
            "a/",
            "a.",
            "a.lock",
            "@",
            "a@{1}",
            "a b",
            "a\tb",
            "a~1",
            "a^",
            "a:b",
            "a?",
            "a*",
            "a[",
            "a\\b",
            "x/.hidden",
        ] {
            assert!(branch(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn opaque_ids() {
        assert_eq!(opaque_id("9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d"), Ok(()));
        for bad in ["", "a b", "-x", "\u{7f}", "é", &"x".repeat(129)] {
            assert!(opaque_id(bad).is_err(), "{bad:?}");
        }
    }
}
