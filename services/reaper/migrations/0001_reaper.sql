-- Dead-pid streaks: one row per running job attempt whose process was last seen dead (or
-- whose launcher instance was gone). A job seen alive loses its row. Kept here, not in
-- memory, so that a reaper restart may delay a flip but never hasten one.
CREATE TABLE reaper_observations (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    dead_streak BIGINT NOT NULL,
    first_dead_at_ms BIGINT NOT NULL,
    last_dead_at_ms BIGINT NOT NULL,
    liveness TEXT NOT NULL,
    PRIMARY KEY (job_id, attempt)
);

-- One row per tick (pruned after a few days): what it saw and did.
CREATE TABLE reaper_ticks (
    id TEXT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    jobs_seen BIGINT NOT NULL,
    flips_dead_pid BIGINT NOT NULL,
    flips_exit_code BIGINT NOT NULL,
    flips_backstop BIGINT NOT NULL,
    flips_lost BIGINT NOT NULL,
    leases_reclaimed BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    error TEXT NOT NULL
);

CREATE INDEX reaper_ticks_by_time ON reaper_ticks (at_ms);

-- Running totals since the reaper's storage was created (one row, id = 1).
CREATE TABLE reaper_totals (
    id BIGINT PRIMARY KEY,
    ticks BIGINT NOT NULL,
    last_tick_at_ms BIGINT NOT NULL,
    last_tick_duration_ms BIGINT NOT NULL,
    last_jobs_seen BIGINT NOT NULL,
    flips_dead_pid BIGINT NOT NULL,
    flips_exit_code BIGINT NOT NULL,
    flips_backstop BIGINT NOT NULL,
    flips_lost BIGINT NOT NULL,
    leases_reclaimed BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    last_error TEXT NOT NULL
);
