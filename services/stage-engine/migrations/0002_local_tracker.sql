-- The local tracker (orchestrator_tracker::local::LocalTracker): issues and comments kept
-- here for a user without Plane.
CREATE TABLE tracker_issues (
    issue_id TEXT PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    state_id TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE tracker_comments (
    id TEXT PRIMARY KEY,
    issue_id TEXT NOT NULL,
    author TEXT NOT NULL,
    html TEXT NOT NULL,
    -- An idempotency key: a repeated post with the same key adds nothing.
    external_id TEXT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX tracker_comments_issue ON tracker_comments (issue_id, id);
