"""Background processes of the native stack: found again by pid file, stopped, waited on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from deploy.local.processes import ManagedProcess, StackError, wait_until


def test_start_find_again_and_stop(tmp_path: Path) -> None:
    process = ManagedProcess("sleeper", tmp_path / "run", tmp_path / "logs")
    process.start([sys.executable, "-c", "print('hello', flush=True); import time; time.sleep(60)"])
    wait_until(lambda: "hello" in process.log_file.read_text(), timeout=10, what="output logged")
    # A second handle (as `make down` in a new shell has) sees the same process.
    again = ManagedProcess("sleeper", tmp_path / "run", tmp_path / "logs")
    assert again.pid == process.pid is not None
    process.stop(timeout=5)
    assert not again.running()
    assert not process.pid_file.exists()


def test_wait_until_names_what_and_shows_the_log(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("line one\nfatal: port in use\n")
    with pytest.raises(StackError, match=r"(?s)broker up.*fatal: port in use"):
        wait_until(lambda: False, timeout=0.3, what="broker up", log=log)


def test_wait_until_stops_early_on_a_hard_failure(tmp_path: Path) -> None:
    process = ManagedProcess("crasher", tmp_path / "run", tmp_path / "logs")
    process.start([sys.executable, "-c", "raise SystemExit('bad config: PIPELINE_X')"])

    def up_or_exited() -> bool:
        if process.exited():
            raise StackError(f"{process.name} exited during start; see {process.log_file}")
        return False

    with pytest.raises(StackError, match="crasher exited"):
        wait_until(up_or_exited, timeout=60, what="never")


def test_a_started_process_inherits_no_secret_from_our_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As when `make up` runs in a shell that sourced .stack/env (the operator's settings).
    monkeypatch.setenv("PIPELINE_S3_SECRET_KEY", "inherited-secret")
    monkeypatch.setenv("PIPELINE_PG_DSN", "postgresql://pipeline_operator:inherited-pw@h/db")
    monkeypatch.setenv("PIPELINE_LOG_LEVEL", "debug")  # no secret: inherited as before
    process = ManagedProcess("env", tmp_path / "run", tmp_path / "logs")
    show = "import json, os; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('PIPELINE_')}))"
    process.start([sys.executable, "-c", show], env={"PIPELINE_PG_DSN": "postgresql://mine:given@h/db"})
    wait_until(process.exited, timeout=30, what="the process printed its environment")
    env = json.loads(process.log_file.read_text().splitlines()[-1])
    assert env["PIPELINE_PG_DSN"] == "postgresql://mine:given@h/db"
    assert "PIPELINE_S3_SECRET_KEY" not in env
    assert env["PIPELINE_LOG_LEVEL"] == "debug"
