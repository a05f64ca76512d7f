//! The agent's prompt file (`prompt-<attempt>.md`, fed on stdin): the role's prompt, then
//! the task stage-engine composed for the job (its payload's `task`, written as given: the
//! launcher does not know what a stage needs), then what only the launcher knows about this
//! run. A job without a task (enqueued before stage-engine composed tasks, or by hand)
//! gets the short context the launcher always wrote.

use crate::prepare::Ctx;

/// What the prompt is written from, besides the role's prompt.
pub(crate) struct Run<'a> {
    pub ctx: &'a Ctx,
    pub stage: &'a str,
    /// The launcher's attempt of this job, and how the previous one ended.
    pub attempt: u32,
    pub previous: &'a str,
}

/// The role's prompt, then the task, then the run's own lines.
pub(crate) fn prompt_text(run: &Run<'_>, role_prompt: &str) -> String {
    let mut p = role_prompt.trim_end().to_owned();
    p.push_str("\n\n---\n\n");
    match run.ctx.task.as_deref() {
        Some(task) => {
            p.push_str(task.trim_end());
            p.push_str("\n\n## This run\n\n");
        }
        None => legacy_task(run, &mut p),
    }
    run_lines(run, &mut p);
    p
}

/// The prompt of a run that resumes its agent's previous CLI session: the conversation
/// holds the role's prompt and the task already, so only `resume` (what the gate still
/// lacks, [`crate::resume::resume_prompt`]) and the run's own lines.
pub(crate) fn resumed_prompt_text(run: &Run<'_>, resume: &str) -> String {
    let mut p = resume.trim_end().to_owned();
    p.push_str("\n\n## This run\n\n");
    run_lines(run, &mut p);
    p
}

/// What only the launcher knows about this run.
fn run_lines(run: &Run<'_>, p: &mut String) {
    if run.attempt > 1 && !run.previous.is_empty() {
        p.push_str(&format!(
            "- This is run {} of this job; the previous one ended with: {}\n",
            run.attempt, run.previous
        ));
    }
    p.push_str("- The orchestrator commits and pushes what you leave in the checkout; do not push yourself.\n");
}

/// The context of a job whose payload carries no task.
fn legacy_task(run: &Run<'_>, p: &mut String) {
    let ctx = run.ctx;
    p.push_str("# Your task\n\n");
    // `work_item:` and `stage:` as the artifacts' frontmatter spells them: the stand-ins
    // for a model (examples/agents/scripted-agent.py, crates/model-server) read them here.
    p.push_str(&format!("- work_item: {}", ctx.key));
    if !ctx.title.is_empty() {
        p.push_str(&format!(" — {}", ctx.title));
    }
    p.push_str(&format!(
        "\n- stage: {}\n- Repository: {} (branch `{}`, base `{}`); you are in its checkout.\n",
        run.stage, ctx.repo, ctx.branch, ctx.base,
    ));
    if !ctx.artifacts_dir.is_empty() {
        p.push_str(&format!(
            "- Write your artifacts under `{}/` (see docs/artifacts.md).\n",
            ctx.artifacts_dir
        ));
    }
    if !ctx.why.is_empty() {
        p.push_str(&format!("- Why you run: {}\n", ctx.why));
    }
}

#[cfg(test)]
mod tests {
    use orchestrator_forge::RepoName;

    use super::*;

    fn ctx(task: Option<&str>) -> Ctx {
        Ctx {
            key: "ORCH-7".into(),
            repo: RepoName::parse("acme/app").expect("repo"),
            branch: "orch/ORCH-7".into(),
            base: "main".into(),
            title: "Add a health endpoint".into(),
            why: "new work item".into(),
            dedupe_key: String::new(),
            task: task.map(str::to_owned),
            artifacts_dir: "docs/work-items/ORCH-7".into(),
            needs_merge_lease: false,
            announce_start: false,
            resume: None,
        }
    }

    #[test]
    fn the_task_from_stage_engine_is_written_as_given() {
        let c = ctx(Some(
            "# Your task\n\n- work_item: ORCH-7\n- stage: development\n\nDESC\n",
        ));
        let run = Run {
            ctx: &c,
            stage: "development",
            attempt: 2,
            previous: "the agent timed out",
        };
        let p = prompt_text(&run, "You are the developer.\n");
        assert_eq!(
            p,
            "You are the developer.\n\n---\n\n# Your task\n\n- work_item: ORCH-7\n- stage: development\n\nDESC\n\n\
             ## This run\n\n\
             - This is run 2 of this job; the previous one ended with: the agent timed out\n\
             - The orchestrator commits and pushes what you leave in the checkout; do not push yourself.\n"
        );
    }

    #[test]
    fn a_job_without_a_task_gets_the_launchers_context() {
        let c = ctx(None);
        let run = Run {
            ctx: &c,
            stage: "analysis",
            attempt: 1,
            previous: "",
        };
        let p = prompt_text(&run, "You are the analyst.");
        assert_eq!(
            p,
            "You are the analyst.\n\n---\n\n# Your task\n\n\
             - work_item: ORCH-7 — Add a health endpoint\n\
             - stage: analysis\n\
             - Repository: acme/app (branch `orch/ORCH-7`, base `main`); you are in its checkout.\n\
             - Write your artifacts under `docs/work-items/ORCH-7/` (see docs/artifacts.md).\n\
             - Why you run: new work item\n\
             - The orchestrator commits and pushes what you leave in the checkout; do not push yourself.\n"
        );
    }
}
