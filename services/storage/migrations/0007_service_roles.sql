-- Least privilege per service: each service logs in as a role of its own that can do what
-- that service does and nothing else; operators read. The owner, `pipeline`, keeps the
-- schema and runs the migrations; nothing else connects as it.
--
-- The login roles are the deployment's to create, with their passwords, before this runs
-- (deploy/local/stack.py does): pipeline_ingester, pipeline_processor, pipeline_storage,
-- pipeline_operator. A missing one fails this migration by name.
--
-- Grants are explicit, per table: a table created by a later migration is the owner's
-- alone until that migration grants it to who needs it (pipeline_operator reads every
-- table). tests/integration/test_least_privilege.py holds the whole matrix and fails on a table
-- it does not know.

-- PUBLIC (every role of the server, present and future) may by default connect to a
-- database and create temporary tables in it: only our roles may. Superusers and the
-- owner keep their access.
DO $$
BEGIN
    EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format(
        'GRANT CONNECT ON DATABASE %I'
        ' TO pipeline_ingester, pipeline_processor, pipeline_storage, pipeline_operator',
        current_database()
    );
    -- The postgres sink COPYs each batch into a temporary staging table.
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO pipeline_storage', current_database());
END
$$;
-- PostgreSQL 15 no longer grants this by default; a database made by an older one does.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- The ingester's dedup window: INSERT ... ON CONFLICT DO UPDATE claims ids (and reads the
-- earlier claim), DELETE expires them.
GRANT SELECT, INSERT, UPDATE, DELETE ON ingest_dedup TO pipeline_ingester;

-- The processor enriches from the user directory: read only.
GRANT SELECT ON users TO pipeline_processor;

-- Storage writes the system of record and never changes a stored event (no UPDATE or
-- DELETE). SELECT as well: its staging table is made LIKE events, and ON CONFLICT
-- (source, id) reads the key; PostgreSQL requires SELECT for both.
GRANT SELECT, INSERT ON events TO pipeline_storage;

-- Operators (pipectl status, psql) read everything and write nothing.
GRANT SELECT ON users, ingest_dedup, events, schema_migrations TO pipeline_operator;
