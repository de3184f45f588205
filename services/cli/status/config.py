"""What `pipectl status` talks to, how long it waits, and which groups it watches."""

from __future__ import annotations

from pydantic import Field, FilePath, SecretStr

from services.cli.settings import CliSettings
from services.common.topology import (
    INGESTER,
    RAW_PREFIX,
    STAGE_INPUTS,
    STAGES,
    group_id,
    instance_name,
    operator_group,
)

# A component that has not answered in this long is reported as down: status must answer
# fast precisely when something is broken.
CHECK_TIMEOUT_S = 2.5
# Reading data (offsets, the whole DLQ, counting rows and objects) may take longer on a big
# pipeline than a health probe, but is still bounded so that status always answers.
DATA_TIMEOUT_S = 10.0
# Lag up to this many offsets in a partition is counted record by record (count_readable);
# above it the few transaction markers among the offsets are noise, and reading would cost.
COUNT_LAG_UP_TO = 1000
COUNT_TIMEOUT_S = 3.0
COUNT_GROUP = operator_group("status")
DEFAULT_INTERVAL_S = 2.0
DEFAULT_WATCH_S = 5.0

SERVICES = ("ingester", "processor", "storage")
# PIPELINE_<SERVICE>_URL: one URL, or one per instance where several run side by side,
# comma-separated (the native stack writes them in instance order: ingester, ingester-2, ...).
URLS = r"^https?://[^,\s]+(\s*,\s*https?://[^,\s]+)*$"
# The ingester reads every source's raw topic (a pattern subscription): its lag is the sum
# over them, shown per topic with -v. RAW_TOPICS stands for them wherever a topic is named.
RAW_TOPICS = RAW_PREFIX + "*"
# Each stage's consumer group and the topic it reads (services/common/topology.py).
GROUPS: tuple[tuple[str, str], ...] = tuple(
    (group_id(stage), RAW_TOPICS if stage == INGESTER else STAGE_INPUTS[stage]) for stage in STAGES
)
LAKE_PREFIX = "events/"  # the lake sink's object keys: events/date=.../hour=.../part-....parquet
SEARCH_INDICES = "events-*"  # the search sink's monthly indices: events-YYYY.MM
ROWS, OBJECTS, DOCUMENTS = "rows in events", f"objects under {LAKE_PREFIX}", f"documents in {SEARCH_INDICES}"
ES_OK = ("green", "yellow")  # yellow: replicas unassigned, normal for a single node


class StatusSettings(CliSettings):
    """Everything status talks to; `. .stack/env` sets all of it. A missing one exits 2."""

    opa_url: str = Field(pattern=r"^https://")  # mutual TLS only
    pg_dsn: SecretStr  # holds a password: never echoed in a settings error
    s3_endpoint: str = Field(pattern=r"^https?://")
    s3_bucket: str = Field(min_length=1)
    s3_access_key: str = Field(min_length=1)
    s3_secret_key: SecretStr
    # Elasticsearch over HTTPS only (the password goes with every request), as a user that
    # may read cluster health and the event indices (the stack's operator user).
    es_url: str = Field(pattern=r"^https://")
    es_username: str = Field(min_length=1)
    es_password: SecretStr
    es_ca: FilePath | None = None  # CA bundle (PEM) for Elasticsearch's certificate; default: the system's
    ingester_url: str = Field(pattern=URLS)
    processor_url: str = Field(pattern=URLS)
    storage_url: str = Field(pattern=URLS)
    # The native stack's directory: where each service's supervisor keeps its state.
    stack_dir: str | None = None

    def instance_urls(self) -> dict[str, str]:
        """Every instance of every service by instance name (`ingester`, `ingester-2`, ...,
        as the native stack names their processes and supervisor state), with its URL."""
        return {
            instance_name(service, n): url.strip().rstrip("/")
            for service in SERVICES
            for n, url in enumerate(getattr(self, f"{service}_url").split(","), start=1)
        }

    def service_url(self, name: str) -> str:
        """The URL of one instance, by its instance name (a service's name: its first)."""
        return self.instance_urls()[name]
