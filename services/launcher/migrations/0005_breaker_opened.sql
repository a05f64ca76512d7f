-- When the breaker left `closed` and which job's outcome opened it (#18): an opening that
-- lasts longer than ORCH_NOTIFY_BREAKER_OPEN_S (half-open probes included) is told to
-- people once — `open_told` is that once, taken by one replica — on that job's work item.
-- All three go back to their defaults when the breaker closes.
ALTER TABLE breaker ADD COLUMN opened_at_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE breaker ADD COLUMN opened_work_item TEXT NOT NULL DEFAULT '';
ALTER TABLE breaker ADD COLUMN open_told BIGINT NOT NULL DEFAULT 0;
