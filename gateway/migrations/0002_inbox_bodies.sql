-- The raw bodies move out of webhook_inbox into a table of their own: written once with
-- the delivery, read by no hot path (they are kept for the operator). A delivery's row
-- shrinks from ~2.5 kB, one row per 4 KiB SQLite page, to a few hundred bytes; the
-- dispatcher's claim and outcome, which rewrite the row, then rewrite a share of a page
-- instead of a whole page per delivery (and the WAL and its checkpoints shrink with it).
--
-- Keyed like the inbox's deduplication by body: one body per (source, body_sha256), the
-- same key as its webhook_inbox row. Deleted with that row (retention).
CREATE TABLE webhook_inbox_bodies (
    source TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (source, body_sha256)
);

INSERT INTO webhook_inbox_bodies (source, body_sha256, body)
    SELECT source, body_sha256, body FROM webhook_inbox;

ALTER TABLE webhook_inbox DROP COLUMN body;
