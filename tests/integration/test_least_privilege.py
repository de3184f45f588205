"""Least privilege in the database and in the services' environments.

Each service logs in to PostgreSQL as a role of its own that may do what the service does
and nothing else (services/storage/migrations/0007_service_roles.sql); operators read;
PUBLIC gets nothing. Each service process holds only its own secrets.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import asyncpg
import pytest

from deploy.local.components import PostgresServer
from deploy.local.stack import PG_LOGINS, SERVICES, Stack
from services.cli.status.probes import probe_postgres
from services.common.avro import micros
from services.ingester.dedup import Dedup, Seen
from services.processor.enrichment import UserDirectory
from services.storage.sinks.base import StoredEvent
from services.storage.sinks.postgres import PostgresSink
from tests.unit.test_stack_secrets import secrets_in

T = TypeVar("T")

# Every table and who may do what with it, besides the owner. A table missing here fails
# test_grants_are_exactly_the_matrix: a new table needs its grants in its migration and here.
TABLE_GRANTS: dict[str, dict[str, set[str]]] = {
    "ingest_dedup": {"pipeline_ingester": {"SELECT", "INSERT", "UPDATE", "DELETE"}, "pipeline_operator": {"SELECT"}},
    "users": {"pipeline_processor": {"SELECT"}, "pipeline_operator": {"SELECT"}},
    "events": {"pipeline_storage": {"SELECT", "INSERT"}, "pipeline_operator": {"SELECT"}},
    "schema_migrations": {"pipeline_operator": {"SELECT"}},
}  # fmt: skip
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
DATABASE_GRANTS = {
    "pipeline_ingester": {"CONNECT"},
    "pipeline_processor": {"CONNECT"},
    "pipeline_storage": {"CONNECT", "TEMPORARY"},
    "pipeline_operator": {"CONNECT"},
    # The PostgreSQL exporter reads the server's statistics from database `postgres`.
    "pipeline_monitor": set(),
}
GRANTEES = (*PG_LOGINS.values(), "public")  # `public`: PUBLIC, i.e. any role of the server


def run_as(stack: Stack, login: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def connected() -> T:
        conn = await asyncpg.connect(stack.pg_login_dsn(login))
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(connected())


def as_owner(stack: Stack, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def connected() -> T:
        conn = await asyncpg.connect(stack.pg_dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(connected())


def test_grants_are_exactly_the_matrix(stack: Stack) -> None:
    async def read(conn: asyncpg.Connection) -> tuple[dict, dict, dict, list]:
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        table_grants = {
            (table, grantee): {
                p for p in TABLE_PRIVILEGES
                if await conn.fetchval("SELECT has_table_privilege($1, format('public.%I', $2::text), $3)", grantee, table, p)
            }
            for table in tables
            for grantee in GRANTEES
        }  # fmt: skip
        database = {
            grantee: {
                p for p in ("CONNECT", "TEMPORARY", "CREATE")
                if await conn.fetchval("SELECT has_database_privilege($1, current_database(), $2)", grantee, p)
            }
            for grantee in GRANTEES
        }  # fmt: skip
        create_in_public = {
            grantee: await conn.fetchval("SELECT has_schema_privilege($1, 'public', 'CREATE')", grantee)
            for grantee in GRANTEES
        }
        # Nothing that would let a login role around its grants.
        attributes = await conn.fetch(
            "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls,"
            " pg_has_role(rolname, 'pipeline', 'MEMBER') AS owner_member"
            " FROM pg_roles WHERE rolname = ANY($1::text[])",
            list(PG_LOGINS.values()),
        )
        return table_grants, database, create_in_public, attributes

    table_grants, database, create_in_public, attributes = as_owner(stack, read)
    tables = {table for table, _ in table_grants}
    assert tables == set(TABLE_GRANTS), "a table without its grants (migration and TABLE_GRANTS)"
    for (table, grantee), privileges in table_grants.items():
        assert privileges == TABLE_GRANTS[table].get(grantee, set()), (table, grantee)
    assert database == {**DATABASE_GRANTS, "public": set()}
    assert not any(create_in_public.values()), create_in_public
    assert len(attributes) == len(PG_LOGINS)
    for role in attributes:
        assert not any(
            role[k] for k in ("rolsuper", "rolcreaterole", "rolcreatedb", "rolbypassrls", "owner_member")
        ), dict(role)


NOT_STORAGE = [login for login in PG_LOGINS if login != "storage"]
REFUSED = [
    ("ingester", "SELECT count(*) FROM events"),
    ("ingester", "SELECT count(*) FROM users"),
    ("processor", "UPDATE users SET tier = 'enterprise' WHERE id = 'u00001'"),
    ("processor", "INSERT INTO users (id, name) VALUES ('least-privilege', 'x')"),
    ("processor", "INSERT INTO events (id) VALUES ('least-privilege')"),
    ("processor", "SELECT count(*) FROM ingest_dedup"),
    ("storage", "SELECT count(*) FROM ingest_dedup"),
    ("storage", "SELECT count(*) FROM users"),
    ("storage", "UPDATE users SET tier = 'enterprise' WHERE id = 'u00001'"),
    ("storage", "UPDATE events SET type = 'rewritten' WHERE id = 'least-privilege'"),
    ("storage", "DELETE FROM events WHERE id = 'least-privilege'"),
    ("operator", "INSERT INTO users (id, name) VALUES ('least-privilege', 'x')"),
    ("operator", "UPDATE events SET type = 'rewritten' WHERE id = 'least-privilege'"),
    ("operator", "DELETE FROM ingest_dedup WHERE event_id = 'least-privilege'"),
    ("operator", "TRUNCATE events"),
    ("operator", "INSERT INTO schema_migrations (version) VALUES ('9999_least_privilege')"),
    *((login, "CREATE TABLE least_privilege (x int)") for login in PG_LOGINS),
    *((login, "CREATE TEMP TABLE least_privilege (x int)") for login in NOT_STORAGE),
]


@pytest.mark.parametrize(("login", "statement"), REFUSED, ids=[f"{login}: {sql}" for login, sql in REFUSED])
def test_each_role_is_refused_what_it_must_not_do(stack: Stack, login: str, statement: str) -> None:
    async def attempt(conn: asyncpg.Connection) -> None:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(statement)
        finally:
            await transaction.rollback()  # were it allowed, it leaves nothing behind

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        run_as(stack, login, attempt)


def test_a_role_without_grants_cannot_connect(stack: Stack) -> None:
    """PUBLIC's default CONNECT is revoked: a role of the same server, made for something
    else, does not reach the pipeline's database."""
    superuser = stack.postgres.dsn(PostgresServer.SUPERUSER, stack.state.pg_superuser_password, "postgres")
    role, password = f"least_privilege_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)

    async def scenario() -> None:
        admin = await asyncpg.connect(superuser)
        try:
            await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for database"):
                await asyncpg.connect(stack.postgres.dsn(role, password, "pipeline"))
        finally:
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
            await admin.close()

    asyncio.run(scenario())


