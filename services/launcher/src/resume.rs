//! A retry that resumes instead of starting cold (#15): when stage-engine sends the agent
//! that just failed its stage's gate back to the same stage, the job's payload carries
//! `resume` (the run to resume, the head it delivered, what the gate lacks). The launcher
//! then resumes that run's CLI session (`--resume <session_id>`, the id usage-ledger
//! recorded from the run's result) with a short "the gate still lacks" prompt — unless
//! resuming is off, the session is unknown or older than `ORCH_RESUME_MAX_AGE_S`, the
//! checkout is not what that run left (the branch moved, or there is no checkout), or its
//! transcript is not on this machine. Then it starts cold with the whole task, and says why
//! in the run's log. Which agent or stage it is, the launcher does not know.
//!
//! The CLI keeps a session as `<config dir>/projects/<cwd slug>/<session>.jsonl` and finds
//! it only under the slug of the directory it runs in, and the conversation names that
//! directory's files: so a run that may resume is checked out where the run it resumes
//! worked (that job's `checkout`, made again from the branch), and the transcript is
//! carried to the new run's config dir under that directory's slug.

use std::path::{Path, PathBuf};
use std::time::Duration;

use orchestrator_agent_output::is_session_id;
use serde_json::Value;

/// What stage-engine asks to resume (the payload's `resume`), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResumeAsk {
    /// The launcher job whose latest run is to be resumed.
    pub job_id: String,
    /// The head that run delivered (empty: not known).
    pub head_sha: String,
    /// What the quality gate still lacks, one line per failed check.
    pub gate_lacks: Vec<String>,
}

impl ResumeAsk {
    /// The payload's `resume`, if it asks for one; `Err` names what is wrong with it.
    pub fn from_payload(payload: &Value) -> Result<Option<ResumeAsk>, String> {
        let r = &payload["resume"];
        if r.is_null() {
            return Ok(None);
        }
        let job_id = r["job_id"].as_str().unwrap_or_default();
        if job_id.is_empty()
            || job_id.len() > 128
            || !job_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "resume.job_id '{}' is not a job id",
                job_id.escape_debug()
            ));
        }
        let head_sha = r["head_sha"].as_str().unwrap_or_default();
        if head_sha.len() > 64 || !head_sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "resume.head_sha '{}' is not a commit id",
                head_sha.escape_debug()
            ));
        }
        let gate_lacks = r["gate_lacks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(ResumeAsk {
            job_id: job_id.to_owned(),
            head_sha: head_sha.to_owned(),
            gate_lacks,
        }))
    }
}

/// What is known when deciding, gathered by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Facts<'a> {
    pub ask: &'a ResumeAsk,
    /// `ORCH_RESUME_MAX_AGE_S`; zero: resuming is off.
    pub max_age: Duration,
    /// The session of the run to resume and when it was recorded (epoch ms), as
    /// usage-ledger has it; `None` when it has none (or could not be asked).
    pub session: Option<(&'a str, i64)>,
    pub now_ms: i64,
    /// HEAD of this job's checkout when it was made; `None` without a checkout.
    pub checkout_head: Option<&'a str>,
}

/// The decision: resume `session`, or start cold (and why, for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    Resume { session: String },
    Cold { why: String },
}

/// Whether the run resumes (the transcript's presence is checked after, by the caller).
pub(crate) fn plan(f: &Facts<'_>) -> Plan {
    let cold = |why: String| Plan::Cold { why };
    if f.max_age.is_zero() {
        return cold("resuming is off (ORCH_RESUME_MAX_AGE_S=0)".to_owned());
    }
    let Some((session, recorded_at_ms)) = f.session else {
        return cold(format!(
            "usage-ledger knows no CLI session of job {}",
            f.ask.job_id
        ));
    };
    if !is_session_id(session) {
        return cold(format!(
            "the recorded session '{}' is not a session id",
            session.escape_debug()
        ));
    }
    let age_ms = f.now_ms.saturating_sub(recorded_at_ms).max(0);
    let max_ms = i64::try_from(f.max_age.as_millis()).unwrap_or(i64::MAX);
    if age_ms > max_ms {
        return cold(format!(
            "the session is {}s old, over ORCH_RESUME_MAX_AGE_S={}",
            age_ms / 1000,
            f.max_age.as_secs()
        ));
    }
    match f.checkout_head {
        None => cold("there is no checkout of what that run left".to_owned()),
        Some(_) if f.ask.head_sha.is_empty() => {
            cold("what that run delivered is not known".to_owned())
        }
        Some(head) if !head.starts_with(&f.ask.head_sha) && !f.ask.head_sha.starts_with(head) => {
            cold(format!(
                "the checkout was reset: the branch is at {head}, that run left {}",
                f.ask.head_sha
            ))
        }
        Some(_) => Plan::Resume {
            session: session.to_owned(),
        },
    }
}

