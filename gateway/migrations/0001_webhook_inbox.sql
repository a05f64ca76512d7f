-- The durable inbox: every verified webhook delivery, written before the gateway answers
-- 2xx. One SQL text for SQLite and PostgreSQL: ids as TEXT, times as epoch milliseconds.
--
-- id            a UUIDv7: sorts in arrival order (the dispatcher's order per ordering_key)
-- delivery_id   X-Plane-Delivery / X-Gitea-Delivery; a redelivery with the same id is a no-op
-- body_sha256   hex SHA-256 of the raw body; Plane gives each send attempt a NEW delivery
--               id, so a resend of the same bytes is recognised by its body instead
-- state         pending (to apply) | applied | ignored (nothing to do) | dead (dead letter)
-- command       the stage-engine call as JSON (NULL when ignored)
-- ordering_key  the work item a delivery concerns: applied in arrival order per key
-- work_item     the work item key stage-engine answered with ('' until known): a Plane
--               comment names only the Plane issue, while Approve needs the key
-- next_attempt_at_ms  when a pending delivery is due; a claim pushes it out by a lease
CREATE TABLE webhook_inbox (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    event TEXT NOT NULL,
    action TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    command TEXT,
    ordering_key TEXT NOT NULL,
    work_item TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_attempt_at_ms BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT NOT NULL,
    UNIQUE (source, delivery_id),
    UNIQUE (source, body_sha256)
);

CREATE INDEX webhook_inbox_due ON webhook_inbox (state, next_attempt_at_ms, id);
CREATE INDEX webhook_inbox_by_key ON webhook_inbox (ordering_key, state, id);
-- GET /queue and /metrics: counts by state and the oldest pending delivery, read from
-- this small index alone (never by visiting the rows and their bodies).
CREATE INDEX webhook_inbox_by_state ON webhook_inbox (state, received_at_ms);

