-- Who holds a delivering entry's claim, so that a restarted stage-engine takes back what it
-- was delivering when it died instead of waiting for the claim to lapse.
ALTER TABLE outbox ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
