-- post-deploy's tables. Times are epoch milliseconds, booleans 0/1 integers, so the same SQL
-- serves SQLite and PostgreSQL. Counter readings and window counts are stored as exact
-- text (the shortest decimal that reads back as the same f64): it keeps nullable floats
-- out of binds, which sqlx 0.9's Any driver sends to PostgreSQL as float4.

-- One watch per work item: the observation window after its deploy, and everything a
-- restarted post-deploy needs to resume it where it was.
CREATE TABLE watches (
    work_item TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    deployed_sha TEXT NOT NULL,
    previous_sha TEXT NOT NULL,
    -- The orchestrator's own repo: only ever alerted on.
    self_repo BIGINT NOT NULL,
    armed_at_ms BIGINT NOT NULL,
    window_end_ms BIGINT NOT NULL,
    consecutive_health_failures BIGINT NOT NULL,
    consecutive_probe_errors BIGINT NOT NULL,
    -- watching | rolling_back | closed | rolled_back
    state TEXT NOT NULL,
    -- CONTINUE | CLOSE | ROLLBACK | ALERT_ONLY; empty before the first tick.
    last_action TEXT NOT NULL,
    -- 0 while open.
    closed_at_ms BIGINT NOT NULL,
    -- Ticks taken in this window.
    ticks BIGINT NOT NULL,
    -- Numbers the samples and fences concurrent ticks; never reset, not even on a re-arm.
    seq BIGINT NOT NULL,
    last_classification TEXT NOT NULL,
    last_reason TEXT NOT NULL,
    last_tick_at_ms BIGINT NOT NULL,
    -- The counters as last read (NULL before the first reading): the next delta starts here.
    last_requests_total TEXT,
    last_errors_5xx_total TEXT,
    window_requests TEXT NOT NULL,
    window_5xx TEXT NOT NULL,
    -- The alert episode in force ('' none, 'degraded', 'probe_errors'): one alert per episode.
    alerting TEXT NOT NULL,
    alert_seq BIGINT NOT NULL,
    -- The rollback, once started. started set and finished NULL means it was interrupted.
    rollback_command TEXT,
    rollback_started_at_ms BIGINT,
    rollback_finished_at_ms BIGINT,
    rollback_exit_code BIGINT,
    rollback_timed_out BIGINT,
    rollback_output TEXT,
    rollback_error TEXT
);

CREATE INDEX watches_by_state ON watches (state, armed_at_ms);

-- One row per tick: what was seen, how it was classified, what was done.
CREATE TABLE probe_samples (
    work_item TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    health_ok BIGINT NOT NULL,
    -- 0 when the health URL did not answer (or none is configured).
    health_status BIGINT NOT NULL,
    health_latency_ms BIGINT NOT NULL,
    requests_total TEXT,
    errors_5xx_total TEXT,
    requests_delta TEXT,
    errors_5xx_delta TEXT,
    -- The prober's own errors this tick; empty when none.
    probe_error TEXT NOT NULL,
    classification TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (work_item, seq)
);

-- Alerts and rollbacks, recorded before they are posted; posted_at_ms is 0 until the alert
-- sink (the tracker) has accepted one.
CREATE TABLE alerts (
    work_item TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    posted_at_ms BIGINT NOT NULL,
    PRIMARY KEY (work_item, seq)
);

CREATE INDEX alerts_pending ON alerts (posted_at_ms, work_item);
