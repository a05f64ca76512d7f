use orchestrator_agent_output::parse_result;
use orchestrator_kit::Db;
use orchestrator_kit::time::now_ms;
use orchestrator_proto::usage_ledger::v1::{
    AgentRun, AgentUsage, FinishCommentResponse, ListRunsRequest, ListRunsResponse,
    RecordRunRequest, RecordRunResponse, RunKey, SpentSinceRequest, SpentSinceResponse,
    WorkItemCost, WorkItemCostsRequest, WorkItemCostsResponse, WorkItemSummaryRequest,
    WorkItemSummaryResponse, usage_ledger_server::UsageLedger,
};
use tonic::{Request, Response, Status};

use crate::error::LedgerError;
use crate::format::{self, Totals};
use crate::group_commit::{self, RunWriter};
use crate::store::{self, RunRecord};
use orchestrator_kit::group_commit::GroupWriter;

/// The usage-ledger gRPC service over its own storage.
#[derive(Debug, Clone)]
pub struct UsageLedgerService {
    db: Db,
    writer: GroupWriter<RunWriter>,
}

impl UsageLedgerService {
    /// Builds the service; must be called inside a tokio runtime (it starts the writer).
    pub fn new(db: Db) -> Self {
        UsageLedgerService {
            writer: group_commit::spawn(db.clone()),
            db,
        }
    }

    /// Parses `output` and records the run; returns the stored run and whether it is new.
    pub async fn record_run(
        &self,
        req: RecordRunRequest,
    ) -> Result<(RunRecord, bool), LedgerError> {
        let job_id = required_id("job_id", &req.job_id)?;
        let work_item = required_id("work_item", &req.work_item)?;
        let agent = required_id("agent", &req.agent)?;
        let repo = optional_id("repo", &req.repo)?;
        let attempt = req.attempt.max(1);
        let parsed = parse_result(&req.output);
        let session_id = parsed.as_ref().and_then(|r| r.session_id.clone());
        // A resumed CLI session reports its cost over the whole session (2.1.328: the
        // second run of a session says 0.03136 where it cost 0.01598), its tokens per run:
        // this run's cost is what the session reached less what its earlier runs cost.
        let mut total_cost_usd = parsed.as_ref().and_then(|r| r.total_cost_usd);
        if req.resumed
            && let (Some(total), Some(session)) = (total_cost_usd, &session_id)
        {
            let before = store::session_cost_before(&self.db, session, job_id, attempt).await?;
            total_cost_usd = Some((total - before).max(0.0));
        }
        let run = RunRecord {
            job_id: job_id.to_owned(),
            attempt,
            work_item: work_item.to_owned(),
            agent: agent.to_owned(),
            result_found: parsed.is_some(),
            usage: parsed.as_ref().map(|r| r.usage).unwrap_or_default(),
            total_cost_usd,
            is_error: parsed.as_ref().and_then(|r| r.is_error),
            subtype: parsed.as_ref().and_then(|r| r.subtype.clone()),
            api_error_status: parsed.as_ref().and_then(|r| r.api_error_status),
            num_turns: parsed.as_ref().and_then(|r| r.num_turns),
            duration_ms: parsed.as_ref().and_then(|r| r.duration_ms),
            recorded_at_ms: now_ms(),
            session_id,
            repo: repo.to_owned(),
        };
        if self.writer.write(run.clone()).await? {
            tracing::debug!(
                job_id,
                attempt,
                work_item,
                agent,
                result_found = run.result_found,
                "run recorded"
            );
            return Ok((run, true));
        }
        // Already recorded (a re-driven finalize): the first record stands.
        let existing = store::get(&self.db, job_id, attempt)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("job {job_id} attempt {attempt}")))?;
        Ok((existing, false))
    }

    async fn get_run(&self, key: &RunKey) -> Result<RunRecord, LedgerError> {
        let job_id = required_id("job_id", &key.job_id)?;
        store::get(&self.db, job_id, key.attempt)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("job {job_id} attempt {}", key.attempt)))
    }

    /// Sums a work item's runs by agent (in order of first run) and renders the summary.
    pub async fn summary(&self, work_item: &str) -> Result<WorkItemSummaryResponse, LedgerError> {
        let work_item = required_id("work_item", work_item)?;
        let runs = store::list_for_work_item(&self.db, work_item).await?;
        let mut by_agent: Vec<(String, Totals)> = Vec::new();
        let mut total = Totals::default();
        for run in &runs {
            match by_agent.iter_mut().find(|(a, _)| *a == run.agent) {
                Some((_, t)) => t.add(run),
                None => {
                    let mut t = Totals::default();
                    t.add(run);
                    by_agent.push((run.agent.clone(), t));
                }
            }
            total.add(run);
        }
        let agents: Vec<AgentUsage> = by_agent
            .iter()
            .map(|(a, t)| agent_usage(a, &format::summary_line(&format::role(a), t), t))
            .collect();
        let total_line = format::summary_line("Total", &total);
        let mut text = format!("Usage for {work_item}");
        for a in &agents {
            text.push('\n');
            text.push_str(&a.line);
        }
        text.push('\n');
        text.push_str(&total_line);
        Ok(WorkItemSummaryResponse {
            work_item: work_item.to_owned(),
            agents,
            total: Some(agent_usage("", &total_line, &total)),
            text,
        })
    }
}