/// The directory name the CLI keeps a working directory's sessions under: every character
/// that is not an ASCII letter or digit becomes `-` (the CLI's own rule; longer than 200
/// characters it adds a hash we do not reproduce, so such a directory is not resumed).
pub(crate) fn cwd_slug(cwd: &Path) -> Option<String> {
    let slug: String = cwd
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    (slug.len() <= 200).then_some(slug)
}

/// Copies the transcript of `session` from `from` (a CLI config dir, any project under it)
/// to where the CLI looks for it when it runs in `cwd` under the config dir `to`. `Err`
/// says why it cannot (no transcript, a path the CLI would not find).
pub(crate) fn carry_transcript(
    from: &Path,
    to: &Path,
    session: &str,
    cwd: &Path,
) -> Result<PathBuf, String> {
    let file = format!("{session}.jsonl");
    let projects = from.join("projects");
    let found = std::fs::read_dir(&projects)
        .map_err(|e| format!("no CLI sessions under {}: {e}", projects.display()))?
        .filter_map(Result::ok)
        .map(|d| d.path().join(&file))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "the transcript of session {session} is not under {}",
                projects.display()
            )
        })?;
    let slug = cwd_slug(cwd).ok_or_else(|| {
        format!(
            "the checkout's path {} is too long for the CLI's session lookup",
            cwd.display()
        )
    })?;
    let dir = to.join("projects").join(slug);
    let target = dir.join(&file);
    if target == found {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::copy(&found, &target).map(|_| ()))
        .map_err(|e| format!("cannot copy the transcript to {}: {e}", target.display()))?;
    Ok(target)
}

