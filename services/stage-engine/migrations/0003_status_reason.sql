-- Why a work item is blocked or cancelled, and the next step ('' otherwise): a failed
-- job's reason (ReportJobFailed), a spent budget, or who cancelled it. Status `cancelled`
-- is new too (terminal, like done); `status` is TEXT, so it needs no change here.
ALTER TABLE work_items ADD COLUMN status_reason TEXT NOT NULL DEFAULT '';
