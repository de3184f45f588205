"""Where promtool is: from Debian's `prometheus` package, unpacked (not installed as a
service) into the cache by `make deps` (scripts/unpack-debian-packages.sh). This finds it
and runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


class PromtoolNotFound(FileNotFoundError):
    pass


def cache_path() -> Path:
    cache = Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "pipeline"))
    return cache / "prometheus" / "usr" / "bin" / "promtool"


def _executable(path: str | Path) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def find_promtool() -> Path:
    """$PIPELINE_PROMTOOL, else the cache's (cache_path()), else the first on PATH. When the
    variable is set it is the only candidate: a wrong path is an error, not a fall-through."""
    explicit = os.environ.get("PIPELINE_PROMTOOL")
    if explicit:
        if not _executable(explicit):
            raise PromtoolNotFound(f"PIPELINE_PROMTOOL={explicit} is not an executable file")
        return Path(explicit)
    cached = cache_path()
    if _executable(cached):
        return cached
    on_path = shutil.which("promtool")
    if on_path:
        return Path(on_path)
    raise PromtoolNotFound(
        f"promtool not found at {cached} nor on PATH: run `make deps` (it extracts Debian's "
        f"prometheus package there), or set PIPELINE_PROMTOOL to a promtool binary"
    )


def run(
    *args: str | Path, promtool: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """promtool (find_promtool()'s unless given) with these arguments, its stdout and stderr
    captured as text."""
    return subprocess.run(
        [str(promtool or find_promtool()), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
