"""Running pipectl as an operator does: a subprocess with only the given PIPELINE_* settings."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any


def pipectl(env: dict[str, str], *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[Any]:
    """Text output, or bytes when `stdin` is given (records fed on standard input)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env={**clean, **env},
        input=stdin,
        capture_output=True,
        text=stdin is None,
        timeout=120,
        check=False,
    )
