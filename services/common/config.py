"""Settings shared by every component, read from PIPELINE_* environment variables.

The same names are used by the native stack (.stack/env), compose and k8s. A missing or
bad setting stops the component at start with pydantic's message, which names it.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.identity import (
    DEFAULT_TRUST_DOMAIN,
    FileIdentity,
    IdentityError,
    IdentitySource,
    WorkloadApiIdentity,
    spiffe_id_of,
)
from services.common.kafka import KafkaClients


def describe_settings_error(error: ValidationError) -> str:
    """One line per bad setting, named as the variable to fix; the values given are left
    out, as they may be secrets (pydantic's own message repeats them)."""
    lines = []
    for e in error.errors(include_url=False, include_input=False):
        loc = [str(part) for part in e["loc"]]
        # A field read from a variable of another standard (SPIFFE_ENDPOINT_SOCKET) is named as it is.
        name = (
            ("_".join(loc) if loc[0].isupper() else "PIPELINE_" + "_".join(loc).upper())
            if loc
            else "settings"
        )
        lines.append(f"  {name}: {e['msg']}")
    return "\n".join(lines)


NO_IDENTITY_SOURCE = (
    "no identity source: set SPIFFE_ENDPOINT_SOCKET (the SPIRE agent's Workload API) "
    "or PIPELINE_IDENTITY_DIR (development CA files)"
)


class KafkaSettings(BaseSettings):
    """Where the broker is and who we are to it: what every Kafka client is built from."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore")

    kafka_bootstrap: str = Field(min_length=1, description="host:port[,host:port] of the SSL listener")
    identity: str = Field(min_length=1, description="this component's identity, e.g. service-ingester")
    trust_domain: str = Field(DEFAULT_TRUST_DOMAIN, pattern=r"^[a-z0-9._-]+$")
    # Where identities come from: the SPIFFE Workload API (the SPIRE agent's socket, under the
    # variable every SPIFFE library reads), else files from the development CA.
    spiffe_endpoint_socket: str | None = Field(
        None,
        validation_alias=AliasChoices("SPIFFE_ENDPOINT_SOCKET"),
        pattern=r"^unix://?/",
        description="the Workload API, e.g. unix:///run/spire/agent.sock",
    )
    identity_dir: Path | None = Field(
        None, validate_default=True, description="directory holding <name>/{svid,key,bundle}.pem"
    )

    @field_validator("identity_dir", mode="after")
    @classmethod
    def _one_identity_source(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # On a field (checked even when left out), so it is reported beside other bad settings.
        if value is None and not info.data.get("spiffe_endpoint_socket"):
            raise ValueError(NO_IDENTITY_SOURCE)
        return value

    def identity_source(self) -> IdentitySource:
        """This component's identity source (the Workload API is asked now: a missing
        registration entry fails here)."""
        if self.spiffe_endpoint_socket:
            return WorkloadApiIdentity(
                self.spiffe_endpoint_socket, spiffe_id_of(self.identity, self.trust_domain)
            )
        if self.identity_dir is not None:
            return FileIdentity(self.identity_dir, self.identity)
        raise IdentityError(NO_IDENTITY_SOURCE)

    def kafka_clients(self) -> KafkaClients:
        """Client profiles presenting this identity, as it is now (a tool's lifetime is short)."""
        source = self.identity_source()
        try:
            return KafkaClients(self.kafka_bootstrap, source.current())
        finally:
            source.close()


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
    # Traces (services/common/tracing.py): a producer's sampled flag is kept; of the traces a
    # stage starts, this share is sampled. Low by default: a sampled record costs a span.
    trace_sample_ratio: float = Field(0.01, ge=0, le=1, description="share of new traces sampled")
    # Where spans go over OTLP/HTTP, under the variables every OpenTelemetry SDK reads (the
    # exporter reads them itself; checked here so a bad one stops the service at start).
    # Neither set: spans are exported nowhere.
    otel_exporter_otlp_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT"), pattern=r"^https?://"
    )
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), pattern=r"^https?://"
    )

    @field_validator("pg_dsn")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// URL")
        return value
