-- Users the processor enriches events with (issue: ingest and process).
CREATE TABLE users (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    tier       text NOT NULL DEFAULT 'free',
    is_test    boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
