"""The compose stack's one-shot setup (the `setup` service): what `make up` does natively
between starting the servers and starting the services, from the same definitions.

- PostgreSQL: the login roles (deploy/local/stack.py PG_LOGINS) and the database, then the
  migrations (services/storage/migrations, applied by the same function as natively).
- Kafka: every topic of services/common/topology.py, created as the admin identity.
- S3: the lake's bucket.
- Elasticsearch: the storage and operator users, with the roles of the native roles.yml.

Idempotent: run at every `docker compose up`. Passwords come from the environment
(deploy/compose/.env). Runs as spiffe://pipeline.local/admin/bootstrap (PIPELINE_IDENTITY).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TypeVar

import asyncpg
import boto3
import httpx
from botocore.exceptions import ClientError
from confluent_kafka.admin import AdminClient

from deploy.local.search_server import READER_USER, USERS, WRITER_USER
from deploy.local.stack import LAKE_BUCKET, PG_LOGINS, create_missing_topics
from services.common.config import KafkaSettings
from services.common.topology import all_topics
from services.storage.migrate import apply_migrations

T = TypeVar("T")
PG_HOST = "postgres:5432"
ES_URL = "https://elasticsearch:9200"
# The environment variable holding each PG_LOGINS role's password (.env.example).
PG_PASSWORD_VARS = {login: f"PG_{login.upper()}_PASSWORD" for login in PG_LOGINS}
ES_PASSWORD_VARS = {WRITER_USER: "ES_STORAGE_PASSWORD", READER_USER: "ES_OPERATOR_PASSWORD"}


def retry(what: str, attempt: Callable[[], T], timeout: float = 180.0) -> T:
    """Servers start in parallel with this: try until `attempt` succeeds or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except Exception as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"setup: {what} failed: {e}") from e
            print(f"setup: waiting for {what}: {e}", flush=True)
            time.sleep(2)


def dsn(user: str, password: str, database: str) -> str:
    return f"postgresql://{user}:{password}@{PG_HOST}/{database}"


async def prepare_database() -> list[str]:
    env = os.environ
    conn = await asyncpg.connect(dsn("postgres", env["POSTGRES_PASSWORD"], "postgres"))
    try:
        roles = {"pipeline": env["PG_PIPELINE_PASSWORD"]}
        roles |= {role: env[PG_PASSWORD_VARS[login]] for login, role in PG_LOGINS.items()}
        for role, password in roles.items():
            # Names are ours (PG_LOGINS); the password is quoted by the server's own function.
            quoted = await conn.fetchval("SELECT quote_literal($1)", password)
            verb = "ALTER" if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role) else "CREATE"
            await conn.execute(f"{verb} ROLE {role} LOGIN PASSWORD {quoted}")
        await conn.execute(f"GRANT pg_monitor TO {PG_LOGINS['monitor']}")
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'pipeline'"):
            await conn.execute("CREATE DATABASE pipeline OWNER pipeline")
    finally:
        await conn.close()
    return await apply_migrations(dsn("pipeline", env["PG_PIPELINE_PASSWORD"], "pipeline"))


def create_topics() -> list[str]:
    settings = KafkaSettings()  # PIPELINE_IDENTITY=admin-bootstrap, SPIFFE_ENDPOINT_SOCKET
    return create_missing_topics(AdminClient(settings.kafka_clients().config()), all_topics())


def ensure_bucket() -> bool:
    s3 = boto3.client(
        "s3",
        endpoint_url="http://s3:9000",
        aws_access_key_id=os.environ["S3_ACCESS_KEY"],
        aws_secret_access_key=os.environ["S3_SECRET_KEY"],
        region_name="us-east-1",
    )
    try:
        s3.head_bucket(Bucket=LAKE_BUCKET)
        return False
    except ClientError:
        s3.create_bucket(Bucket=LAKE_BUCKET)
        return True


def ensure_search_users() -> None:
    # Verified with the trust bundle: Elasticsearch serves its SVID (search/elasticsearch).
    bundle = KafkaSettings().identity_source().current().ssl_context()
    auth = ("elastic", os.environ["ELASTIC_PASSWORD"])
    with httpx.Client(base_url=ES_URL, verify=bundle, auth=auth, timeout=10) as es:
        for user, variable in ES_PASSWORD_VARS.items():
            body = {"password": os.environ[variable], "roles": [USERS[user]]}
            es.put(f"/_security/user/{user}", json=body).raise_for_status()


def main() -> None:
    applied = retry("PostgreSQL", lambda: asyncio.run(prepare_database()))
    print(f"setup: postgres ready, migrations applied now: {applied or 'none'}", flush=True)
    created = retry("Kafka (as admin-bootstrap)", create_topics)
    print(f"setup: kafka topics created now: {created or 'none'}", flush=True)
    print(f"setup: s3 bucket {LAKE_BUCKET} {'created' if retry('S3', ensure_bucket) else 'exists'}", flush=True)
    retry("Elasticsearch", ensure_search_users)
    print(f"setup: elasticsearch users {', '.join(ES_PASSWORD_VARS)} set", flush=True)


if __name__ == "__main__":
    main()
