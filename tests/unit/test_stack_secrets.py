"""Which secrets each process of the native stack holds: its own, and no other."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from deploy.local.stack import DEFAULT_PORTS, PG_LOGINS, SERVICES, Stack


def secrets_in(stack: Stack, environ: Mapping[str, str]) -> set[str]:
    """The names of the stack's secrets found in any value of an environment."""
    state = stack.state
    known = {
        "pg_superuser_password": state.pg_superuser_password,
        "pg_password": state.pg_password,  # the owner's
        "s3_access_key": state.s3_access_key,
        "s3_secret_key": state.s3_secret_key,
        **{f"pg_login:{login}": password for login, password in state.pg_login_passwords.items()},
    }
    return {name for name, secret in known.items() if any(secret in value for value in environ.values())}


def test_each_service_gets_its_own_database_login_and_only_storage_the_lake_keys(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ports=dict(DEFAULT_PORTS))
    for service in SERVICES:
        env = stack.env_for(service)
        assert env["PIPELINE_PG_DSN"].startswith(f"postgresql://{PG_LOGINS[service]}:")
        lake = {"s3_access_key", "s3_secret_key"} if service == "storage" else set()
        assert secrets_in(stack, env) == {f"pg_login:{service}", *lake}, service
    assert "PIPELINE_S3_SECRET_KEY" not in stack.env_for("ingester")


def test_the_operators_settings_hold_the_read_only_login_and_the_lake_keys(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ports=dict(DEFAULT_PORTS))
    env = stack.env()  # .stack/env, pipectl
    assert env["PIPELINE_PG_DSN"].startswith("postgresql://pipeline_operator:")
    assert secrets_in(stack, env) == {"pg_login:operator", "s3_access_key", "s3_secret_key"}


def test_a_stack_made_by_an_older_version_gains_the_database_logins(tmp_path: Path) -> None:
    first = Stack(tmp_path, ports=dict(DEFAULT_PORTS))
    saved = json.loads(first.state_file.read_text())
    del saved["pg_login_passwords"]  # as stack.json was before the per-service roles
    first.state_file.write_text(json.dumps(saved))

    upgraded = Stack(tmp_path).state
    assert set(upgraded.pg_login_passwords) == set(PG_LOGINS)
    assert len(set(upgraded.pg_login_passwords.values())) == len(PG_LOGINS)  # one each
    assert upgraded.pg_password == first.state.pg_password  # the rest is kept
    # Kept in stack.json: the next `up` (which creates the roles) and every later one agree.
    assert Stack(tmp_path).state.pg_login_passwords == upgraded.pg_login_passwords