/// The prompt of a resumed run: the conversation already holds the role's prompt and the
/// task, so only what the gate still lacks (quoted: it may carry an artifact's text).
pub(crate) fn resume_prompt(key: &str, stage: &str, ask: &ResumeAsk) -> String {
    let mut p = String::from("# The quality gate still lacks\n\n");
    p.push_str(&format!(
        "You are resuming your session on this task (work_item: {key}, stage: {stage}). The \
         orchestrator's quality gate checked what you left and it is not done yet. What it \
         still lacks:\n\n"
    ));
    if ask.gate_lacks.is_empty() {
        p.push_str("> (the gate gave no detail)\n");
    }
    for line in &ask.gate_lacks {
        let clean: String = line
            .chars()
            .filter(|c| !c.is_control() || *c == '\t')
            .collect();
        p.push_str(&format!("> {clean}\n"));
    }
    p.push_str(
        "\nFinish the work in the checkout so that the gate passes; the earlier messages of \
         this session are your task and what you did.\n",
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(head: &str) -> ResumeAsk {
        ResumeAsk {
            job_id: "job-1".into(),
            head_sha: head.into(),
            gate_lacks: vec!["check_analysis: analysis.md is missing".into()],
        }
    }

    const SID: &str = "45deef7f-0fc5-4f26-9ab9-dea1bde1752a";
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn resume_only_a_young_known_session_on_the_head_it_left() {
        let a = ask("0123abcd");
        let base = Facts {
            ask: &a,
            max_age: HOUR,
            session: Some((SID, 1_000_000)),
            now_ms: 1_000_000 + 60_000,
            checkout_head: Some("0123abcdef0123abcdef0123abcdef0123abcdef"),
        };
        assert_eq!(
            plan(&base),
            Plan::Resume {
                session: SID.into()
            }
        );
        let cold = |f: Facts<'_>| match plan(&f) {
            Plan::Cold { why } => why,
            p => panic!("{p:?}"),
        };
        assert!(
            cold(Facts {
                max_age: Duration::ZERO,
                ..base.clone()
            })
            .contains("off")
        );
        assert!(
            cold(Facts {
                session: None,
                ..base.clone()
            })
            .contains("no CLI session")
        );
        assert!(
            cold(Facts {
                session: Some(("--help", 1_000_000)),
                ..base.clone()
            })
            .contains("not a session id")
        );
        assert!(
            cold(Facts {
                now_ms: 1_000_000 + 3_600_001,
                ..base.clone()
            })
            .contains("over ORCH_RESUME_MAX_AGE_S=3600")
        );
        assert!(
            cold(Facts {
                checkout_head: None,
                ..base.clone()
            })
            .contains("no checkout")
        );
        assert!(
            cold(Facts {
                checkout_head: Some("ffff0000"),
                ..base.clone()
            })
            .contains("the checkout was reset")
        );
        let unknown = ask("");
        assert!(
            cold(Facts {
                ask: &unknown,
                ..base.clone()
            })
            .contains("not known")
        );
    }

    #[test]
    fn a_bad_resume_in_the_payload_is_named() {
        let p = |v: Value| ResumeAsk::from_payload(&serde_json::json!({ "resume": v }));
        assert_eq!(ResumeAsk::from_payload(&serde_json::json!({})), Ok(None));
        assert_eq!(
            p(
                serde_json::json!({"job_id": "job-1", "head_sha": "0123abcd", "gate_lacks": ["x: y"]})
            ),
            Ok(Some(ResumeAsk {
                job_id: "job-1".into(),
                head_sha: "0123abcd".into(),
                gate_lacks: vec!["x: y".into()],
            }))
        );
        let e = p(serde_json::json!({"job_id": "../x"})).expect_err("bad id");
        assert!(e.contains("resume.job_id"), "{e}");
        let e = p(serde_json::json!({"job_id": "j", "head_sha": "HEAD; rm"})).expect_err("sha");
        assert!(e.contains("resume.head_sha"), "{e}");
    }

    #[test]
    fn the_slug_is_the_clis() {
        assert_eq!(
            cwd_slug(Path::new("/work/var/jobs/01a2-b/checkout")).as_deref(),
            Some("-work-var-jobs-01a2-b-checkout")
        );
        assert_eq!(cwd_slug(Path::new(&format!("/{}", "x".repeat(250)))), None);
    }

    #[test]
    fn the_transcript_follows_the_job_to_its_new_checkout() {
        let root = tempfile::tempdir().expect("tempdir");
        let from = root.path().join("old-config");
        let old = from.join("projects").join("-old-checkout");
        std::fs::create_dir_all(&old).expect("mkdir");
        std::fs::write(old.join(format!("{SID}.jsonl")), "{\"type\":\"user\"}\n").expect("write");
        let to = root.path().join("new-config");
        let cwd = Path::new("/w/jobs/j2/checkout");
        let target = carry_transcript(&from, &to, SID, cwd).expect("carried");
        assert_eq!(
            target,
            to.join("projects/-w-jobs-j2-checkout")
                .join(format!("{SID}.jsonl"))
        );
        assert_eq!(
            std::fs::read_to_string(&target).expect("read"),
            "{\"type\":\"user\"}\n"
        );
        let e = carry_transcript(&from, &to, "0000-none", cwd).expect_err("missing");
        assert!(e.contains("is not under"), "{e}");
    }

    #[test]
    fn the_resume_prompt_quotes_what_the_gate_lacks() {
        let mut a = ask("0123abcd");
        a.gate_lacks
            .push("check_x: line one\u{1b}[31m\nline two".into());
        let p = resume_prompt("ORCH-7", "analysis", &a);
        assert_eq!(
            p,
            "# The quality gate still lacks\n\n\
             You are resuming your session on this task (work_item: ORCH-7, stage: analysis). \
             The orchestrator's quality gate checked what you left and it is not done yet. \
             What it still lacks:\n\n\
             > check_analysis: analysis.md is missing\n\
             > check_x: line one[31mline two\n\n\
             Finish the work in the checkout so that the gate passes; the earlier messages of \
             this session are your task and what you did.\n"
        );
    }
}
