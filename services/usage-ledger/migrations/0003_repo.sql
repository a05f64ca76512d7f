-- The job's repository of each run (issue #18), so that a per-repository spending ceiling
-- sums one repository's runs without asking anyone which work items are whose. '' for the
-- runs recorded before: they count toward the global ceilings only.
ALTER TABLE agent_runs ADD COLUMN repo TEXT NOT NULL DEFAULT '';

-- The ceilings sum the runs of a day or a month, before every LLM launch.
CREATE INDEX agent_runs_by_time ON agent_runs (recorded_at_ms);
