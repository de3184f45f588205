"""Compose config generated from the native stack's own files: `python -m deploy.compose.generate`.

Two files cannot be mounted as they are, so they are written from the native ones and
committed; tests/unit/test_compose.py fails when either is stale (`--check` does the same):

- spire/entries.json: deploy/local/spire/entries.json's SPIFFE IDs, each with selectors of
  SPIRE's docker workload attestor (the compose service it runs in) in place of the native
  unix ones, in the batch format of `spire-server entry create -data`.
- kafka/server.properties: deploy/local/kafka/server.properties with its placeholders filled
  for compose, and the listener addresses (OVERRIDES) changed from loopback to the compose
  network; every other setting is the native one, security posture included.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

from deploy.generated import write_or_check
from deploy.local.spire_stack import TRUST_DOMAIN, entries_elsewhere
from deploy.local.stack import BROKER_ID, DEFAULT_AUTHZ_CACHE_SECONDS
from services.common.topology import BROKER_AUTHZ_POLICY

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENTRIES_OUT = HERE / "spire" / "entries.json"
KAFKA_TEMPLATE = REPO / "deploy" / "local" / "kafka" / "server.properties"
KAFKA_OUT = HERE / "kafka" / "server.properties"

# compose.yaml's top-level `name`: the project label every container carries.
PROJECT = "pipeline"
# The SPIRE agent's own ID (`spire-server token generate -spiffeID`, spire/register.sh):
# the parent of every workload entry.
AGENT_ID = f"spiffe://{TRUST_DOMAIN}/agent/compose"
# Which compose service holds each identity of the native entries. Native gives the operator,
# admin and source identities to the user running the stack; here the admin identity is the
# one-shot `setup` container's alone, and pipectl (a tool container) gets the operator's and
# the sources' (`pipectl produce`, the demo).
WORKLOADS = {
    "broker/kafka": "kafka",
    # OPA and Elasticsearch read their SVIDs as files, written by a sidecar of our image
    # (`python -m services.common.identity ... --write --follow`), which is what asks SPIRE.
    "control/opa": "opa-svid",
    "search/elasticsearch": "elasticsearch-svid",
    "service/ingester": "ingester",
    "service/processor": "processor",
    "service/storage": "storage",
    "ops/lag-exporter": "lag-exporter",
    "operator/cli": "pipectl",
    "admin/bootstrap": "setup",
    "source/*": "pipectl",
}
# The DNS names clients dial in compose (native: localhost). The broker keeps localhost too:
# its controller listener stays on the container's loopback and it dials itself there.
DNS_NAMES = {
    "broker/kafka": ["kafka", "localhost"],
    "control/opa": ["opa"],
    "search/elasticsearch": ["elasticsearch"],
}

# The broker inside compose: fixed ports, data on a volume, OPA by its service name.
KAFKA_VALUES = {
    "client_port": 9093,
    "controller_port": 9094,
    "data_dir": "/var/lib/kafka/data",
    "trust_domain": TRUST_DOMAIN,
    "opa_decision_url": f"https://opa:8181/v1/data/{BROKER_AUTHZ_POLICY}",
    "authz_cache_seconds": DEFAULT_AUTHZ_CACHE_SECONDS,
    "broker_id": BROKER_ID,
}
# The only settings that differ from the native file: the client listener binds every
# interface of the container (other containers reach it) and is advertised under the
# broker's service name. The controller listener stays on loopback, as natively. Both are
# SSL with client auth (listener.security.protocol.map, ssl.client.auth: the native lines).
OVERRIDES = {
    "listeners": "CLIENT://0.0.0.0:9093,CONTROLLER://localhost:9094",
    "advertised.listeners": "CLIENT://kafka:9093",
}


def workload(spiffe_id: str) -> str:
    path = spiffe_id.removeprefix(f"spiffe://{TRUST_DOMAIN}/")
    key = path if path in WORKLOADS else path.split("/")[0] + "/*"
    if key not in WORKLOADS:
        raise SystemExit(f"{spiffe_id} (deploy/local/spire/entries.json) has no compose service in WORKLOADS")
    return WORKLOADS[key]


def entries() -> dict:
    # Both labels are compose's own: the service's key in compose.yaml and the project, so
    # every replica of a service, and nothing else, matches.
    return entries_elsewhere(
        AGENT_ID,
        lambda spiffe_id: [
            {"type": "docker", "value": f"label:com.docker.compose.project:{PROJECT}"},
            {"type": "docker", "value": f"label:com.docker.compose.service:{workload(spiffe_id)}"},
        ],
        DNS_NAMES,
    )


def server_properties() -> str:
    text = string.Template(KAFKA_TEMPLATE.read_text()).substitute(KAFKA_VALUES)
    lines, seen = [], set()
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and key in OVERRIDES:
            line, _ = f"{key}={OVERRIDES[key]}", seen.add(key)
        lines.append(line)
    if missing := set(OVERRIDES) - seen:
        raise SystemExit(f"{KAFKA_TEMPLATE} no longer sets {sorted(missing)}: update OVERRIDES")
    header = (
        "# GENERATED by deploy/compose/generate.py from deploy/local/kafka/server.properties: do not edit.\n"
    )
    return header + "\n".join(lines) + "\n"


def outputs() -> dict[Path, str]:
    return {
        ENTRIES_OUT: json.dumps(entries(), indent=2) + "\n",
        KAFKA_OUT: server_properties(),
    }


def main(argv: list[str] | None = None) -> int:
    return write_or_check(outputs(), argv, __doc__.splitlines()[0], "python -m deploy.compose.generate")


if __name__ == "__main__":
    sys.exit(main())
