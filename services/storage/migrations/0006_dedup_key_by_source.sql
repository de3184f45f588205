-- Dedup is keyed by (source, event_id): an event id is the source's own, so one source can
-- neither pre-claim another's ids nor have its events dropped as another's duplicates.
-- The raw position is within that source's topic, pipeline.raw.<source>. Rows from before
-- per-source topics have no source; they are dropped (the window is a day at most).
DELETE FROM ingest_dedup;
ALTER TABLE ingest_dedup ADD COLUMN source text NOT NULL;
ALTER TABLE ingest_dedup DROP CONSTRAINT ingest_dedup_pkey;
ALTER TABLE ingest_dedup ADD PRIMARY KEY (source, event_id);
