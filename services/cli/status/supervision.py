"""The native stack's supervisor state of a service: restarts, last exit, crash loops."""

from __future__ import annotations

import os
from typing import Any

import orjson

from services.cli.status.report import Check
from services.common.health import supervisor_state_file


def read_supervision(stack_dir: str | None, service: str) -> dict[str, Any] | None:
    """The supervisor's state of a service (deploy/local/supervisor.py), None without one."""
    if not stack_dir:
        return None
    try:
        state = orjson.loads(supervisor_state_file(stack_dir, service).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def _running(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the stack runs as another user: it exists
        return True
    return True


def last_exit_text(state: dict[str, Any]) -> str | None:
    """`killed by SIGKILL at ...` or `exit code 1 at ...`, None before any exit."""
    if state.get("last_exit_signal"):
        how = f"killed by {state['last_exit_signal']}"
    elif state.get("last_exit_code") is not None:
        how = f"exit code {state['last_exit_code']}"
    else:
        return None
    return f"{how} at {state['last_exit_at']}" if state.get("last_exit_at") else how


def with_supervision(check: Check, state: dict[str, Any] | None) -> Check:
    """Adds the supervisor's restarts, last exit and error to a service's check; a crash
    loop fails it. A state left by a supervisor that no longer runs is history: its
    restarts are shown, but no crash loop is current."""
    if state is None:
        check.extra.update(restarts=None, crash_looping=None, last_exit=None, last_error=None)
        return check
    restarts = int(state.get("restarts") or 0)
    looping = bool(state.get("crash_looping")) and _running(state.get("supervisor_pid"))
    errors = [str(line) for line in state.get("last_error") or []]
    check.extra.update(
        restarts=restarts, crash_looping=looping, last_exit=last_exit_text(state), last_error=errors
    )
    if looping:
        window = float(state.get("crash_window_s") or 300) / 60
        recent = state.get("restarts_in_window", restarts)
        loop = f"crash looping: {recent} restarts in {window:g} min"
        check.ok = False
        check.detail = f"{loop}; {check.detail}" if check.detail != "ready" else loop
    return check
