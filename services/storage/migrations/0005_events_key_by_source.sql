-- Two sources may use the same event id for different events: key the system of record
-- by (source, id) so neither hides the other. The storage sink writes with
-- ON CONFLICT (source, id) DO NOTHING: the first copy of a (source, id) is the one kept.
-- Rebuilding the primary key reads the table once, under an exclusive lock.
ALTER TABLE events DROP CONSTRAINT events_pkey;
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (source, id);
-- Lookups by event id alone (operators, scripts/bench.py, tests) keep an index of their own.
CREATE INDEX events_id ON events (id);
