//! The contract samples (`shared/contracts`), and the bytes a real sender puts on the wire.

use std::path::PathBuf;

/// `shared/contracts`, beside the repository (or `ORCH_CONTRACTS_DIR`).
pub fn contracts_dir() -> PathBuf {
    orchestrator_testkit::contracts_dir()
}

/// The bytes of one sample file.
pub fn sample(name: &str) -> Vec<u8> {
    let path = contracts_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every webhook sample: (file name, source, event header, event-type header).
pub fn webhook_samples() -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    vec![
        ("plane-webhook-issue-created.json", "plane", "issue", ""),
        (
            "plane-webhook-issue-updated-state.json",
            "plane",
            "issue",
            "",
        ),
        (
            "plane-webhook-issue_comment-created.json",
            "plane",
            "issue_comment",
            "",
        ),
        ("plane-webhook-deleted-shape.json", "plane", "issue", ""),
        (
            "gitea-webhook-pull_request-closed-merged.json",
            "gitea",
            "pull_request",
            "pull_request",
        ),
        (
            "gitea-webhook-pull_request-closed-unmerged.json",
            "gitea",
            "pull_request",
            "pull_request",
        ),
        (
            "gitea-webhook-pull_request-opened.json",
            "gitea",
            "pull_request",
            "pull_request",
        ),
        ("gitea-webhook-push.json", "gitea", "push", "push"),
        (
            "gitea-webhook-issue_comment-on-pull.json",
            "gitea",
            "issue_comment",
            "pull_request_comment",
        ),
        (
            "gitea-webhook-issue_comment-on-issue.json",
            "gitea",
            "issue_comment",
            "issue_comment",
        ),
        (
            "gitea-webhook-pull_request_review-rejected.json",
            "gitea",
            "pull_request_rejected",
            "pull_request_review_rejected",
        ),
        (
            "gitea-webhook-pull_request_review-approved.json",
            "gitea",
            "pull_request_approved",
            "pull_request_review_approved",
        ),
        ("gitea-webhook-status.json", "gitea", "status", "status"),
    ]
}

/// The body as it travels: Plane sends Python's `json.dumps(payload)` (one line, `", "` and
/// `": "` separators, non-ASCII escaped); Gitea sends the sample's bytes as they are.
pub fn wire_body(name: &str) -> Vec<u8> {
    let raw = sample(name);
    if name.starts_with("plane-") {
        python_json_dumps(&raw)
    } else {
        raw
    }
}

/// Re-serialises JSON text the way Python's `json.dumps` does by default, keeping key order
/// and number spelling: whitespace outside strings is dropped, `,` and `:` get one space.
pub fn python_json_dumps(text: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(text).expect("utf-8 sample");
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            ',' => out.push_str(", "),
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out.into_bytes()
}
