"""Elasticsearch's users in the native stack (deploy/local/stack.py, search_server.py): their
passwords in stack.json, who is handed which, and the users file's hash format. The server's
side (logins, roles, HTTPS) is proven against a real node in tests/integration/test_search_server.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from deploy.local.components import PipelineService
from deploy.local.processes import StackError
from deploy.local.search_server import (
    ADMIN_USER,
    READER_USER,
    USERS,
    WRITER_USER,
    SearchServer,
    password_hash,
)
from deploy.local.stack import DEFAULT_PORTS, Stack
from services.cli.settings import read_env_file

ES_PASSWORDS = ("es_admin_password", "es_storage_password", "es_operator_password")


def test_a_stack_made_by_an_older_version_gains_the_passwords_and_keeps_them(tmp_path: Path) -> None:
    Stack(tmp_path, ports=dict(DEFAULT_PORTS))
    state_file = tmp_path / "stack.json"
    older = {k: v for k, v in json.loads(state_file.read_text()).items() if k not in ES_PASSWORDS}
    state_file.write_text(json.dumps(older))

    stack = Stack(tmp_path)
    saved = json.loads(state_file.read_text())
    passwords = [saved[k] for k in ES_PASSWORDS]
    assert len(set(passwords)) == 3 and all(len(p) >= 32 for p in passwords)
    assert {k: saved[k] for k in older} == older  # nothing else changed
    assert oct(state_file.stat().st_mode & 0o777) == "0o600"
    assert stack.search.passwords == {
        ADMIN_USER: saved["es_admin_password"],
        WRITER_USER: saved["es_storage_password"],
        READER_USER: saved["es_operator_password"],
    }
    assert Stack(tmp_path).search.passwords == stack.search.passwords  # the next `up`: the same


def test_each_gets_only_its_own_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = Stack(tmp_path, ports=dict(DEFAULT_PORTS))
    admin, writer, reader = (stack.search.passwords[u] for u in (ADMIN_USER, WRITER_USER, READER_USER))

    # What a service is told of Elasticsearch: where it is, no user (storage verifies the node
    # with its own SPIFFE trust bundle).
    shared = stack.env_for("ingester")
    assert shared["PIPELINE_ES_URL"] == f"https://localhost:{DEFAULT_PORTS['elasticsearch']}"
    assert not {"PIPELINE_ES_USERNAME", "PIPELINE_ES_PASSWORD", "PIPELINE_ES_CA"} & set(shared)

    # .stack/env: the operator's read-only user, and the bundle beside the node's SVID.
    stack.write_env()
    env_file = read_env_file(stack.env_file)
    assert (env_file["PIPELINE_ES_USERNAME"], env_file["PIPELINE_ES_PASSWORD"]) == (READER_USER, reader)
    assert env_file["PIPELINE_ES_CA"] == str(stack.search.ca_file)
    assert env_file == stack.env()

    # Each service as `up` starts it: storage writes as the writer; the others get no user.
    started: dict[str, dict[str, str]] = {}
    monkeypatch.setattr(
        PipelineService, "start", lambda self, env, user=None: started.__setitem__(self.name, env)
    )
    for name in stack.instances:
        stack.start_service(name)
    storage = started.pop("storage")
    assert (storage["PIPELINE_ES_USERNAME"], storage["PIPELINE_ES_PASSWORD"]) == (WRITER_USER, writer)
    for name, env in started.items():
        assert "PIPELINE_ES_PASSWORD" not in env and "PIPELINE_ES_USERNAME" not in env, name
    everything = [*started.values(), storage, env_file]
    assert not any(admin in env.values() for env in everything)  # the admin's stays with the stack


def test_the_users_file_hash_is_elasticsearchs_pbkdf2_format() -> None:
    hashed = password_hash("s3cret")
    match = re.fullmatch(r"\{PBKDF2\}(\d+)\$([A-Za-z0-9+/]{43}=)\$([A-Za-z0-9+/]{43}=)", hashed)
    assert match, hashed
    iterations, salt, key = int(match[1]), base64.b64decode(match[2]), base64.b64decode(match[3])
    # One of the costs Elasticsearch's Hasher knows (pbkdf2_<cost>); PBKDF2-HMAC-SHA512, 256 bits.
    assert iterations in (1000, 10_000, 50_000, 100_000, 500_000, 1_000_000)
    assert key == hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, iterations, dklen=32)
    assert password_hash("s3cret") != hashed  # a fresh salt each time


def test_a_search_server_needs_every_users_password(tmp_path: Path) -> None:
    passwords = {user: os.urandom(8).hex() for user in USERS}
    del passwords[READER_USER]
    with pytest.raises(StackError, match=READER_USER):
        SearchServer(tmp_path, 1, passwords)
