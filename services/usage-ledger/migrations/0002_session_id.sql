-- The CLI session each run was (the result's `session_id`), so that a retry of the same
-- agent on the same stage can resume it (`--resume`, issue #15). NULL: the output carried
-- none (another agent command, or no result).
ALTER TABLE agent_runs ADD COLUMN session_id TEXT;

CREATE INDEX agent_runs_by_session ON agent_runs (session_id);
