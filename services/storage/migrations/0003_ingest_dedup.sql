-- Where each event id was first seen on pipeline.raw, for the ingester's dedup window.
-- Keeping the position (not just the id) lets a re-read of the same record after a crash
-- be told apart from a real duplicate sent again by a source.
CREATE TABLE ingest_dedup (
    event_id      text PRIMARY KEY,
    raw_partition integer NOT NULL,
    raw_offset    bigint NOT NULL,
    first_seen    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ingest_dedup_first_seen ON ingest_dedup (first_seen);