/// The most runs one `ListRuns` answers with.
pub const LIST_RUNS_MAX: u32 = 10_000;

/// Checks an id that is required: present, short, printable.
fn required_id<'a>(field: &'static str, value: &'a str) -> Result<&'a str, LedgerError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(LedgerError::MissingField(field));
    }
    if v.len() > 200 || v.chars().any(char::is_control) {
        return Err(LedgerError::InvalidField {
            field,
            reason: "must be at most 200 printable characters".to_owned(),
        });
    }
    Ok(v)
}

/// Checks an id that may be empty; when present, as [`required_id`].
fn optional_id<'a>(field: &'static str, value: &'a str) -> Result<&'a str, LedgerError> {
    if value.trim().is_empty() {
        return Ok("");
    }
    required_id(field, value)
}

fn agent_usage(agent: &str, line: &str, t: &Totals) -> AgentUsage {
    AgentUsage {
        agent: agent.to_owned(),
        runs: t.runs,
        runs_without_usage: t.runs_without_usage,
        input_tokens: t.input_tokens,
        output_tokens: t.output_tokens,
        cache_read_tokens: t.cache_read_tokens,
        cache_creation_tokens: t.cache_creation_tokens,
        total_cost_usd: t.total_cost_usd,
        line: line.to_owned(),
    }
}

fn to_proto(r: RunRecord) -> AgentRun {
    AgentRun {
        job_id: r.job_id,
        attempt: r.attempt,
        work_item: r.work_item,
        agent: r.agent,
        result_found: r.result_found,
        input_tokens: r.usage.input_tokens,
        output_tokens: r.usage.output_tokens,
        cache_read_tokens: r.usage.cache_read_tokens,
        cache_creation_tokens: r.usage.cache_creation_tokens,
        total_cost_usd: r.total_cost_usd,
        is_error: r.is_error,
        subtype: r.subtype,
        api_error_status: r.api_error_status,
        num_turns: r.num_turns,
        duration_ms: r.duration_ms,
        recorded_at_ms: r.recorded_at_ms,
        session_id: r.session_id,
        repo: r.repo,
    }
}

#[tonic::async_trait]
impl UsageLedger for UsageLedgerService {
    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id, attempt = request.get_ref().attempt))]
    async fn record_run(
        &self,
        request: Request<RecordRunRequest>,
    ) -> Result<Response<RecordRunResponse>, Status> {
        let (run, created) = UsageLedgerService::record_run(self, request.into_inner()).await?;
        Ok(Response::new(RecordRunResponse {
            run: Some(to_proto(run)),
            created,
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn get_run(&self, request: Request<RunKey>) -> Result<Response<AgentRun>, Status> {
        let run = self.get_run(request.get_ref()).await?;
        Ok(Response::new(to_proto(run)))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item))]
    async fn work_item_summary(
        &self,
        request: Request<WorkItemSummaryRequest>,
    ) -> Result<Response<WorkItemSummaryResponse>, Status> {
        Ok(Response::new(
            self.summary(&request.get_ref().work_item).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn finish_comment(
        &self,
        request: Request<RunKey>,
    ) -> Result<Response<FinishCommentResponse>, Status> {
        let run = self.get_run(request.get_ref()).await?;
        Ok(Response::new(FinishCommentResponse {
            text: format::finish_line(&run),
        }))
    }

    #[tracing::instrument(skip_all, fields(since_ms = request.get_ref().since_ms))]
    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => LIST_RUNS_MAX,
            n => n.min(LIST_RUNS_MAX),
        };
        let runs = store::list_since(&self.db, req.since_ms, req.work_item.trim(), limit)
            .await
            .map_err(LedgerError::from)?;
        Ok(Response::new(ListRunsResponse {
            runs: runs.into_iter().map(to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn work_item_costs(
        &self,
        request: Request<WorkItemCostsRequest>,
    ) -> Result<Response<WorkItemCostsResponse>, Status> {
        let costs = store::costs_by_work_item(&self.db, &request.get_ref().work_items)
            .await
            .map_err(LedgerError::from)?;
        Ok(Response::new(WorkItemCostsResponse {
            costs: costs
                .into_iter()
                .map(|c| WorkItemCost {
                    work_item: c.work_item,
                    runs: c.runs,
                    total_cost_usd: c.total_cost_usd,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(since_ms = request.get_ref().since_ms, repo = %request.get_ref().repo))]
    async fn spent_since(
        &self,
        request: Request<SpentSinceRequest>,
    ) -> Result<Response<SpentSinceResponse>, Status> {
        let req = request.get_ref();
        let repo = optional_id("repo", &req.repo)?;
        let (runs, total_cost_usd) = store::spent_since(&self.db, req.since_ms, repo)
            .await
            .map_err(LedgerError::from)?;
        Ok(Response::new(SpentSinceResponse {
            total_cost_usd,
            runs,
        }))
    }
}
