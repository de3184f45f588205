"""Settings shared by every component, read from PIPELINE_* environment variables.

The same names are used by the native stack (.stack/env), compose and k8s. A missing or
bad setting stops the component at start with pydantic's message, which names it.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.identity import X509Identity, load_identity
from services.common.kafka import KafkaClients
from services.common.opa import OpaClient


def describe_settings_error(error: ValidationError) -> str:
    """One line per bad setting, named as the variable to fix; the values given are left
    out, as they may be secrets (pydantic's own message repeats them)."""
    lines = []
    for e in error.errors(include_url=False, include_input=False):
        name = "PIPELINE_" + "_".join(str(part) for part in e["loc"]).upper() if e["loc"] else "settings"
        lines.append(f"  {name}: {e['msg']}")
    return "\n".join(lines)


class KafkaSettings(BaseSettings):
    """Where the broker is and who we are to it: what every Kafka client is built from."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore")

    kafka_bootstrap: str = Field(min_length=1, description="host:port[,host:port] of the SSL listener")
    identity_dir: Path = Field(description="directory holding <name>/{svid,key,bundle}.pem")
    identity: str = Field(min_length=1, description="this component's identity name, e.g. service-ingester")

    def load_identity(self) -> X509Identity:
        return load_identity(self.identity_dir, self.identity)

    def kafka_clients(self) -> KafkaClients:
        """Client profiles presenting this identity (loaded now: a bad one fails here)."""
        return KafkaClients(self.kafka_bootstrap, self.load_identity())


class StageSettings(KafkaSettings):
    """Settings of a service: a Kafka-to-Kafka stage (ingester, processor) or storage."""

    opa_url: str = Field(pattern=r"^https://", description="base URL of the OPA server (mutual TLS only)")
    batch_size: int = Field(2000, ge=1, le=100_000, description="most records per batch/transaction")
    batch_timeout_ms: int = Field(100, ge=1, le=60_000, description="longest wait to fill a batch")
    http_host: str = "127.0.0.1"
    http_port: int = Field(0, ge=0, le=65535, description="/healthz /readyz /metrics; 0 picks a free port")
    instance_id: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9._-]+$")
    log_level: str = Field("INFO", pattern=r"^(?i:debug|info|warning|error)$")
    # Secrets are SecretStr: never echoed in a settings error, a log line or a repr.
    pg_dsn: SecretStr = Field(description="PostgreSQL connection URL (postgresql://...)")

    def opa_client(self) -> OpaClient:
        """An OPA client presenting this component's identity."""
        return OpaClient(self.opa_url, self.load_identity())

    @field_validator("pg_dsn")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// URL")
        return value
