"""The compose stack's one-shot setup (the `setup` service): what `make up` does natively
between starting the servers and starting the services, from the same definitions.

- PostgreSQL: the login roles (deploy/local/stack.py PG_LOGINS) and the database, then the
  migrations (services/storage/migrations, applied by the same function as natively).
- Kafka: every topic of services/common/topology.py, created as the admin identity.
- S3: the lake's bucket.
- Elasticsearch: the storage and operator users, with the roles of the native roles.yml.

Idempotent: run at every `docker compose up`, and as the Kubernetes Job `pipeline-setup`
(deploy/k8s/base/setup.yaml). Everything it reads is a setting of `SetupSettings`: where the
servers are (PIPELINE_*) and the passwords (under the names of deploy/compose/.env.example,
from .env in compose and from Secrets on Kubernetes). A missing, empty or placeholder value
stops it before it connects to anything, naming each. Runs as
spiffe://pipeline.local/admin/bootstrap (PIPELINE_IDENTITY).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import quote

import asyncpg
import boto3
import httpx
from botocore.exceptions import ClientError
from confluent_kafka.admin import AdminClient
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator

from deploy.local.search_server import READER_USER, USERS, WRITER_USER
from deploy.local.stack import LAKE_BUCKET, PG_LOGINS, create_missing_topics
from services.common.config import KafkaSettings, describe_settings_error
from services.common.topology import all_topics
from services.storage.migrate import apply_migrations

T = TypeVar("T")
# What deploy/compose/.env.example holds until someone replaces it: refused as a secret, so
# a copied-but-unedited .env stops the run instead of starting stores with known passwords.
PLACEHOLDER = "change-me"


def _secret(variable: str, what: str) -> SecretStr:
    # Under the variable's own name (not PIPELINE_*): the names of .env.example, which the
    # stores' containers read too (POSTGRES_PASSWORD, ELASTIC_PASSWORD, ...).
    return Field(validation_alias=AliasChoices(variable), description=what)


class SetupSettings(KafkaSettings):
    """What setup reads: the broker and its identity (KafkaSettings), the stores' addresses
    and every password it sets or logs in with. Nothing has a default that names a host:
    compose and Kubernetes each say where their servers are."""

    pg_address: str = Field(
        pattern=r"^[A-Za-z0-9.-]+:[0-9]+$",
        description="host:port of the PostgreSQL server, e.g. postgres:5432",
    )
    s3_endpoint: str = Field(pattern=r"^https?://", description="the S3 server, e.g. http://s3:9000")
    # HTTPS only: the elastic superuser's password goes with every request.
    es_url: str = Field(pattern=r"^https://", description="Elasticsearch, e.g. https://elasticsearch:9200")
    postgres_password: SecretStr = _secret("POSTGRES_PASSWORD", "the server's superuser `postgres`")
    pg_pipeline_password: SecretStr = _secret("PG_PIPELINE_PASSWORD", "role pipeline: owns the database")
    # One per PG_LOGINS role (deploy/local/stack.py), named PG_<LOGIN>_PASSWORD: role_passwords().
    pg_ingester_password: SecretStr = _secret("PG_INGESTER_PASSWORD", "role pipeline_ingester")
    pg_processor_password: SecretStr = _secret("PG_PROCESSOR_PASSWORD", "role pipeline_processor")
    pg_storage_password: SecretStr = _secret("PG_STORAGE_PASSWORD", "role pipeline_storage")
    pg_operator_password: SecretStr = _secret("PG_OPERATOR_PASSWORD", "role pipeline_operator")
    pg_monitor_password: SecretStr = _secret("PG_MONITOR_PASSWORD", "role pipeline_monitor")
    s3_access_key: SecretStr = _secret("S3_ACCESS_KEY", "the S3 server's access key")
    s3_secret_key: SecretStr = _secret("S3_SECRET_KEY", "the S3 server's secret key")
    elastic_password: SecretStr = _secret("ELASTIC_PASSWORD", "Elasticsearch's superuser `elastic`")
    es_storage_password: SecretStr = _secret("ES_STORAGE_PASSWORD", f"search user {WRITER_USER}")
    es_operator_password: SecretStr = _secret("ES_OPERATOR_PASSWORD", f"search user {READER_USER}")
    # Not used by setup, only checked: Grafana starts after setup (compose.yaml), so its
    # admin password is refused here too while it is the placeholder. Kubernetes runs no Grafana.
    grafana_admin_password: SecretStr | None = Field(
        None, validation_alias=AliasChoices("GRAFANA_ADMIN_PASSWORD"), description="checked only"
    )

    @field_validator("*", mode="after")
    @classmethod
    def _no_placeholder(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            if not secret.strip():
                raise ValueError("is empty")
            if PLACEHOLDER in secret.lower():
                raise ValueError(f"is still the placeholder of .env.example ({PLACEHOLDER!r}): replace it")
        return value

    def role_passwords(self) -> dict[str, str]:
        """Each database role setup makes -> its password: the owner, then PG_LOGINS's."""
        roles = {"pipeline": self.pg_pipeline_password.get_secret_value()}
        for login, role in PG_LOGINS.items():
            roles[role] = getattr(self, f"pg_{login}_password").get_secret_value()
        return roles

    def search_passwords(self) -> dict[str, str]:
        """Each search user setup makes -> its password."""
        return {
            WRITER_USER: self.es_storage_password.get_secret_value(),
            READER_USER: self.es_operator_password.get_secret_value(),
        }


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


