//! What a verified delivery means for the pipeline: one stage-engine call, or nothing
//! (ignored, with the reason recorded). Pure functions over the parsed body, so that they
//! are table-tested and fuzzed without a server.
//!
//! - Plane `issue` created, or updated INTO the trigger (a delivery whose changed field is
//!   the state and whose state is `ORCH_PLANE_TRIGGER_STATE`, or whose changed field is the
//!   labels and whose labels hold `ORCH_PLANE_TRIGGER_LABEL`) -> `CreateWorkItem`. Plane
//!   sends one delivery per changed field, so a PATCH of name and state yields one create,
//!   from the state delivery; `CreateWorkItem` is idempotent on the issue id anyway.
//! - Plane `issue` updated in its description -> `UpdateDescription` (whatever the trigger:
//!   an issue without a work item is ignored at dispatch).
//! - Plane `issue_comment` created, holding `:approved:`, by an account that is not one of
//!   `ORCH_PLANE_BOT_USERS` -> `Approve`; holding `:retry:` (the same rules) -> `Retry`.
//! - Gitea `pull_request` `closed` with `merged: true` (from a branch of the same
//!   repository) -> `OnPrMerged`.
//! - Gitea `pull_request_approved` / `pull_request_rejected` / `pull_request_comment` (a PR
//!   review: `action: reviewed`, from a branch of the same repository) -> `OnPrReview`.
//!   Whether the reviewer is a bot, and whether the PR is the work item's, stage-engine
//!   decides (it holds the bot list and the items).
//! - Gitea `status` (a CI status on a commit) -> `OnCommitStatus`: the repository's items
//!   that wait for CI are checked again.
//! - Gitea `push` of a branch -> `WarmMirror` (the launcher's checkout mirror of the
//!   repository fetches it); a tag, or a branch deleted, is ignored.
//! - Any other known event -> ignored. An unknown event or a body that lacks what its event
//!   needs -> [`BadPayload`] (the sender gets 400).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Triggers;
use crate::validate;

/// The stage-engine call a delivery turns into, stored in the inbox as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rpc")]
pub enum Command {
    /// The repository is chosen at dispatch time from the project (see `RepoMap`), so that
    /// fixing the configuration and re-driving a dead letter works.
    CreateWorkItem {
        tracker_issue_id: String,
        project_id: String,
        /// The issue's number in its project (Plane's `sequence_id`): stage-engine names
        /// the work item `<project identifier>-<sequence_id>`.
        #[serde(default)]
        sequence_id: u64,
        title: String,
        description: String,
    },
    Approve {
        tracker_issue_id: String,
        author: String,
        comment_id: String,
    },
    /// A human's `:retry:` on a blocked work item's issue.
    Retry {
        tracker_issue_id: String,
        author: String,
        comment_id: String,
    },
    OnPrMerged {
        repo: String,
        branch: String,
        pr_number: u64,
        merge_sha: String,
    },
    /// A Gitea PR review; `state` is approved | changes_requested | comment.
    OnPrReview {
        repo: String,
        branch: String,
        pr_number: u64,
        reviewer: String,
        state: String,
        body: String,
    },
    /// A Gitea commit status: the repository's work items waiting for CI are checked again.
    OnCommitStatus {
        repo: String,
        sha: String,
        context: String,
        state: String,
    },
    /// A Plane issue's description changed: its work item's follows (no new item, no stage
    /// change; an issue without a work item is ignored at dispatch).
    UpdateDescription {
        tracker_issue_id: String,
        description: String,
    },
    /// A Gitea push of a branch: the launcher's checkout mirror fetches it (a launcher call,
    /// not stage-engine's).
    WarmMirror { repo: String, branch: String },
}

impl Command {
    /// The RPC's name, as in the proto.
    pub fn rpc(&self) -> &'static str {
        match self {
            Command::CreateWorkItem { .. } => "CreateWorkItem",
            Command::Approve { .. } => "Approve",
            Command::Retry { .. } => "Retry",
            Command::OnPrMerged { .. } => "OnPrMerged",
            Command::OnPrReview { .. } => "OnPrReview",
            Command::OnCommitStatus { .. } => "OnCommitStatus",
            Command::UpdateDescription { .. } => "UpdateDescription",
            Command::WarmMirror { .. } => "WarmMirror",
        }
    }
}

/// The outcome of translating one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Translation {
    /// Apply `command`, after every earlier delivery with the same `ordering_key` (the
    /// work item it concerns).
    Apply {
        command: Command,
        ordering_key: String,
    },
    /// Nothing to do; the reason is recorded.
    Ignore { reason: String },
}

/// The sender's mistake: the short reason of a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadPayload(pub String);

fn ignore(reason: impl Into<String>) -> Result<Translation, BadPayload> {
    Ok(Translation::Ignore {
        reason: reason.into(),
    })
}

fn bad(reason: impl Into<String>) -> BadPayload {
    BadPayload(reason.into())
}

/// Every `X-Plane-Event` the open-source Plane sends (bgtasks/webhook_task.py).
pub const PLANE_EVENTS: &[&str] = &[
    "project",
    "issue",
    "cycle",
    "module",
    "cycle_issue",
    "module_issue",
    "issue_comment",
];

