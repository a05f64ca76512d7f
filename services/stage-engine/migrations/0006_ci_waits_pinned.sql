-- The merge is pinned to the head CI passed (#18): a wait at deploy keeps what the deployer's
-- run delivered (its PR and head), so the re-check reads the status of that head and the
-- deploy-finalizer it enqueues merges exactly that head. 0 / '': not said (review's waits,
-- the watchdog's path), and the PR's head as the forge has it is read.
ALTER TABLE ci_waits ADD COLUMN pr_number BIGINT NOT NULL DEFAULT 0;
ALTER TABLE ci_waits ADD COLUMN head_sha TEXT NOT NULL DEFAULT '';