def dsn(settings: SetupSettings, user: str, password: str, database: str) -> str:
    # Quoted: a generated password may hold '@', ':' or '/' (asyncpg unquotes it).
    return f"postgresql://{user}:{quote(password, safe='')}@{settings.pg_address}/{database}"


async def prepare_database(settings: SetupSettings) -> list[str]:
    superuser = settings.postgres_password.get_secret_value()
    conn = await asyncpg.connect(dsn(settings, "postgres", superuser, "postgres"))
    try:
        for role, password in settings.role_passwords().items():
            # Names are ours (PG_LOGINS); the password is quoted by the server's own function.
            quoted = await conn.fetchval("SELECT quote_literal($1)", password)
            verb = (
                "ALTER"
                if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
                else "CREATE"
            )
            await conn.execute(f"{verb} ROLE {role} LOGIN PASSWORD {quoted}")
        await conn.execute(f"GRANT pg_monitor TO {PG_LOGINS['monitor']}")
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'pipeline'"):
            await conn.execute("CREATE DATABASE pipeline OWNER pipeline")
    finally:
        await conn.close()
    owner = settings.pg_pipeline_password.get_secret_value()
    return await apply_migrations(dsn(settings, "pipeline", owner, "pipeline"))


def create_topics(settings: KafkaSettings) -> list[str]:
    # As PIPELINE_IDENTITY (admin-bootstrap), from SPIFFE_ENDPOINT_SOCKET.
    return create_missing_topics(AdminClient(settings.kafka_clients().config()), all_topics())


def ensure_bucket(settings: SetupSettings) -> bool:
    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key.get_secret_value(),
        aws_secret_access_key=settings.s3_secret_key.get_secret_value(),
        region_name="us-east-1",
    )
    try:
        s3.head_bucket(Bucket=LAKE_BUCKET)
        return False
    except ClientError:
        s3.create_bucket(Bucket=LAKE_BUCKET)
        return True


def ensure_search_users(settings: SetupSettings) -> None:
    # Verified with the trust bundle: Elasticsearch serves its SVID (search/elasticsearch).
    bundle = settings.identity_source().current().ssl_context()
    auth = ("elastic", settings.elastic_password.get_secret_value())
    with httpx.Client(base_url=settings.es_url, verify=bundle, auth=auth, timeout=10) as es:
        for user, password in settings.search_passwords().items():
            body = {"password": password, "roles": [USERS[user]]}
            es.put(f"/_security/user/{user}", json=body).raise_for_status()


def load_settings() -> SetupSettings:
    """The settings, or an exit naming every missing, empty or placeholder one (exit 2, as
    the services stop on a bad setting), before any server is contacted."""
    try:
        return SetupSettings()
    except ValidationError as e:
        print(f"setup: cannot start, bad configuration:\n{describe_settings_error(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    settings = load_settings()
    applied = retry("PostgreSQL", lambda: asyncio.run(prepare_database(settings)))
    print(f"setup: postgres ready, migrations applied now: {applied or 'none'}", flush=True)
    created = retry("Kafka (as admin-bootstrap)", lambda: create_topics(settings))
    print(f"setup: kafka topics created now: {created or 'none'}", flush=True)
    made = retry("S3", lambda: ensure_bucket(settings))
    print(f"setup: s3 bucket {LAKE_BUCKET} {'created' if made else 'exists'}", flush=True)
    retry("Elasticsearch", lambda: ensure_search_users(settings))
    print(f"setup: elasticsearch users {', '.join(settings.search_passwords())} set", flush=True)


if __name__ == "__main__":
    main()
