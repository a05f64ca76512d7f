-- The fake launcher's jobs: just what the guarded terminal flip needs, on the same backends
-- as the real launcher.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    attempt BIGINT NOT NULL,
    status TEXT NOT NULL,
    kind TEXT NOT NULL,
    work_item TEXT NOT NULL,
    agent TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    instance_id TEXT NOT NULL,
    pid BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    exit_code TEXT NOT NULL,
    killed BIGINT NOT NULL,
    finished_by TEXT NOT NULL
);
