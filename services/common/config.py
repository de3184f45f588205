"""Settings shared by every component, read from PIPELINE_* environment variables.

The same names are used by the native stack (.stack/env), compose and k8s. A missing or
bad setting stops the component at start with pydantic's message, which names it.
"""

from __future__ import annotations

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
