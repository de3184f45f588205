"""What every test session shares."""

from __future__ import annotations

import signal
from types import FrameType

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (`kill`, a CI job's timeout) ends the session as Ctrl-C does: pytest then tears
    its fixtures down, so the integration tests' stack is stopped instead of left running."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}: stopping the test session")
