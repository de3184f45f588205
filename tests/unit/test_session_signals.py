"""A test session stopped by SIGTERM tears its fixtures down (tests/conftest.py), as one
stopped by Ctrl-C does: the integration tests' stack is stopped, not left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SESSION = """
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def resource():
    yield
    Path("torn-down").write_text("yes")


def test_runs_until_stopped(resource):
    Path("started").write_text("yes")
    time.sleep(120)
"""


def test_sigterm_tears_the_session_fixtures_down(tmp_path: Path) -> None:
    (tmp_path / "test_session.py").write_text(SESSION)
    session = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "test_session.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert session.poll() is None, session.communicate()[0].decode()
            assert time.monotonic() < deadline, "the session's test never started"
            time.sleep(0.05)
        session.send_signal(signal.SIGTERM)
        output = session.communicate(timeout=60)[0].decode()
    finally:
        session.kill()
    assert (tmp_path / "torn-down").exists(), output
    assert session.returncode == 2, output  # pytest's "interrupted"