/// The `X-Gitea-Event` values of modules/webhook/type.go, and the newer ones we know of.
pub const GITEA_EVENTS: &[&str] = &[
    "create",
    "delete",
    "fork",
    "push",
    "issues",
    "issue_comment",
    "pull_request",
    "pull_request_approved",
    "pull_request_rejected",
    "pull_request_comment",
    "pull_request_review",
    "pull_request_review_request",
    "pull_request_sync",
    "wiki",
    "repository",
    "release",
    "package",
    "status",
    "schedule",
    "workflow_run",
    "workflow_job",
    "workflow_dispatch",
];

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key)?;
    }
    cur.as_str()
}

fn required_id<'a>(v: &'a Value, path: &[&str]) -> Result<&'a str, BadPayload> {
    let name = path.join(".");
    let id = str_at(v, path).ok_or_else(|| bad(format!("{name} is required")))?;
    validate::opaque_id(id).map_err(|why| bad(format!("{name}: {why}")))?;
    Ok(id)
}

/// Translates a Plane delivery. `body` must already be a parsed JSON object.
pub fn plane(event: &str, body: &Value, triggers: &Triggers) -> Result<Translation, BadPayload> {
    if !PLANE_EVENTS.contains(&event) {
        return Err(bad(format!("unknown X-Plane-Event '{}'", clip(event))));
    }
    if !body.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    let action = str_at(body, &["action"]).ok_or_else(|| bad("action is required"))?;
    match event {
        "issue" => plane_issue(action, body, triggers),
        "issue_comment" => plane_comment(action, body, triggers),
        other => ignore(format!("plane event '{other}' is not used")),
    }
}

fn plane_issue(action: &str, body: &Value, triggers: &Triggers) -> Result<Translation, BadPayload> {
    let created = match action {
        "created" | "create" => true,
        "updated" | "update" => false,
        "deleted" | "delete" => return ignore("plane issue deleted"),
        other => return ignore(format!("plane issue action '{}' is not used", clip(other))),
    };
    let data = body
        .get("data")
        .filter(|d| d.is_object())
        .ok_or_else(|| bad("data is required"))?;
    let issue_id = required_id(body, &["data", "id"])?;
    let project_id = required_id(body, &["data", "project"])?;
    let in_state = triggers
        .state
        .as_deref()
        .is_some_and(|want| state_matches(data.get("state"), want));
    let has_label = triggers
        .label
        .as_deref()
        .is_some_and(|want| labels_match(data.get("labels"), want));

    let triggered = if created {
        in_state || has_label
    } else {
        // One delivery per changed field: only the delivery of the change INTO the trigger.
        match str_at(body, &["activity", "field"]) {
            Some("description" | "description_html") => {
                return Ok(Translation::Apply {
                    ordering_key: format!("plane:{issue_id}"),
                    command: Command::UpdateDescription {
                        tracker_issue_id: issue_id.to_owned(),
                        description: description_of(data).to_owned(),
                    },
                });
            }
            Some("state" | "state_id") => in_state,
            Some("labels" | "label_ids") => has_label,
            Some(other) => {
                return ignore(format!(
                    "plane issue update of '{}' is not a move into the trigger",
                    clip(other)
                ));
            }
            None => return ignore("plane issue update without activity.field"),
        }
    };
    if !triggered {
        return ignore("plane issue is not in the trigger state or label");
    }
    let sequence_id = data
        .get("sequence_id")
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
        .ok_or_else(|| bad("data.sequence_id is required (a positive integer)"))?;
    let title = str_at(data, &["name"]).unwrap_or_default();
    let description = description_of(data);
    Ok(Translation::Apply {
        ordering_key: format!("plane:{issue_id}"),
        command: Command::CreateWorkItem {
            tracker_issue_id: issue_id.to_owned(),
            project_id: project_id.to_owned(),
            sequence_id,
            title: title.to_owned(),
            description: description.to_owned(),
        },
    })
}

/// The issue's description: the HTML, which stage-engine converts for the agent's task,
/// keeping the lists, code and links that `description_stripped` flattens.
fn description_of(data: &Value) -> &str {
    str_at(data, &["description_html"])
        .or_else(|| str_at(data, &["description_stripped"]))
        .unwrap_or_default()
}

/// `data.state` is a StateLite object in webhooks (`{id, name, ...}`), a bare id elsewhere.
fn state_matches(state: Option<&Value>, want: &str) -> bool {
    match state {
        Some(Value::String(id)) => id == want,
        Some(obj @ Value::Object(_)) => {
            str_at(obj, &["id"]) == Some(want)
                || str_at(obj, &["name"]).is_some_and(|n| n.eq_ignore_ascii_case(want))
        }
        _ => false,
    }
}

/// `data.labels` holds `{id, name, color}` objects in webhooks, bare ids elsewhere.
fn labels_match(labels: Option<&Value>, want: &str) -> bool {
    let Some(Value::Array(labels)) = labels else {
        return false;
    };
    labels.iter().any(|l| match l {
        Value::String(id) => id == want,
        obj @ Value::Object(_) => {
            str_at(obj, &["id"]) == Some(want)
                || str_at(obj, &["name"]).is_some_and(|n| n.eq_ignore_ascii_case(want))
        }
        _ => false,
    })
}

/// The marker a human writes to pass the gate after analysis.
pub const APPROVAL_MARKER: &str = ":approved:";

/// The marker a human writes to retry a blocked work item (as `orchestrator item retry`).
pub const RETRY_MARKER: &str = ":retry:";

