-- The end of a run, durable (issue #20): the run's effects on its peers (RecordRun, the
-- finish comment, AdvanceStage or ReportJobFailed, the launcher's comments), written in the
-- transaction of the job's guarded terminal flip and delivered by the kit's one outbox
-- dispatcher (crates/kit/src/outbox.rs) for as long as the peer is down. The same columns
-- as stage-engine's outbox.
CREATE TABLE outbox (
    id TEXT PRIMARY KEY,
    -- The work item: entries of one work item and channel go out in order.
    work_item TEXT NOT NULL,
    -- run: a run's effects go out in the order they were written
    channel TEXT NOT NULL,
    -- record_run | finish_comment | comment | advance_stage | report_job_failed
    kind TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    -- Unique when set: a second write of the same effect adds nothing.
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
