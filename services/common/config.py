"""Settings shared by every component, read from PIPELINE_* environment variables.

The same names are used by the native stack (.stack/env), compose and k8s. A missing or
bad setting stops the component at start with pydantic's message, which names it.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.identity import X509Identity, load_identity


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore")

    kafka_bootstrap: str = Field(min_length=1, description="host:port[,host:port] of the SSL listener")
    identity_dir: Path = Field(description="directory holding <name>/{svid,key,bundle}.pem")
    identity: str = Field(min_length=1, description="this component's identity name, e.g. service-ingester")
    opa_url: str = Field(pattern=r"^https?://", description="base URL of the OPA server")

    def load_identity(self) -> X509Identity:
        return load_identity(self.identity_dir, self.identity)


class StageSettings(CommonSettings):
    """Settings of a Kafka-to-Kafka stage (ingester, processor)."""

    batch_size: int = Field(2000, ge=1, le=100_000, description="most records per batch/transaction")
    batch_timeout_ms: int = Field(100, ge=1, le=60_000, description="longest wait to fill a batch")
    http_host: str = "127.0.0.1"
    http_port: int = Field(0, ge=0, le=65535, description="/healthz /readyz /metrics; 0 picks a free port")
    instance_id: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9._-]+$")
    log_level: str = Field("INFO", pattern=r"^(?i:debug|info|warning|error)$")
    pg_dsn: str = Field(pattern=r"^postgres(ql)?://", description="PostgreSQL connection URL")
