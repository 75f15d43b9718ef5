-- The order in which runs were journaled (1, 2, ...): listings, "the newest run" and "a later
-- restore" go by it, never by created_at, which is one coordinator's wall clock (another
-- coordinator, or the same one after its clock was corrected, may disagree). Runs journaled
-- before it are numbered by created_at, then id.
ALTER TABLE runs ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
UPDATE runs SET seq = (
    SELECT count(*) FROM runs r2
    WHERE r2.created_at < runs.created_at
       OR (r2.created_at = runs.created_at AND r2.id <= runs.id)
);
CREATE INDEX runs_by_seq ON runs (seq);
