-- The PR a work item's branch is on (#17): as the launcher reported it in AdvanceStage (the
-- run that pushed opened or found it) or as a quality gate's forge lookup found it; 0 until
-- one is known. GetWorkItem/ListWorkItems show it, with its link (the dashboard's cards).
ALTER TABLE work_items ADD COLUMN pr_number BIGINT NOT NULL DEFAULT 0;
