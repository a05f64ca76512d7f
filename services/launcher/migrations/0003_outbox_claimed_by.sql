-- Who holds a delivering entry's claim (a launcher instance id), so that a restarted replica
-- takes back what it was delivering when it died; other replicas' claims stay theirs.
ALTER TABLE outbox ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
