"""SPIRE in the native stack: the server (CA and registration entries) and one agent (the
Workload API every component asks for its X.509-SVID), started before everything else.

- Trust domain `pipeline.local`, a self-signed CA kept on disk (<stack>/spire/server/data),
  SVIDs that live PIPELINE_SVID_TTL_SECONDS (1 h by default) and are renewed by the agent
  at half life.
- Node attestation by join token: the agent's data is wiped and a fresh single-use token
  made at each agent start; the token also makes the agent the node alias
  `spiffe://pipeline.local/node/local`, the parent of every workload entry, and aliases of
  older tokens are deleted.
- Workload attestation by `unix` selectors: the uid of the process asking. Each service and
  the broker run as their own system users (deploy/local/os_users.py); the user running the
  stack gets the operator, admin and source identities. A stack run by an ordinary user
  cannot switch users, so there every entry selects that user's uid and each component
  picks its own SVID by SPIFFE ID: the identities work, but are not isolated from each other.
- Registration entries are data: deploy/local/spire/entries.json, applied idempotently at
  every start (missing entries created, changed ones replaced, entries not in the file
  deleted: deleting a line revokes that identity once its last SVID expires).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import string
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from deploy.local import tools
from deploy.local.os_users import as_user, own, switching_users
from deploy.local.processes import ManagedProcess, StackError, raise_exited, wait_until

TRUST_DOMAIN = "pipeline.local"
NODE_ID = f"spiffe://{TRUST_DOMAIN}/node/local"
ENTRIES_FILE = tools.LOCAL / "spire" / "entries.json"
CONFIG_TEMPLATES = tools.LOCAL / "spire"
DEFAULT_SVID_TTL_SECONDS = 3600
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class EntrySpec:
    spiffe_id: str
    selectors: tuple[str, ...]  # "type:value", e.g. "unix:uid:0", sorted
    dns_names: tuple[str, ...] = ()


def entries_elsewhere(
    parent_id: str, selectors: Callable[[str], list[dict[str, str]]], dns_names: dict[str, list[str]]
) -> dict[str, Any]:
    """The native registration entries for another deployment (deploy/compose, deploy/k8s):
    the same SPIFFE IDs, with that deployment's parent, selectors (by SPIFFE ID) and DNS
    names (by the ID's path), as `spire-server entry create -data` takes them."""
    out = []
    for spiffe_id in sorted(json.loads(ENTRIES_FILE.read_text())["entries"]):
        path = spiffe_id.removeprefix(f"spiffe://{TRUST_DOMAIN}/")
        entry: dict[str, Any] = {
            "spiffe_id": spiffe_id,
            "parent_id": parent_id,
            "selectors": selectors(spiffe_id),
        }
        if path in dns_names:
            entry["dns_names"] = dns_names[path]
        out.append(entry)
    return {"entries": out}


def load_entries(path: Path = ENTRIES_FILE, operator_uid: int | None = None) -> dict[str, EntrySpec]:
    """The registration entries of `path` for this machine: $operator_uid is the uid running
    the stack; without switching users, `unix:user:` selectors become that uid too."""
    uid = os.getuid() if operator_uid is None else operator_uid
    text = string.Template(path.read_text()).substitute(operator_uid=uid)
    entries = {}
    for spiffe_id, spec in json.loads(text)["entries"].items():
        selectors = [
            f"unix:uid:{uid}" if s.startswith("unix:user:") and not switching_users() else s
            for s in spec["selectors"]
        ]
        entries[spiffe_id] = EntrySpec(
            spiffe_id, tuple(sorted(set(selectors))), tuple(sorted(spec.get("dns_names", [])))
        )
    return entries


def unix_users(entries: dict[str, EntrySpec]) -> dict[str, str]:
    """SPIFFE ID -> the system user its entry selects (`unix:user:<name>`), for those that name one."""
    return {
        e.spiffe_id: s.removeprefix("unix:user:")
        for e in entries.values()
        for s in e.selectors
        if s.startswith("unix:user:")
    }


def entry_spiffe_id(value: dict[str, str]) -> str:
    """A SPIFFE ID from the admin API's JSON ({"trust_domain": ..., "path": ...})."""
    return f"spiffe://{value['trust_domain']}{value['path']}"


class SpireServer:
    def __init__(self, root: Path, port: int, svid_ttl_seconds: int):
        self.port, self.svid_ttl_seconds = port, svid_ttl_seconds
        self.svid_ttl = timedelta(seconds=svid_ttl_seconds)
        self.dir = root / "spire" / "server"
        self.data_dir = self.dir / "data"
        self.config_file = self.dir / "server.conf"
        self.socket = self.dir / "api.sock"
        self.process = ManagedProcess("spire-server", root / "run", root / "logs")

    def healthy(self) -> bool:
        return self._cli(["healthcheck", "-shallow"], check=False).returncode == 0

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # its CA keys, its datastore and its admin socket
        values = {
            "port": self.port,
            "socket": self.socket,
            "trust_domain": TRUST_DOMAIN,
            "data_dir": self.data_dir,
            # The CA outlives many SVIDs (SPIRE wants SVIDs well inside the CA's lifetime).
            "ca_ttl": f"{max(24 * 3600, 12 * self.svid_ttl_seconds)}s",
            "svid_ttl": f"{self.svid_ttl_seconds}s",
        }
        template = string.Template((CONFIG_TEMPLATES / "server.conf").read_text())
        self.config_file.write_text(template.substitute(values))
        self.process.start([tools.spire("spire-server"), "run", "-config", str(self.config_file)])
        self.process.wait_healthy(self.healthy, timeout=START_TIMEOUT, what="SPIRE server healthy")

    def _cli(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [tools.spire("spire-server"), *args, "-socketPath", str(self.socket)]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if check and result.returncode != 0:
            raise StackError(
                f"spire-server {' '.join(args[:2])} failed: {(result.stderr or result.stdout).strip()}"
            )
        return result

    def _json(self, args: list[str]) -> dict[str, Any]:
        return json.loads(self._cli([*args, "-output", "json"]).stdout or "{}")

    def bundle_pem(self) -> str:
        return self._cli(["bundle", "show", "-format", "pem"]).stdout

    def join_token(self, alias: str) -> str:
        """A single-use token that attests an agent and makes it `alias` too."""
        return str(self._json(["token", "generate", "-spiffeID", alias, "-ttl", "600"])["value"])

    def entries(self) -> list[dict[str, Any]]:
        return list(self._json(["entry", "show"]).get("entries") or [])

    def delete_entries(self, ids: list[str]) -> None:
        for entry_id in ids:
            self._cli(["entry", "delete", "-entryID", entry_id])

    def drop_node_aliases(self, keep_parent: str) -> None:
        """Delete node alias entries of agents other than `keep_parent` (earlier starts' tokens)."""
        stale = [
            e["id"]
            for e in self.entries()
            if entry_spiffe_id(e["spiffe_id"]) == NODE_ID and entry_spiffe_id(e["parent_id"]) != keep_parent
        ]
        self.delete_entries(stale)

    def apply_entries(
        self, wanted: dict[str, EntrySpec], parent: str = NODE_ID
    ) -> tuple[list[str], list[str]]:
        """Make the workload entries under `parent` exactly `wanted`, each with the server's
        SVID TTL (a changed entry is deleted and created again); returns the SPIFFE IDs
        (created, deleted)."""
        wanted_specs = set(wanted.values())
        kept: set[EntrySpec] = set()
        stale: dict[str, str] = {}  # entry id -> SPIFFE ID
        for e in self.entries():
            if entry_spiffe_id(e["parent_id"]) != parent:
                continue
            spec = EntrySpec(
                entry_spiffe_id(e["spiffe_id"]),
                tuple(sorted(f"{s['type']}:{s['value']}" for s in e.get("selectors", []))),
                tuple(sorted(e.get("dns_names") or [])),
            )
            if spec in wanted_specs and spec not in kept and e.get("x509_svid_ttl") == self.svid_ttl_seconds:
                kept.add(spec)
            else:
                stale[e["id"]] = spec.spiffe_id
        self.delete_entries(list(stale))
        missing = [spec for spec in wanted.values() if spec not in kept]
        if missing:
            self.create_entries(missing, parent)
        return [spec.spiffe_id for spec in missing], sorted(set(stale.values()))

    def create_entries(self, specs: list[EntrySpec], parent: str = NODE_ID) -> None:
        batch = {
            "entries": [
                {
                    "spiffe_id": spec.spiffe_id,
                    "parent_id": parent,
                    "selectors": [
                        {"type": t, "value": v} for t, v in (s.split(":", 1) for s in spec.selectors)
                    ],
                    "dns_names": list(spec.dns_names),
                    "x509_svid_ttl": self.svid_ttl_seconds,
                }
                for spec in specs
            ]
        }
        batch_file = self.dir / "entries-to-create.json"
        batch_file.write_text(json.dumps(batch))
        try:
            self._cli(["entry", "create", "-data", str(batch_file)])
        finally:
            batch_file.unlink(missing_ok=True)


class SpireAgent:
    def __init__(self, root: Path, server: SpireServer):
        self.server = server
        self.dir = root / "spire" / "agent"
        self.data_dir = self.dir / "data"
        self.config_file = self.dir / "agent.conf"
        self.bundle_file = self.dir / "bundle.pem"
        # Where every workload asks (SPIFFE_ENDPOINT_SOCKET): a directory anyone may enter.
        self.socket = root / "spire" / "workload" / "api.sock"
        self.process = ManagedProcess("spire-agent", root / "run", root / "logs")

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def healthy(self) -> bool:
        argv = [tools.spire("spire-agent"), "healthcheck", "-socketPath", str(self.socket)]
        return subprocess.run(argv, capture_output=True, check=False, timeout=30).returncode == 0

    def start(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)  # a fresh attestation with a fresh token
        self.data_dir.mkdir(parents=True)
        self.dir.chmod(0o700)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.socket.parent.chmod(0o755)
        self.bundle_file.write_text(self.server.bundle_pem())
        token = self.server.join_token(NODE_ID)
        values = {
            "data_dir": self.data_dir,
            "server_port": self.server.port,
            "socket": self.socket,
            "bundle": self.bundle_file,
            "trust_domain": TRUST_DOMAIN,
            "join_token": token,
        }
        text = string.Template((CONFIG_TEMPLATES / "agent.conf").read_text()).substitute(values)
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.process.start([tools.spire("spire-agent"), "run", "-config", str(self.config_file)])
        self.process.wait_healthy(self.healthy, timeout=START_TIMEOUT, what="SPIRE agent healthy")
        self.server.drop_node_aliases(keep_parent=f"spiffe://{TRUST_DOMAIN}/spire/agent/join_token/{token}")

    def offered(self) -> set[str]:
        """The SPIFFE IDs the agent hands to us (the stack's own uid) right now."""
        argv = [
            tools.spire("spire-agent"),
            "api",
            "fetch",
            "x509",
            "-socketPath",
            str(self.socket),
            "-output",
            "json",
        ]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        if result.returncode != 0:
            return set()
        return {svid["spiffe_id"] for svid in json.loads(result.stdout).get("svids") or []}

    def wait_for(self, spiffe_ids: set[str]) -> None:
        """Until the agent serves `spiffe_ids` to us: it syncs entries from the server every
        few seconds, all at once, so entries just created for other users are there too."""
        wait_until(
            lambda: spiffe_ids <= self.offered(),
            timeout=START_TIMEOUT,
            what=f"SPIRE agent serving {sorted(spiffe_ids)}",
            log=self.process.log_file,
            interval=0.5,
        )


class SvidFiles:
    """A server's SVID as files it reads and reloads (OPA, Elasticsearch): a process of ours
    (`python -m services.common.identity <id> --write DIR --follow`), run as that server's
    system user so SPIRE attests it as that server, which rewrites svid.pem, key.pem and
    bundle.pem in DIR at every renewal."""

    FILES = ("svid.pem", "key.pem", "bundle.pem")

    def __init__(self, root: Path, server: str, spiffe_id: str, directory: Path, agent: SpireAgent):
        self.spiffe_id, self.directory, self.agent = spiffe_id, directory, agent
        self.process = ManagedProcess(f"{server}-svid", root / "run", root / "logs")

    def written(self) -> bool:
        return self.process.running() and all((self.directory / f).is_file() for f in self.FILES)

    def start(self, user: pwd.struct_passwd | None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        own([self.directory], user)
        self.directory.chmod(0o700)
        argv = [
            sys.executable,
            "-m",
            "services.common.identity",
            self.spiffe_id,
            "--write",
            str(self.directory),
        ]
        self.process.start(
            [*as_user(user), *argv, "--follow"],
            env={"SPIFFE_ENDPOINT_SOCKET": self.agent.endpoint},
            cwd=tools.REPO,
        )
        wait_until(
            self._written_or_exited,
            timeout=START_TIMEOUT,
            what=f"{self.spiffe_id} written to {self.directory}",
            log=self.process.log_file,
        )

    def _written_or_exited(self) -> bool:
        if self.process.exited():
            raise_exited(self.process)
        return self.written()
