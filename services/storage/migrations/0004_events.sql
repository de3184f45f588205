-- The system of record: one row per processed event, written idempotently by event id.
-- Not time-partitioned: a partitioned table's primary key must include the partition
-- column, which would let the same event id exist twice; dedup by id matters more here.
CREATE TABLE events (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    "timestamp"  timestamptz NOT NULL,
    user_id      text NOT NULL,
    user_name    text,
    user_tier    text NOT NULL,
    user_known   boolean NOT NULL,
    properties   jsonb NOT NULL,
    source       text NOT NULL,
    day_of_week  text NOT NULL,
    hour         smallint NOT NULL,
    version      integer NOT NULL,
    received_at  timestamptz NOT NULL,
    ingested_at  timestamptz NOT NULL,
    processed_at timestamptz NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_user_time ON events (user_id, "timestamp");
CREATE INDEX events_type_time ON events (type, "timestamp");
