-- The agent's profile in force for the job's latest run (JSON: tools, model, turns, timeout,
-- budget, network, and whether its sandbox was on), shown by GetJob.
ALTER TABLE jobs ADD COLUMN profile_json TEXT NOT NULL DEFAULT '';
