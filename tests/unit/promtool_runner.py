"""promtool for the unit tests: a missing promtool fails the test (never skips it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deploy.prometheus import promtool as prom


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    try:
        path = prom.find_promtool()
    except prom.PromtoolNotFound as e:
        missing = str(e)
    else:
        return prom.run(*args, promtool=path)
    pytest.fail(missing, pytrace=False)  # outside the except: no chained traceback


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"promtool {' '.join(result.args[1:])} exited {result.returncode}:\n{result.stdout}{result.stderr}"
