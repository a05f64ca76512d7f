//! A recording agent: a bash script that stands in for the agent CLI (`ORCH_AGENT_COMMAND`)
//! and records every run it makes, so that tests and benchmarks can check from the agent's
//! own word what the launcher promises — each job run once, the cap never passed across
//! replicas — and time how long a webhook took to start it.
//!
//! Under `root`:
//! - `jobs/<job id>`: per run, `start <t> <attempt> <work item> <agent> <prompt file>` as
//!   its first action and `end <t>` before it prints its result (a run killed midway has no
//!   `end`). The prompt file lies in the work directory of the launcher that ran it.
//! - `first/<work item>.<agent>`: the start time of each run of that agent on that item.
//!
//! Times are `$EPOCHREALTIME` (seconds since the epoch, microseconds), taken before any
//! fork. It prints a successful CLI result; an `analyst` also writes `analysis.md` into
//! `$ORCH_ARTIFACTS_DIR`, enough for the analysis gate. With [`Behaviour::then`] it runs a
//! real agent instead (the fault suite wraps the scripted agent this way) and records
//! around it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// How each run behaves.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Seconds each run lasts before it ends (a `sleep`, so it forks: after the start).
    pub run_seconds: f64,
    /// The real agent to run after the start record (e.g. the scripted agent), given the
    /// script's arguments: its output and exit code are the run's, and `end` is recorded
    /// whatever its exit code. `None`: the built-in success (and an analyst's
    /// `analysis.md`).
    pub then: Option<String>,
}

/// The script and what it recorded.
#[derive(Debug, Clone)]
pub struct RecordingAgent {
    root: PathBuf,
    script: PathBuf,
}

/// One run, as the agent recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub job_id: String,
    pub attempt: u32,
    pub work_item: String,
    pub agent: String,
    pub start: f64,
    /// `None` when the run never reached its end (killed).
    pub end: Option<f64>,
    pub prompt_file: String,
}

impl Run {
    /// Whether the run happened under `dir` (a launcher replica's work directory).
    pub fn ran_under(&self, dir: &Path) -> bool {
        Path::new(&self.prompt_file).starts_with(dir)
    }
}