fn plane_comment(
    action: &str,
    body: &Value,
    triggers: &Triggers,
) -> Result<Translation, BadPayload> {
    if !matches!(action, "created" | "create") {
        return ignore(format!(
            "plane comment action '{}' is not used",
            clip(action)
        ));
    }
    if !body.get("data").is_some_and(Value::is_object) {
        return Err(bad("data is required"));
    }
    let comment_id = required_id(body, &["data", "id"])?;
    let issue_id = required_id(body, &["data", "issue"])?;
    let html = str_at(body, &["data", "comment_html"]).unwrap_or_default();
    // `:retry:` first: on a blocked item it is the explicit ask (`:approved:` there resumes too).
    let (marker, verb) = if html.contains(RETRY_MARKER) {
        (RETRY_MARKER, "retries")
    } else if html.contains(APPROVAL_MARKER) {
        (APPROVAL_MARKER, "approves")
    } else {
        return ignore("plane comment without :approved: or :retry:");
    };
    // Our own posts ask a human for `:approved:` or `:retry:` and so hold them: whoever the
    // bot account is, and whether or not it is listed in ORCH_PLANE_BOT_USERS, they never
    // approve or retry.
    if str_at(body, &["data", "external_source"]) == Some(orchestrator_kit::COMMENT_EXTERNAL_SOURCE)
    {
        return ignore(format!(
            "plane {marker} in a comment the orchestrator posted never {verb}"
        ));
    }
    // Who wrote it: the activity's actor (UserLite), else the comment's own columns.
    let actor = body.get("activity").and_then(|a| a.get("actor"));
    let names: Vec<&str> = [
        actor.and_then(|a| str_at(a, &["id"])),
        actor.and_then(|a| str_at(a, &["email"])),
        actor.and_then(|a| str_at(a, &["display_name"])),
        str_at(body, &["data", "actor"]),
        str_at(body, &["data", "created_by"]),
    ]
    .into_iter()
    .flatten()
    .filter(|n| !n.is_empty())
    .collect();
    let Some(author) = [
        actor.and_then(|a| str_at(a, &["display_name"])),
        actor.and_then(|a| str_at(a, &["email"])),
        actor.and_then(|a| str_at(a, &["id"])),
        str_at(body, &["data", "actor"]),
        str_at(body, &["data", "created_by"]),
    ]
    .into_iter()
    .flatten()
    .find(|n| !n.is_empty()) else {
        return ignore(format!("plane {marker} comment without an author"));
    };
    if let Some(bot) = names
        .iter()
        .find(|n| triggers.bot_users.iter().any(|b| b.eq_ignore_ascii_case(n)))
    {
        return ignore(format!(
            "plane {marker} by a bot account ({}) never {verb}",
            clip(bot)
        ));
    }
    let (tracker_issue_id, author, comment_id) = (
        issue_id.to_owned(),
        clip(author).to_owned(),
        comment_id.to_owned(),
    );
    Ok(Translation::Apply {
        ordering_key: format!("plane:{issue_id}"),
        command: if marker == RETRY_MARKER {
            Command::Retry {
                tracker_issue_id,
                author,
                comment_id,
            }
        } else {
            Command::Approve {
                tracker_issue_id,
                author,
                comment_id,
            }
        },
    })
}

/// Translates a Gitea delivery. `body` must already be a parsed JSON object.
pub fn gitea(event: &str, body: &Value) -> Result<Translation, BadPayload> {
    if !GITEA_EVENTS.contains(&event) {
        return Err(bad(format!("unknown X-Gitea-Event '{}'", clip(event))));
    }
    if !body.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    if let Some(state) = review_state(event) {
        return gitea_review(event, state, body);
    }
    if event == "status" {
        return gitea_status(body);
    }
    if event == "push" {
        return gitea_push(body);
    }
    if event != "pull_request" {
        return ignore(format!("gitea event '{event}' is not used"));
    }
    let action = str_at(body, &["action"]).ok_or_else(|| bad("action is required"))?;
    if action != "closed" {
        return ignore(format!(
            "gitea pull_request action '{}' is not used",
            clip(action)
        ));
    }
    let pr = body
        .get("pull_request")
        .filter(|p| p.is_object())
        .ok_or_else(|| bad("pull_request is required"))?;
    let merged = pr
        .get("merged")
        .and_then(Value::as_bool)
        .ok_or_else(|| bad("pull_request.merged is required"))?;
    if !merged {
        return ignore("gitea pull request closed without a merge");
    }
    let repo = str_at(body, &["repository", "full_name"])
        .ok_or_else(|| bad("repository.full_name is required"))?;
    orchestrator_git::validate_repo(repo)
        .map_err(|why| bad(format!("repository.full_name: {why}")))?;
    let branch =
        str_at(pr, &["head", "ref"]).ok_or_else(|| bad("pull_request.head.ref is required"))?;
    orchestrator_git::validate_branch(branch)
        .map_err(|why| bad(format!("pull_request.head.ref: {why}")))?;
    if let Some(head_repo) = str_at(pr, &["head", "repo", "full_name"])
        && head_repo != repo
    {
        return ignore("gitea pull request from another repository (a fork)");
    }
    let pr_number = body
        .get("number")
        .and_then(Value::as_u64)
        .or_else(|| pr.get("number").and_then(Value::as_u64))
        .ok_or_else(|| bad("number is required"))?;
    let merge_sha = str_at(pr, &["merge_commit_sha"]).unwrap_or_default();
    if !merge_sha.is_empty() && !merge_sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("pull_request.merge_commit_sha: expected hex"));
    }
    Ok(Translation::Apply {
        ordering_key: format!("gitea:{repo}:{branch}"),
        command: Command::OnPrMerged {
            repo: repo.to_owned(),
            branch: branch.to_owned(),
            pr_number,
            merge_sha: clip(merge_sha).to_owned(),
        },
    })
}