# What each role may do, through the services' own code, so the grants are known to be
# enough for what the services really run.


def test_ingester_claims_and_expires_dedup_ids(stack: Stack) -> None:
    event_id = f"least-privilege-{uuid.uuid4()}"

    async def scenario() -> tuple[list[Seen], list[Seen], int]:
        dedup = Dedup(stack.pg_login_dsn("ingester"), timedelta(hours=1))
        try:
            first = await dedup.classify([("web", event_id, 0, 1)])
            again = await dedup.classify([("web", event_id, 0, 1), ("web", event_id, 2, 7)])
            return first, again, await dedup.expire()
        finally:
            await dedup.close()

    first, again, expired = asyncio.run(scenario())
    assert first == [Seen.NEW]
    assert again == [Seen.REPLAY, Seen.DUPLICATE]
    assert expired >= 0


def test_processor_reads_users(stack: Stack) -> None:
    async def scenario() -> dict:
        users = UserDirectory(stack.pg_login_dsn("processor"))
        try:
            return await users.lookup({"u00001", "least-privilege-nobody"})
        finally:
            await users.close()

    found = asyncio.run(scenario())
    assert found["u00001"].known and found["u00001"].name == "Sample User 1"
    assert not found["least-privilege-nobody"].known


def test_storage_writes_events(stack: Stack) -> None:
    event_id = f"least-privilege-{uuid.uuid4()}"
    now = micros(datetime.now(UTC))
    record = {
        "id": event_id, "type": "signup", "timestamp": now, "user_id": "u00001", "user_name": None,
        "user_tier": "free", "user_known": True, "properties": "{}", "source": "web",
        "day_of_week": "Thursday", "hour": 14, "version": 1, "received_at": now, "ingested_at": now,
        "processed_at": now,
    }  # fmt: skip
    event = StoredEvent(SimpleNamespace(), record)  # type: ignore[arg-type]  # the sink reads the record only

    async def scenario() -> list:
        sink = PostgresSink(stack.pg_login_dsn("storage"))
        try:
            # The second write of the same event takes the ON CONFLICT path.
            return [await sink.write([event]), await sink.write([event])]
        finally:
            await sink.close()

    assert asyncio.run(scenario()) == [[], []]
    stored = as_owner(
        stack, lambda conn: conn.fetchval("SELECT count(*) FROM events WHERE id = $1", event_id)
    )
    assert stored == 1


def test_operator_reads_every_table_and_pipectl_status_counts_events(stack: Stack) -> None:
    async def read_all(conn: asyncpg.Connection) -> list[int]:
        return [await conn.fetchval(f"SELECT count(*) FROM {table}") for table in TABLE_GRANTS]

    assert all(n >= 0 for n in run_as(stack, "operator", read_all))
    check, rows = asyncio.run(probe_postgres(stack.env()["PIPELINE_PG_DSN"]))
    assert check.ok, check
    assert rows.count is not None and rows.error is None, rows


def test_each_service_process_holds_only_its_own_secrets(stack: Stack) -> None:
    """Read from the running processes themselves: what the stack gave them and anything
    they might have inherited."""
    for service in SERVICES:
        state = stack.services[service].supervisor_state()
        assert state and state["pid"], f"{service} not running"
        environ = dict(
            entry.split("=", 1)
            for entry in Path(f"/proc/{state['pid']}/environ").read_text().split("\0")
            if "=" in entry
        )
        assert environ["PIPELINE_PG_DSN"] == stack.pg_login_dsn(service)
        lake = {"s3_access_key", "s3_secret_key"} if service == "storage" else set()
        assert secrets_in(stack, environ) == {f"pg_login:{service}", *lake}, service
