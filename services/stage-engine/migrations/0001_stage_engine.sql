-- stage-engine's tables. One SQL text for SQLite and PostgreSQL: times are epoch ms
-- (BIGINT), booleans BIGINT 0/1, ids TEXT (uuid v7, which sorts by creation time).

-- One row per work item: where it is in the pipeline and what it waits for.
CREATE TABLE work_items (
    key TEXT PRIMARY KEY,
    tracker_issue_id TEXT NOT NULL UNIQUE,
    tracker_project_id TEXT NOT NULL DEFAULT '',
    title TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    repo TEXT NOT NULL,
    branch TEXT NOT NULL,
    -- analysis | architecture | development | review | testing | deploy-staging | deploy | done
    stage TEXT NOT NULL,
    -- active | awaiting_approval | blocked | done
    status TEXT NOT NULL,
    rollback_count BIGINT NOT NULL DEFAULT 0,
    stage_retries BIGINT NOT NULL DEFAULT 0,
    -- The agent whose finish is awaited, and the dedupe key of its enqueue ('' when none).
    expected_agent TEXT NOT NULL DEFAULT '',
    expected_dedupe_key TEXT NOT NULL DEFAULT '',
    -- The launcher job of that enqueue, once its answer is recorded ('' until then).
    latest_job_id TEXT NOT NULL DEFAULT '',
    -- Optimistic concurrency: every change bumps it and is guarded by it.
    version BIGINT NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX work_items_repo_branch ON work_items (repo, branch);
CREATE INDEX work_items_status ON work_items (status, updated_at_ms);

-- The audit: every change of stage or status.
CREATE TABLE stage_transitions (
    id TEXT PRIMARY KEY,
    work_item TEXT NOT NULL,
    from_stage TEXT NOT NULL,
    to_stage TEXT NOT NULL,
    from_status TEXT NOT NULL,
    to_status TEXT NOT NULL,
    -- created | advanced | retried | rolled_back | awaiting_approval | blocked | unblocked | done
    outcome TEXT NOT NULL,
    cause TEXT NOT NULL,
    finished_agent TEXT NOT NULL DEFAULT '',
    job_id TEXT NOT NULL DEFAULT '',
    -- [{"check":..,"passed":..,"detail":..}]
    qg_results_json TEXT NOT NULL DEFAULT '[]',
    at_ms BIGINT NOT NULL
);
CREATE INDEX stage_transitions_work_item ON stage_transitions (work_item, id);

-- Every ":approved:" seen, accepted or not (a bot's never is).
CREATE TABLE approvals (
    work_item TEXT NOT NULL,
    comment_id TEXT NOT NULL,
    author TEXT NOT NULL,
    accepted BIGINT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (work_item, comment_id)
);

-- Launcher jobs whose finish has been applied: the same finish twice changes nothing.
CREATE TABLE consumed_jobs (
    job_id TEXT PRIMARY KEY,
    work_item TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);

-- Side effects, written in the transaction of the state change that causes them and
-- delivered with retries. Entries of one (work_item, channel) go out in id order.
CREATE TABLE outbox (
    id TEXT PRIMARY KEY,
    work_item TEXT NOT NULL,
    -- tracker | launcher | post_deploy
    channel TEXT NOT NULL,
    -- comment | set_state_done | usage_summary | enqueue | arm_watch
    kind TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    -- A caller's idempotency key (AddComment); unique when set.
    idempotency_key TEXT NULL UNIQUE,
    -- pending | delivering | delivered | failed
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at_ms BIGINT NOT NULL,
    -- While delivering: when the claim lapses (a crashed deliverer's entry is taken again).
    claimed_until_ms BIGINT NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    result_json TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    delivered_at_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at_ms);
CREATE INDEX outbox_order ON outbox (work_item, channel, id);