/// The review state a Gitea review event stands for (modules/webhook/type.go: the event
/// types `pull_request_review_{approved,rejected,comment}` are sent as these events).
fn review_state(event: &str) -> Option<&'static str> {
    match event {
        "pull_request_approved" => Some("approved"),
        "pull_request_rejected" => Some("changes_requested"),
        "pull_request_comment" => Some("comment"),
        _ => None,
    }
}

/// A `CommitStatusPayload` (modules/structs/hook.go): which repository, which commit.
fn gitea_status(body: &Value) -> Result<Translation, BadPayload> {
    let repo = str_at(body, &["repository", "full_name"])
        .ok_or_else(|| bad("repository.full_name is required"))?;
    orchestrator_git::validate_repo(repo)
        .map_err(|why| bad(format!("repository.full_name: {why}")))?;
    let sha = str_at(body, &["sha"]).ok_or_else(|| bad("sha is required"))?;
    if sha.is_empty() || sha.len() > 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("sha: expected a commit id (hex)"));
    }
    let state = str_at(body, &["state"]).unwrap_or_default();
    Ok(Translation::Apply {
        ordering_key: format!("gitea:{repo}:ci"),
        command: Command::OnCommitStatus {
            repo: repo.to_owned(),
            sha: sha.to_owned(),
            context: clip(str_at(body, &["context"]).unwrap_or_default()).to_owned(),
            state: clip(state).to_owned(),
        },
    })
}

/// A `PushPayload` (modules/structs/hook.go): `ref` is `refs/heads/<branch>` for a branch,
/// `after` the new head (all zeros when the branch was deleted).
fn gitea_push(body: &Value) -> Result<Translation, BadPayload> {
    let git_ref = str_at(body, &["ref"]).ok_or_else(|| bad("ref is required"))?;
    let Some(branch) = git_ref.strip_prefix("refs/heads/") else {
        return ignore(format!("gitea push of '{}', not a branch", clip(git_ref)));
    };
    orchestrator_git::validate_branch(branch).map_err(|why| bad(format!("ref: {why}")))?;
    let repo = str_at(body, &["repository", "full_name"])
        .ok_or_else(|| bad("repository.full_name is required"))?;
    orchestrator_git::validate_repo(repo)
        .map_err(|why| bad(format!("repository.full_name: {why}")))?;
    let after = str_at(body, &["after"]).unwrap_or_default();
    if !after.is_empty() && after.bytes().all(|b| b == b'0') {
        return ignore(format!("gitea push deleted branch '{branch}'"));
    }
    Ok(Translation::Apply {
        ordering_key: format!("gitea:{repo}:push"),
        command: Command::WarmMirror {
            repo: repo.to_owned(),
            branch: branch.to_owned(),
        },
    })
}

/// The longest review text passed on: the forge's own copy is read back anyway.
const REVIEW_BODY_MAX_BYTES: usize = 16 * 1024;

/// A `PullRequestPayload` with `action: reviewed` (services/webhook/notifier.go
/// `PullRequestReview`): the reviewer is the sender, the text is `review.content`.
fn gitea_review(event: &str, state: &str, body: &Value) -> Result<Translation, BadPayload> {
    let action = str_at(body, &["action"]).ok_or_else(|| bad("action is required"))?;
    if action != "reviewed" {
        return ignore(format!(
            "gitea {event} action '{}' is not used",
            clip(action)
        ));
    }
    let pr = body
        .get("pull_request")
        .filter(|p| p.is_object())
        .ok_or_else(|| bad("pull_request is required"))?;
    let repo = str_at(body, &["repository", "full_name"])
        .ok_or_else(|| bad("repository.full_name is required"))?;
    orchestrator_git::validate_repo(repo)
        .map_err(|why| bad(format!("repository.full_name: {why}")))?;
    let branch =
        str_at(pr, &["head", "ref"]).ok_or_else(|| bad("pull_request.head.ref is required"))?;
    orchestrator_git::validate_branch(branch)
        .map_err(|why| bad(format!("pull_request.head.ref: {why}")))?;
    if let Some(head_repo) = str_at(pr, &["head", "repo", "full_name"])
        && head_repo != repo
    {
        return ignore("gitea review of a pull request from another repository (a fork)");
    }
    let pr_number = body
        .get("number")
        .and_then(Value::as_u64)
        .or_else(|| pr.get("number").and_then(Value::as_u64))
        .ok_or_else(|| bad("number is required"))?;
    let reviewer = str_at(body, &["sender", "login"])
        .or_else(|| str_at(body, &["requested_reviewer", "login"]))
        .filter(|l| !l.is_empty())
        .ok_or_else(|| bad("sender.login is required"))?;
    let text = str_at(body, &["review", "content"]).unwrap_or_default();
    let mut cut = text.len().min(REVIEW_BODY_MAX_BYTES);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    Ok(Translation::Apply {
        ordering_key: format!("gitea:{repo}:{branch}"),
        command: Command::OnPrReview {
            repo: repo.to_owned(),
            branch: branch.to_owned(),
            pr_number,
            reviewer: clip(reviewer).to_owned(),
            state: state.to_owned(),
            body: text[..cut].to_owned(),
        },
    })
}

