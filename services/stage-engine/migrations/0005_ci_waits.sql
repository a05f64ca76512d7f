-- Work items whose gate waits for CI (#18): the agent's job finished, its quality gate found
-- only `ci_green` pending, and the finish is applied once CI has decided (re-checked on
-- Gitea's `status` delivery for the repository and every ORCH_CI_POLL_S; the check reads the
-- PR head's status, so a status of another commit changes nothing). The job is not consumed
-- meanwhile.
CREATE TABLE ci_waits (
    work_item TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    agent TEXT NOT NULL,
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    dedupe_key TEXT NOT NULL,
    detail TEXT NOT NULL,
    since_ms BIGINT NOT NULL
);
CREATE INDEX ci_waits_repo ON ci_waits (repo);