impl RecordingAgent {
    /// Writes the script under `root` (created).
    pub fn create(root: &Path, behaviour: &Behaviour) -> io::Result<RecordingAgent> {
        for d in ["jobs", "first"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let sleep = if behaviour.run_seconds > 0.0 {
            format!("sleep {}\n", behaviour.run_seconds)
        } else {
            String::new()
        };
        let r = root.display();
        let run = match &behaviour.then {
            Some(command) => format!(
                r#"{command} "$@"
rc=$?
echo "end $EPOCHREALTIME" >> "{r}/jobs/$ORCH_JOB_ID"
exit $rc
"#
            ),
            None => format!(
                r#"if [ "$ORCH_AGENT" = analyst ]; then
  mkdir -p "$ORCH_ARTIFACTS_DIR"
  printf -- '---\nwork_item: %s\n---\n# Analysis\nRecorded agent.\n' "$ORCH_WORK_ITEM" > "$ORCH_ARTIFACTS_DIR/analysis.md"
fi
echo "end $EPOCHREALTIME" >> "{r}/jobs/$ORCH_JOB_ID"
echo '{{"type":"result","subtype":"success","is_error":false,"result":"ok","total_cost_usd":0}}'
"#
            ),
        };
        let script = root.join("agent.sh");
        std::fs::write(
            &script,
            format!(
                r#"t=$EPOCHREALTIME
echo "$t" >> "{r}/first/$ORCH_WORK_ITEM.$ORCH_AGENT"
echo "start $t $ORCH_JOB_ATTEMPT $ORCH_WORK_ITEM $ORCH_AGENT $ORCH_PROMPT_FILE" >> "{r}/jobs/$ORCH_JOB_ID"
{sleep}{run}"#
            ),
        )?;
        Ok(RecordingAgent {
            root: root.to_path_buf(),
            script,
        })
    }

    /// The value of `ORCH_AGENT_COMMAND`.
    pub fn command(&self) -> String {
        format!("bash {}", self.script.display())
    }

    /// When the first run of `agent` on `work_item` started, once it has.
    pub fn first_start(&self, work_item: &str, agent: &str) -> Option<f64> {
        std::fs::read_to_string(self.root.join("first").join(format!("{work_item}.{agent}")))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The runs of job `job_id` (none if it never ran).
    pub fn runs_of(&self, job_id: &str) -> io::Result<Vec<Run>> {
        match std::fs::read_to_string(self.root.join("jobs").join(job_id)) {
            Ok(text) => parse(job_id, &text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Every run, by job id.
    pub fn runs(&self) -> io::Result<BTreeMap<String, Vec<Run>>> {
        let mut all = BTreeMap::new();
        for entry in std::fs::read_dir(self.root.join("jobs"))? {
            let id = entry?.file_name().to_string_lossy().into_owned();
            let runs = self.runs_of(&id)?;
            all.insert(id, runs);
        }
        Ok(all)
    }
}

fn bad(job_id: &str, text: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("job {job_id}: unexpected record {text:?}"),
    )
}

/// Reads one job's record: runs in order, each `start` optionally followed by its `end`.
fn parse(job_id: &str, text: &str) -> io::Result<Vec<Run>> {
    let mut runs: Vec<Run> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.splitn(6, ' ').collect();
        let time = |s: &str| s.parse::<f64>().map_err(|_| bad(job_id, line));
        match f.as_slice() {
            ["start", t, attempt, work_item, agent, prompt] => runs.push(Run {
                job_id: job_id.to_owned(),
                attempt: attempt.parse().map_err(|_| bad(job_id, line))?,
                work_item: (*work_item).to_owned(),
                agent: (*agent).to_owned(),
                start: time(t)?,
                end: None,
                prompt_file: (*prompt).to_owned(),
            }),
            ["end", t] => match runs.last_mut() {
                Some(run) if run.end.is_none() => run.end = Some(time(t)?),
                _ => return Err(bad(job_id, line)),
            },
            _ => return Err(bad(job_id, line)),
        }
    }
    Ok(runs)
}

/// The most runs in progress at one moment (a run without an end counts until `open_end`).
pub fn max_overlap<'a>(runs: impl IntoIterator<Item = &'a Run>, open_end: f64) -> usize {
    let mut edges: Vec<(f64, i32)> = runs
        .into_iter()
        .flat_map(|r| [(r.start, 1), (r.end.unwrap_or(open_end), -1)])
        .collect();
    // At equal times an end comes first: runs that only touch do not overlap.
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: f64, end: Option<f64>) -> Run {
        Run {
            job_id: "j".into(),
            attempt: 1,
            work_item: "W-1".into(),
            agent: "noop".into(),
            start,
            end,
            prompt_file: "/w/launcher-1/work/jobs/j/prompt-1.md".into(),
        }
    }

    #[test]
    fn overlap_counts_runs_in_progress_together() {
        let (a, b, c, d) = (
            run(0.0, Some(1.0)),
            run(0.5, Some(1.5)),
            run(1.0, Some(2.0)),
            run(1.2, Some(1.3)),
        );
        assert_eq!(max_overlap([&a], 9.0), 1);
        // `c` starts as `a` ends: they do not overlap.
        assert_eq!(max_overlap([&a, &c], 9.0), 1);
        assert_eq!(max_overlap([&a, &b, &c], 9.0), 2);
        assert_eq!(max_overlap([&a, &b, &c, &d], 9.0), 3);
        assert_eq!(max_overlap([], 9.0), 0);
        // A run that never ended holds its slot until `open_end`.
        assert_eq!(max_overlap([&run(0.0, None), &c], 9.0), 2);
        assert_eq!(max_overlap([&run(0.0, None), &c], 0.5), 1);
    }

    #[test]
    fn a_record_reads_back_as_runs() {
        let text = "start 10.5 1 W-1 noop /w/launcher-1/work/jobs/j/prompt 1.md\nend 11.25\nstart 12 2 W-1 noop /p\n";
        let runs = parse("j", text).expect("parses");
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[0].start, runs[0].end, runs[0].attempt),
            (10.5, Some(11.25), 1)
        );
        assert_eq!(runs[0].prompt_file, "/w/launcher-1/work/jobs/j/prompt 1.md");
        assert!(runs[0].ran_under(Path::new("/w/launcher-1")));
        assert!(!runs[0].ran_under(Path::new("/w/launcher-11")));
        assert_eq!((runs[1].attempt, runs[1].end), (2, None));
        assert!(parse("j", "end 1\n").is_err(), "an end without a start");
        assert!(parse("j", "start x 1 W noop /p\n").is_err(), "a bad time");
    }

    #[test]
    fn the_script_records_its_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = RecordingAgent::create(dir.path(), &Behaviour::default()).expect("create");
        let checkout = dir.path().join("checkout");
        std::fs::create_dir_all(&checkout).expect("checkout");
        for (job, attempt) in [("job-1", "1"), ("job-1", "2")] {
            let out = std::process::Command::new("bash")
                .arg(dir.path().join("agent.sh"))
                .current_dir(&checkout)
                .env("ORCH_JOB_ID", job)
                .env("ORCH_JOB_ATTEMPT", attempt)
                .env("ORCH_WORK_ITEM", "W-7")
                .env("ORCH_AGENT", "analyst")
                .env(
                    "ORCH_PROMPT_FILE",
                    "/w/launcher-0/work/jobs/job-1/prompt.md",
                )
                .env("ORCH_ARTIFACTS_DIR", "docs/work-items/W-7")
                .output()
                .expect("bash runs");
            assert!(out.status.success());
            assert!(String::from_utf8_lossy(&out.stdout).contains(r#""subtype":"success""#));
        }
        let runs = agent.runs_of("job-1").expect("runs");
        assert_eq!(runs.len(), 2);
        assert!(runs.iter().all(|r| r.end.is_some_and(|e| e >= r.start)));
        assert_eq!((runs[0].attempt, runs[1].attempt), (1, 2));
        assert_eq!(agent.runs().expect("all").len(), 1);
        assert!(agent.runs_of("job-2").expect("none").is_empty());
        assert_eq!(agent.first_start("W-7", "analyst"), Some(runs[0].start));
        assert!(checkout.join("docs/work-items/W-7/analysis.md").is_file());
    }

    #[test]
    fn the_script_runs_the_agent_it_wraps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = RecordingAgent::create(
            dir.path(),
            &Behaviour {
                then: Some(r#"sh -c 'printf "ran %s" "$ORCH_AGENT"; exit 3' agent"#.into()),
                ..Behaviour::default()
            },
        )
        .expect("create");
        let out = std::process::Command::new("bash")
            .arg(dir.path().join("agent.sh"))
            .current_dir(dir.path())
            .env("ORCH_JOB_ID", "job-9")
            .env("ORCH_JOB_ATTEMPT", "4")
            .env("ORCH_WORK_ITEM", "W-9")
            .env("ORCH_AGENT", "tester")
            .env("ORCH_PROMPT_FILE", "/w/p.md")
            .output()
            .expect("bash runs");
        // The wrapped agent's output and exit code are the run's; the end is recorded.
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ran tester");
        let runs = agent.runs_of("job-9").expect("runs");
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].attempt, runs[0].end.is_some()), (4, true));
    }
}
