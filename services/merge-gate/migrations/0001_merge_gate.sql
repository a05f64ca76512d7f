-- One holder per repo. A lease is stale once acquired_at_ms + ttl_s * 1000 has passed, or
-- when its holder is judged dead; lease_id names one acquisition so that a takeover or a
-- reclaim changes exactly the lease it judged (compare-and-swap).
CREATE TABLE merge_leases (
    repo TEXT PRIMARY KEY,
    lease_id TEXT NOT NULL,
    holder_job_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    pid BIGINT NOT NULL,
    acquired_at_ms BIGINT NOT NULL,
    ttl_s BIGINT NOT NULL
);

-- One row per pull request that FinalizeMerge was asked to merge. state: pending | merging
-- | merged | refused. A 'merging' row is claimed by one call (claim_id) until
-- claim_until_ms, so that two merge-gate replicas never merge the same PR at once.
CREATE TABLE merges (
    repo TEXT NOT NULL,
    pr_number BIGINT NOT NULL,
    work_item TEXT NOT NULL,
    tested_head_sha TEXT NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT NOT NULL,
    merge_sha TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    claim_id TEXT NOT NULL,
    claim_until_ms BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (repo, pr_number)
);

CREATE INDEX merges_by_update ON merges (updated_at_ms);