/// At most 80 characters of something from outside, for a reason or a log line.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::sample;
    use serde_json::json;

    fn triggers() -> Triggers {
        Triggers {
            state: Some("Todo".into()),
            label: Some("orchestrator".into()),
            bot_users: vec!["stream-bot".into(), "b0t-1d".into()],
        }
    }

    fn parse(name: &str) -> Value {
        serde_json::from_slice(&sample(name)).expect("sample parses")
    }

    #[test]
    fn a_review_becomes_on_pr_review_with_the_reviewer_and_the_text() {
        let got = gitea(
            "pull_request_rejected",
            &parse("gitea-webhook-pull_request_review-rejected.json"),
        );
        assert_eq!(
            got,
            Ok(Translation::Apply {
                ordering_key: "gitea:anbraten/test-repo:anbraten-patch-1".into(),
                command: Command::OnPrReview {
                    repo: "anbraten/test-repo".into(),
                    branch: "anbraten-patch-1".into(),
                    pr_number: 1,
                    reviewer: "ada".into(),
                    state: "changes_requested".into(),
                    body: "Please handle the empty name: `greet(\"\")` prints \"Hello, !\".".into(),
                },
            })
        );
        let approved = parse("gitea-webhook-pull_request_review-approved.json");
        let Ok(Translation::Apply {
            command: Command::OnPrReview { state, .. },
            ..
        }) = gitea("pull_request_approved", &approved)
        else {
            panic!("an approval is a review");
        };
        assert_eq!(state, "approved");
        // A review request is not a review; a fork's PR is not ours; a bad branch is 400.
        let mut other = approved.clone();
        other["action"] = json!("review_requested");
        assert!(rpc_or_reason(gitea("pull_request_approved", &other)).starts_with("ignore:"));
        let mut fork = approved.clone();
        fork["pull_request"]["head"]["repo"]["full_name"] = json!("mallory/test-repo");
        assert!(
            rpc_or_reason(gitea("pull_request_approved", &fork))
                .starts_with("ignore: gitea review")
        );
        let mut evil = approved.clone();
        evil["pull_request"]["head"]["ref"] = json!("--upload-pack=x");
        assert!(gitea("pull_request_approved", &evil).is_err());
        let mut anonymous = approved;
        anonymous["sender"] = Value::Null;
        anonymous["requested_reviewer"] = Value::Null;
        assert_eq!(
            gitea("pull_request_approved", &anonymous),
            Err(BadPayload("sender.login is required".into()))
        );
    }

    #[test]
    fn a_branch_push_warms_the_mirror_and_a_tag_or_a_deletion_is_ignored() {
        let push = parse("gitea-webhook-push.json");
        assert_eq!(
            gitea("push", &push),
            Ok(Translation::Apply {
                ordering_key: "gitea:Test-CI/multi-line-secrets:push".into(),
                command: Command::WarmMirror {
                    repo: "Test-CI/multi-line-secrets".into(),
                    branch: "main".into(),
                },
            })
        );
        let mut tag = push.clone();
        tag["ref"] = json!("refs/tags/v1");
        assert!(rpc_or_reason(gitea("push", &tag)).starts_with("ignore: gitea push of"));
        let mut deleted = push.clone();
        deleted["after"] = json!("0000000000000000000000000000000000000000");
        assert!(rpc_or_reason(gitea("push", &deleted)).starts_with("ignore: gitea push deleted"));
        let mut evil = push.clone();
        evil["ref"] = json!("refs/heads/--upload-pack=x");
        assert!(gitea("push", &evil).is_err());
        let mut no_repo = push;
        no_repo["repository"] = Value::Null;
        assert_eq!(
            gitea("push", &no_repo),
            Err(BadPayload("repository.full_name is required".into()))
        );
    }

    #[test]
    fn a_commit_status_becomes_on_commit_status_and_a_bad_sha_is_refused() {
        let body = parse("gitea-webhook-status.json");
        let Ok(Translation::Apply {
            command:
                Command::OnCommitStatus {
                    repo,
                    sha,
                    context,
                    state,
                },
            ..
        }) = gitea("status", &body)
        else {
            panic!("a status is OnCommitStatus");
        };
        assert_eq!(
            (repo.as_str(), context.as_str(), state.as_str()),
            ("anbraten/test-repo", "ci/build", "failure")
        );
        assert_eq!(sha.len(), 40);
        let mut evil = body;
        evil["sha"] = json!("--output=/etc/passwd");
        assert!(gitea("status", &evil).is_err());
    }

    #[test]
    fn every_sample_translates_as_expected() {
        let t = triggers();
        // (sample, expected rpc or the start of the ignore reason)
        let cases = [
            ("plane-webhook-issue-created.json", "CreateWorkItem"),
            // The sample moves to Done, which is not the trigger state.
            (
                "plane-webhook-issue-updated-state.json",
                "ignore: plane issue is not in the trigger",
            ),
            // The sample's comment has no :approved:.
            (
                "plane-webhook-issue_comment-created.json",
                "ignore: plane comment without",
            ),
            (
                "plane-webhook-deleted-shape.json",
                "ignore: plane issue deleted",
            ),
            (
                "gitea-webhook-pull_request-closed-merged.json",
                "OnPrMerged",
            ),
            (
                "gitea-webhook-pull_request-closed-unmerged.json",
                "ignore: gitea pull request closed without",
            ),
            (
                "gitea-webhook-pull_request-opened.json",
                "ignore: gitea pull_request action 'opened'",
            ),
            ("gitea-webhook-push.json", "WarmMirror"),
            (
                "gitea-webhook-issue_comment-on-pull.json",
                "ignore: gitea event 'issue_comment'",
            ),
            (
                "gitea-webhook-issue_comment-on-issue.json",
                "ignore: gitea event 'issue_comment'",
            ),
            (
                "gitea-webhook-pull_request_review-rejected.json",
                "OnPrReview",
            ),
            (
                "gitea-webhook-pull_request_review-approved.json",
                "OnPrReview",
            ),
            ("gitea-webhook-status.json", "OnCommitStatus"),
        ];
        for (name, source, event, _) in crate::testdata::webhook_samples() {
            let want = cases.iter().find(|(n, _)| *n == name).expect("case").1;
            let body = parse(name);
            let got = match source {
                "plane" => plane(event, &body, &t),
                _ => gitea(event, &body),
            }
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let got = match got {
                Translation::Apply { command, .. } => command.rpc().to_owned(),
                Translation::Ignore { reason } => format!("ignore: {reason}"),
            };
            assert!(got.starts_with(want), "{name}: {got}");
        }
    }

    #[test]
    fn the_created_sample_becomes_create_work_item() {
        let got = plane(
            "issue",
            &parse("plane-webhook-issue-created.json"),
            &triggers(),
        )
        .expect("translates");
        assert_eq!(
            got,
            Translation::Apply {
                ordering_key: "plane:9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d".into(),
                command: Command::CreateWorkItem {
                    tracker_issue_id: "9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d".into(),
                    project_id: "7c9e6679-7425-40de-944b-e07fc1f90ae7".into(),
                    sequence_id: 42,
                    title: "Wire up Gitea merge webhook".into(),
                    description: "<p>Orchestrator should react to merged PRs.</p>".into(),
                }
            }
        );
    }

    #[test]
    fn the_merged_sample_becomes_on_pr_merged() {
        let got = gitea(
            "pull_request",
            &parse("gitea-webhook-pull_request-closed-merged.json"),
        )
        .expect("translates");
        assert_eq!(
            got,
            Translation::Apply {
                ordering_key: "gitea:anbraten/test-repo:anbraten-patch-1".into(),
                command: Command::OnPrMerged {
                    repo: "anbraten/test-repo".into(),
                    branch: "anbraten-patch-1".into(),
                    pr_number: 1,
                    merge_sha: "f2440f050054df0f8ecabcace648f1683509064c".into(),
                }
            }
        );
    }

    #[test]
    fn a_description_update_keeps_the_work_items_description_current() {
        let mut body = parse("plane-webhook-issue-updated-state.json");
        body["activity"]["field"] = json!("description");
        body["data"]["description_html"] = json!("<p>Now with <code>HEAD</code>.</p>");
        body["data"]["description_stripped"] = json!("Now with HEAD.");
        let issue = body["data"]["id"].as_str().expect("id").to_owned();
        // Whatever the trigger: an issue without a work item is ignored at dispatch.
        let none = Triggers {
            state: None,
            label: None,
            ..triggers()
        };
        for field in ["description", "description_html"] {
            body["activity"]["field"] = json!(field);
            assert_eq!(
                plane("issue", &body, &none).expect("translates"),
                Translation::Apply {
                    ordering_key: format!("plane:{issue}"),
                    command: Command::UpdateDescription {
                        tracker_issue_id: issue.clone(),
                        description: "<p>Now with <code>HEAD</code>.</p>".into(),
                    },
                }
            );
        }
    }

    fn rpc_or_reason(r: Result<Translation, BadPayload>) -> String {
        match r {
            Ok(Translation::Apply { command, .. }) => command.rpc().to_owned(),
            Ok(Translation::Ignore { reason }) => format!("ignore: {reason}"),
            Err(e) => format!("400: {e}"),
        }
    }

    #[test]
    fn plane_issue_updates_trigger_only_on_the_field_that_moved_into_the_trigger() {
        let mut body = parse("plane-webhook-issue-updated-state.json");
        let by_name = Triggers {
            state: Some("done".into()),
            ..triggers()
        };
        let by_id = Triggers {
            state: Some("3a8f5dbf-9e4c-4f6a-8b5d-4e7f8091a2b3".into()),
            label: None,
            ..triggers()
        };
        let no_state = Triggers {
            state: None,
            ..triggers()
        };
        assert_eq!(
            rpc_or_reason(plane("issue", &body, &by_name)),
            "CreateWorkItem"
        );
        assert_eq!(
            rpc_or_reason(plane("issue", &body, &by_id)),
            "CreateWorkItem"
        );
        assert!(rpc_or_reason(plane("issue", &body, &no_state)).starts_with("ignore"));
        // The web app names the field state_id.
        body["activity"]["field"] = json!("state_id");
        assert_eq!(
            rpc_or_reason(plane("issue", &body, &by_name)),
            "CreateWorkItem"
        );
        // The same PATCH's delivery for another field does not create a second time.
        body["activity"]["field"] = json!("name");
        assert!(
            rpc_or_reason(plane("issue", &body, &by_name))
                .starts_with("ignore: plane issue update of 'name'")
        );
        // A labels delivery, with the trigger label present.
        body["activity"]["field"] = json!("labels");
        assert_eq!(
            rpc_or_reason(plane("issue", &body, &triggers())),
            "CreateWorkItem"
        );
        body["data"]["labels"] = json!([]);
        assert!(rpc_or_reason(plane("issue", &body, &triggers())).starts_with("ignore"));
        // Labels as bare ids.
        body["data"]["labels"] = json!(["6d1c8ae2-c17f-4c9d-8e80-718293a4b5c6"]);
        let label_id = Triggers {
            label: Some("6d1c8ae2-c17f-4c9d-8e80-718293a4b5c6".into()),
            ..triggers()
        };
        assert_eq!(
            rpc_or_reason(plane("issue", &body, &label_id)),
            "CreateWorkItem"
        );
        // The older docs' verb.
        body["action"] = json!("update");
        assert_eq!(
            rpc_or_reason(plane("issue", &body, &label_id)),
            "CreateWorkItem"
        );
    }

    #[test]
    fn approvals_come_from_humans_only() {
        let mut body = parse("plane-webhook-issue_comment-created.json");
        body["data"]["comment_html"] = json!("<p>looks good :approved:</p>");
        let got = plane("issue_comment", &body, &triggers()).expect("translates");
        assert_eq!(
            got,
            Translation::Apply {
                ordering_key: "plane:9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d".into(),
                command: Command::Approve {
                    tracker_issue_id: "9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d".into(),
                    author: "ada".into(),
                    comment_id: "8f3eac04-e391-4eaf-80a2-93a4b5c6d7e8".into(),
                }
            }
        );
        // The same comment by a bot: by display name, by email, by id.
        for (field, value) in [
            ("display_name", "stream-bot"),
            ("email", "STREAM-BOT"),
            ("id", "b0t-1d"),
        ] {
            let mut b = body.clone();
            b["activity"]["actor"][field] = json!(value);
            assert!(
                rpc_or_reason(plane("issue_comment", &b, &triggers()))
                    .starts_with("ignore: plane :approved: by a bot"),
                "{field}"
            );
        }
        // A comment the orchestrator posted itself (its :approved: prompt), by an account
        // nobody listed as a bot: never an approval.
        let mut b = body.clone();
        b["data"]["external_source"] = json!("orchestrator");
        assert!(
            rpc_or_reason(plane("issue_comment", &b, &triggers()))
                .starts_with("ignore: plane :approved: in a comment the orchestrator posted"),
        );
        // Without an activity, the comment's own actor column is the author.
        let mut b = body.clone();
        b["activity"] = Value::Null;
        b["data"]["actor"] = json!("b0t-1d");
        b["data"]["created_by"] = json!("b0t-1d");
        assert!(
            rpc_or_reason(plane("issue_comment", &b, &triggers()))
                .starts_with("ignore: plane :approved: by a bot")
        );
        // An edit is not an approval.
        let mut b = body.clone();
        b["action"] = json!("updated");
        assert!(rpc_or_reason(plane("issue_comment", &b, &triggers())).starts_with("ignore"));
    }

    #[test]
    fn retries_come_from_humans_only() {
        let mut body = parse("plane-webhook-issue_comment-created.json");
        body["data"]["comment_html"] = json!("<p>fixed the PATH :retry:</p>");
        let got = plane("issue_comment", &body, &triggers()).expect("translates");
        assert_eq!(
            got,
            Translation::Apply {
                ordering_key: "plane:9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d".into(),
                command: Command::Retry {
                    tracker_issue_id: "9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d".into(),
                    author: "ada".into(),
                    comment_id: "8f3eac04-e391-4eaf-80a2-93a4b5c6d7e8".into(),
                }
            }
        );
        // Both markers: the retry is the explicit ask.
        let mut b = body.clone();
        b["data"]["comment_html"] = json!("<p>:approved: :retry:</p>");
        assert_eq!(
            rpc_or_reason(plane("issue_comment", &b, &triggers())),
            "Retry"
        );
        // A bot, by any of its names; our own post (which names `:retry:` to a human).
        for (field, value) in [
            ("display_name", "stream-bot"),
            ("email", "STREAM-BOT"),
            ("id", "b0t-1d"),
        ] {
            let mut b = body.clone();
            b["activity"]["actor"][field] = json!(value);
            assert!(
                rpc_or_reason(plane("issue_comment", &b, &triggers()))
                    .starts_with("ignore: plane :retry: by a bot account"),
                "{field}"
            );
        }
        let mut b = body.clone();
        b["data"]["external_source"] = json!("orchestrator");
        assert!(
            rpc_or_reason(plane("issue_comment", &b, &triggers())).starts_with(
                "ignore: plane :retry: in a comment the orchestrator posted never retries"
            ),
        );
        let c = Command::Retry {
            tracker_issue_id: "i".into(),
            author: "ada".into(),
            comment_id: "c".into(),
        };
        let s = serde_json::to_string(&c).expect("json");
        assert!(s.starts_with(r#"{"rpc":"Retry""#), "{s}");
        assert_eq!(serde_json::from_str::<Command>(&s).expect("parse"), c);
    }

    #[test]
    fn bad_payloads_are_the_senders_mistake() {
        let t = triggers();
        let cases: Vec<(&str, &str, Value, &str)> = vec![
            ("plane", "nope", json!({}), "unknown X-Plane-Event"),
            (
                "plane",
                "issue",
                json!([]),
                "the body must be a JSON object",
            ),
            ("plane", "issue", json!({}), "action is required"),
            (
                "plane",
                "issue",
                json!({"action": "created"}),
                "data is required",
            ),
            (
                "plane",
                "issue",
                json!({"action": "created", "data": {}}),
                "data.id is required",
            ),
            (
                "plane",
                "issue",
                json!({"action": "created", "data": {"id": "x"}}),
                "data.project is required",
            ),
            (
                "plane",
                "issue",
                json!({"action": "created", "data": {"id": "-rf", "project": "p"}}),
                "data.id: starts with '-'",
            ),
            (
                "plane",
                "issue",
                json!({"action": "created", "data": {"id": "x", "project": "p", "labels": [{"name": "orchestrator"}]}}),
                "data.sequence_id is required",
            ),
            (
                "plane",
                "issue",
                json!({"action": "created", "data": {"id": "x", "project": "p", "sequence_id": 0, "labels": ["orchestrator"]}}),
                "data.sequence_id is required",
            ),
            (
                "plane",
                "issue",
                json!({"action": "created", "data": {"id": "x", "project": "p", "sequence_id": "42", "labels": ["orchestrator"]}}),
                "data.sequence_id is required",
            ),
            (
                "plane",
                "issue_comment",
                json!({"action": "created", "data": {"id": "c"}}),
                "data.issue is required",
            ),
            ("gitea", "nope", json!({}), "unknown X-Gitea-Event"),
            ("gitea", "pull_request", json!({}), "action is required"),
            (
                "gitea",
                "pull_request",
                json!({"action": "closed"}),
                "pull_request is required",
            ),
            (
                "gitea",
                "pull_request",
                json!({"action": "closed", "pull_request": {}}),
                "pull_request.merged is required",
            ),
            (
                "gitea",
                "pull_request",
                json!({"action": "closed", "pull_request": {"merged": true}}),
                "repository.full_name is required",
            ),
            (
                "gitea",
                "pull_request",
                json!({"action": "closed", "pull_request": {"merged": true, "head": {"ref": "--upload-pack=x"}}, "repository": {"full_name": "a/b"}}),
                "pull_request.head.ref: branch '--upload-pack=x' is not valid: it starts with '-'",
            ),
            (
                "gitea",
                "pull_request",
                json!({"action": "closed", "pull_request": {"merged": true, "head": {"ref": "x"}}, "repository": {"full_name": "../b"}}),
                "repository.full_name",
            ),
            (
                "gitea",
                "pull_request",
                json!({"action": "closed", "pull_request": {"merged": true, "head": {"ref": "x"}}, "repository": {"full_name": "a/b"}}),
                "number is required",
            ),
        ];
        for (source, event, body, want) in cases {
            let got = match source {
                "plane" => plane(event, &body, &t),
                _ => gitea(event, &body),
            };
            let err = got.expect_err(&format!("{source} {event} {body}"));
            assert!(err.0.starts_with(want), "{body}: {err}");
        }
    }

    #[test]
    fn pull_requests_from_forks_are_ignored() {
        let mut body = parse("gitea-webhook-pull_request-closed-merged.json");
        body["pull_request"]["head"]["repo"]["full_name"] = json!("mallory/test-repo");
        assert!(
            rpc_or_reason(gitea("pull_request", &body))
                .starts_with("ignore: gitea pull request from another")
        );
    }

    #[test]
    fn the_gateway_refuses_exactly_what_the_git_layer_refuses() {
        // A delivery accepted here and refused by git ends as a dead letter (the gateway
        // once took branches up to 255 characters, git up to 200).
        let long = |n: usize| "b".repeat(n);
        let branches = [
            "main".to_owned(),
            "orch/ORCH-1".to_owned(),
            long(200),
            long(201),
            long(255),
            "a/-b".to_owned(),
            "a..b".to_owned(),
            "a.lock".to_owned(),
            "x/.hidden".to_owned(),
            "-f".to_owned(),
        ];
        let repos = [
            "acme/app",
            "acme/app.git",
            "acme/a..b",
            "-a/b",
            "a/b/c",
            "ac:me/app",
        ];
        let base = parse("gitea-webhook-pull_request-closed-merged.json");
        for branch in &branches {
            let mut body = base.clone();
            body["pull_request"]["head"]["ref"] = json!(branch);
            let git = orchestrator_git::validate_branch(branch).is_ok();
            let gateway = gitea("pull_request", &body).is_ok();
            assert_eq!(
                gateway,
                git,
                "branch of {} chars: {branch:.20}",
                branch.len()
            );
        }
        for repo in repos {
            let mut body = base.clone();
            body["repository"]["full_name"] = json!(repo);
            body["pull_request"]["head"]["repo"]["full_name"] = json!(repo);
            let git = orchestrator_git::validate_repo(repo).is_ok();
            let gateway = gitea("pull_request", &body).is_ok();
            assert_eq!(gateway, git, "repo {repo}");
        }
        let e = {
            let mut body = base.clone();
            body["pull_request"]["head"]["ref"] = json!(long(201));
            gitea("pull_request", &body).expect_err("too long")
        };
        assert!(e.0.contains("pull_request.head.ref"), "{e}");
    }

    #[test]
    fn commands_round_trip_as_json() {
        let c = Command::OnPrMerged {
            repo: "a/b".into(),
            branch: "x".into(),
            pr_number: 7,
            merge_sha: "abc".into(),
        };
        let s = serde_json::to_string(&c).expect("json");
        assert!(s.starts_with(r#"{"rpc":"OnPrMerged""#), "{s}");
        assert_eq!(serde_json::from_str::<Command>(&s).expect("parse"), c);
    }
}
