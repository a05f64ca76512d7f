-- One row per agent run (job attempt). Usage columns are NULL when the CLI did not report
-- them: unknown is never zero. Booleans are 0/1 integers, times epoch milliseconds, so the
-- same SQL serves SQLite and PostgreSQL. The cost is the CLI's number as exact text (the
-- shortest decimal that reads back as the same f64): recorded, never rounded, and it keeps
-- nullable floats out of binds, which sqlx 0.9's Any driver sends to PostgreSQL as float4.
CREATE TABLE agent_runs (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    work_item TEXT NOT NULL,
    agent TEXT NOT NULL,
    result_found BIGINT NOT NULL,
    input_tokens BIGINT,
    output_tokens BIGINT,
    cache_read_tokens BIGINT,
    cache_creation_tokens BIGINT,
    total_cost_usd TEXT,
    is_error BIGINT,
    subtype TEXT,
    api_error_status BIGINT,
    num_turns BIGINT,
    duration_ms BIGINT,
    recorded_at_ms BIGINT NOT NULL,
    PRIMARY KEY (job_id, attempt)
);

CREATE INDEX agent_runs_by_work_item ON agent_runs (work_item, recorded_at_ms);
