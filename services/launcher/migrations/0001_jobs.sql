-- The durable job queue. Times are epoch milliseconds (0: not yet), booleans 0/1, so the
-- same SQL serves SQLite and PostgreSQL. `attempt` counts runs (claims) and is the fencing
-- token of every write about a run: a write for another attempt changes nothing.
-- `failures` counts permanent failures (bounded by max_attempts), `transient_attempts`
-- transient ones (bounded by ORCH_MAX_TRANSIENT_ATTEMPTS).
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    work_item TEXT NOT NULL,
    repo TEXT NOT NULL,
    agent TEXT NOT NULL,
    stage TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    dedupe_key TEXT,
    status TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    failures BIGINT NOT NULL,
    transient_attempts BIGINT NOT NULL,
    not_before_ms BIGINT NOT NULL,
    instance_id TEXT NOT NULL,
    pid BIGINT,
    exit_code BIGINT,
    enqueued_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    heartbeat_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT NOT NULL,
    log_path TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    qg_hook_blocks BIGINT NOT NULL
);

-- NULLs are distinct: jobs without a dedupe key never collide.
CREATE UNIQUE INDEX jobs_dedupe_key ON jobs (dedupe_key);
-- The claim: oldest runnable first.
CREATE INDEX jobs_queued ON jobs (enqueued_at_ms, id) WHERE status = 'queued';
-- When the next queued job becomes runnable (the dispatcher's sleep), without a scan.
CREATE INDEX jobs_queued_due ON jobs (not_before_ms) WHERE status = 'queued';
-- Running jobs: the concurrency count, ListRunning, heartbeats, restart reconciliation.
CREATE INDEX jobs_running ON jobs (kind, instance_id) WHERE status = 'running';
CREATE INDEX jobs_by_work_item ON jobs (work_item, enqueued_at_ms);

-- One row per launcher instance (stable id across restarts of the same instance).
CREATE TABLE launcher_instances (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    heartbeat_at_ms BIGINT NOT NULL,
    stopped_at_ms BIGINT NOT NULL
);

-- The circuit breaker of LLM claims, shared by every replica: closed | open | half_open.
CREATE TABLE breaker (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    consecutive_transient BIGINT NOT NULL,
    open_until_ms BIGINT NOT NULL,
    probe_job_id TEXT NOT NULL,
    probe_started_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

INSERT INTO breaker (id, state, consecutive_transient, open_until_ms, probe_job_id, probe_started_ms, updated_at_ms)
VALUES ('llm', 'closed', 0, 0, '', 0, 0);
