"""Keeps one pipeline service running: restarts it when it crashes, stops it when asked.

    python -m deploy.local.supervisor --name ingester --state-file .stack/run/ingester.supervisor.json \
        --log-file .stack/logs/ingester.log -- python -m services.ingester

The service runs as this process's child and shares its stdout/stderr (the service's log).
A child that exits non-zero or by a signal is started again after a backoff (1 s, doubling
to 30 s; back to 1 s once a run has lasted 60 s). Exit 0 is a clean stop and is not restarted;
neither is exit 2, a bad setting (services/common/service.py run_main), at the first start,
since the same settings would fail the same way: the supervisor exits with the child's code.
After a restart, exit 2 is retried like a crash (the environment changed under the service). SIGTERM and
SIGINT are passed to the child, and the supervisor exits once it has stopped.

What happened is kept in a small JSON state file (written atomically), which `pipectl
status` and the stack read: the child's pid, starts, restarts, the last exit (code or
signal, when) with the last error lines of the log, and whether it is crash looping
(3 restarts within 5 minutes). The child gets PIPELINE_RESTARTS=<restarts so far>.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.common.logs import setup_logging

log = logging.getLogger("supervisor")

# Exit codes that a restart cannot fix: 0 the service stopped cleanly, 2 it refused its
# settings or identity (run_main), and the settings do not change between restarts.
NOT_RESTARTED = (0, 2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Blocked and taken synchronously with sigtimedwait: no handler can run between a check
# and a wait, so a signal arriving at any moment is seen by the next wait.
WAITED_SIGNALS = {*STOP_SIGNALS, signal.SIGCHLD}
PR_SET_PDEATHSIG = 1
ERROR_LINES = 5
# What looks like an error in a service's log: its JSON lines at level error/critical, a
# Python traceback printed to stderr, or a plain line naming an error.
ERROR_LINE = re.compile(r'"level":\s*"(error|critical)"|Traceback|[A-Za-z]+(Error|Exception)\b|\bFATAL\b')
MAX_SCAN_BYTES = 256 * 1024  # of the log written by one run of the child


@dataclass
class Backoff:
    """Delay before each restart: `initial`, doubling up to `maximum`; a run that lasted
    `reset_after` seconds was a healthy one, and the next crash starts from `initial` again."""

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0
    current: float = field(init=False)

    def __post_init__(self) -> None:
        self.current = self.initial

    def next_delay(self) -> float:
        delay = self.current
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial


@dataclass
class CrashLoop:
    """`restarts` or more restarts within `window` seconds is a crash loop."""

    window: float = 300.0
    restarts: int = 3
    times: deque[float] = field(default_factory=deque)

    def restarted(self, at: float) -> None:
        self.times.append(at)

    def count(self, now: float) -> int:
        while self.times and self.times[0] <= now - self.window:
            self.times.popleft()
        return len(self.times)

    def looping(self, now: float) -> bool:
        return self.count(now) >= self.restarts

    def clear(self) -> None:
        self.times.clear()


def error_lines(text: str, limit: int = ERROR_LINES) -> list[str]:
    """The last `limit` lines of a log that look like an error, shortened for a status line.
    A JSON log line with a traceback (`exc`) becomes its message and the traceback's last
    line, which names the exception."""
    found = []
    for line in text.splitlines():
        if not ERROR_LINE.search(line) or '"logger":"supervisor"' in line:
            continue
        found.append(_summary(line.strip())[:300])
    return found[-limit:]


def _summary(line: str) -> str:
    if not line.startswith("{"):
        return line
    try:
        entry = json.loads(line)
    except ValueError:
        return line
    if not isinstance(entry, dict):
        return line
    parts = [str(entry.get("msg", ""))]
    if entry.get("error"):
        parts.append(str(entry["error"]))
    if entry.get("exc"):
        parts.append(str(entry["exc"]).strip().splitlines()[-1])
    return ": ".join(p for p in parts if p) or line


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _describe_exit(code: int) -> tuple[int | None, str | None]:
    """Popen's returncode as (exit code, signal name): negative means killed by a signal."""
    if code < 0:
        try:
            return None, signal.Signals(-code).name
        except ValueError:
            return None, f"signal {-code}"
    return code, None


def _die_with_parent(parent: int) -> None:
    """In the child before exec: the default signal mask back, and SIGKILL when the
    supervisor dies, so that no orphaned service keeps the port and the transactional id
    while a new supervisor starts another (a kill is what the stages are built to survive)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WAITED_SIGNALS)
    with contextlib.suppress(Exception):  # not Linux: the child merely outlives us
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


class Supervisor:
    def __init__(
        self,
        name: str,
        argv: list[str],
        state_file: Path,
        log_file: Path | None = None,
        backoff: Backoff | None = None,
        crash_loop: CrashLoop | None = None,
        stop_timeout: float = 25.0,
    ):
        self.name, self.argv, self.state_file, self.log_file = name, argv, state_file, log_file
        self.backoff = backoff or Backoff()
        self.crash_loop = crash_loop or CrashLoop()
        # Below ManagedProcess.stop's 30 s: the child is killed by us, with its exit recorded.
        self.stop_timeout = stop_timeout
        self.child: subprocess.Popen[bytes] | None = None
        self.child_started = 0.0  # monotonic
        self.log_offset = 0  # where the running child's output starts in the log
        self.healthy_run = False  # the running child has lasted backoff.reset_after
        self.stopping_since: float | None = None
        self.state: dict[str, Any] = {
            "name": name,
            "supervisor_pid": os.getpid(),
            "pid": None,
            "state": "starting",
            "starts": 0,
            "restarts": 0,
            "started_at": None,
            "last_exit_code": None,
            "last_exit_signal": None,
            "last_exit_at": None,
            "last_error": [],
            "next_start_in_s": None,
            "crash_looping": False,
            "restarts_in_window": 0,
            "crash_window_s": self.crash_loop.window,
        }

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, WAITED_SIGNALS)
        next_start: float | None = time.monotonic()
        while True:
            now = time.monotonic()
            if self.child is None and next_start is not None and now >= next_start:
                self._start_child()
                next_start = None
            received = signal.sigtimedwait(WAITED_SIGNALS, self._wait_s(next_start))
            if received is not None and received.si_signo in STOP_SIGNALS:
                if self.child is None:
                    log.info("stopped while waiting to restart", extra={"signal": received.si_signo})
                    self._write(state="stopped", pid=None, next_start_in_s=None)
                    return 0
                self._stop(received.si_signo)
            if self.child is not None and self.child.poll() is not None:
                done, exit_code, next_start = self._child_exited(self.child.returncode)
                if done:
                    return exit_code
            self._check_stop_deadline()
            if self.child is not None:
                self._check_run_length()

    def _wait_s(self, next_start: float | None) -> float:
        now = time.monotonic()
        waits = [1.0]  # at least once a second: crash-loop window, run length, stop deadline
        if next_start is not None:
            waits.append(next_start - now)
        return max(0.0, min(waits))

    def _start_child(self) -> None:
        restarts = self.state["restarts"]
        self.log_offset = self._log_size()
        env = {**os.environ, "PIPELINE_RESTARTS": str(restarts)}
        parent = os.getpid()
        self.child = subprocess.Popen(
            self.argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=lambda: _die_with_parent(parent)
        )
        self.child_started = time.monotonic()
        self.healthy_run = False
        log.info("service started", extra={"pid": self.child.pid, "restarts": restarts})
        self._write(
            state="running",
            pid=self.child.pid,
            starts=self.state["starts"] + 1,
            started_at=_now_iso(),
            next_start_in_s=None,
        )

    def _stop(self, signo: int) -> None:
        assert self.child is not None
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            log.info("stopping service", extra={"pid": self.child.pid, "signal": signal.Signals(signo).name})
            self._write(state="stopping")
        # Also when the child got it already (a process-group signal): stopping is idempotent.
        with contextlib.suppress(ProcessLookupError):
            self.child.send_signal(signo)

    def _check_stop_deadline(self) -> None:
        if self.child is None or self.stopping_since is None:
            return
        if time.monotonic() - self.stopping_since > self.stop_timeout:
            log.warning("service did not stop in time, killing it", extra={"pid": self.child.pid})
            with contextlib.suppress(ProcessLookupError):
                self.child.kill()

    def _check_run_length(self) -> None:
        now = time.monotonic()
        self._note_healthy_run(now)
        looping = self.crash_loop.looping(now)
        count = self.crash_loop.count(now)
        if looping != self.state["crash_looping"] or count != self.state["restarts_in_window"]:
            self._write(crash_looping=looping, restarts_in_window=count)

    def _note_healthy_run(self, now: float) -> None:
        """A run that has lasted backoff.reset_after was a healthy one: the next crash
        starts the backoff over and is not part of a crash loop."""
        if not self.healthy_run and now - self.child_started >= self.backoff.reset_after:
            self.healthy_run = True
            self.backoff.reset()
            self.crash_loop.clear()

    def _child_exited(self, returncode: int) -> tuple[bool, int, float | None]:
        """Records the exit; returns (supervisor done, its exit code, when to restart)."""
        code, signame = _describe_exit(returncode)
        errors = self._errors_since_start()
        exit_fields = {
            "pid": None,
            "last_exit_code": code,
            "last_exit_signal": signame,
            "last_exit_at": _now_iso(),
            "last_error": errors or self.state["last_error"],
        }
        self.child = None
        if self.stopping_since is not None:
            log.info("service stopped", extra={"exit_code": code, "signal": signame})
            self._write(state="stopped", **{**exit_fields, "last_error": self.state["last_error"]})
            return True, 0, None
        # A bad setting at the first start is final (make up fails fast); after a restart it
        # is the environment changing under the service (e.g. an SVID being rewritten): retry.
        if code == 0 or (code in NOT_RESTARTED and self.state["starts"] == 1):
            why = "stopped cleanly" if code == 0 else "refused its settings"
            log.warning(f"service {why}; not restarting", extra={"exit_code": code})
            self._write(state="stopped" if code == 0 else "failed", **exit_fields)
            return True, code or 0, None
        now = time.monotonic()
        self._note_healthy_run(now)  # it may have lasted long enough since the last check
        delay = self.backoff.next_delay()
        self.crash_loop.restarted(now)
        self.state["restarts"] += 1
        log.warning(
            "service exited, restarting",
            extra={
                "exit_code": code,
                "signal": signame,
                "restart_in_s": delay,
                "restarts": self.state["restarts"],
            },
        )
        self._write(
            state="backoff",
            next_start_in_s=delay,
            crash_looping=self.crash_loop.looping(now),
            restarts_in_window=self.crash_loop.count(now),
            **exit_fields,
        )
        return False, 0, now + delay

    # ---- files ------------------------------------------------------------------------

    def _log_size(self) -> int:
        if self.log_file is None:
            return 0
        sys.stderr.flush()  # our own "started" line belongs before the child's output
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def _errors_since_start(self) -> list[str]:
        if self.log_file is None:
            return []
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(self.log_offset, f.seek(0, os.SEEK_END) - MAX_SCAN_BYTES))
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return error_lines(text)

    def _write(self, **changes: Any) -> None:
        self.state.update(changes, updated_at=_now_iso())
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state_file.with_name(self.state_file.name + ".tmp")
        partial.write_text(json.dumps(self.state, indent=2) + "\n")
        os.replace(partial, self.state_file)  # readers never see half a file


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--" not in args:
        print("usage: python -m deploy.local.supervisor [options] -- command ...", file=sys.stderr)
        return 2
    split = args.index("--")
    own, command = args[:split], args[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.supervisor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--name", required=True, help="the service's name, for logs and the state file")
    parser.add_argument("--state-file", type=Path, required=True)
    parser.add_argument("--log-file", type=Path, help="where the service's output goes, for its last errors")
    parser.add_argument("--backoff-initial", type=float, default=1.0, metavar="S")
    parser.add_argument("--backoff-max", type=float, default=30.0, metavar="S")
    parser.add_argument(
        "--reset-after", type=float, default=60.0, metavar="S", help="a run this long resets the backoff"
    )
    parser.add_argument("--crash-window", type=float, default=300.0, metavar="S")
    parser.add_argument(
        "--crash-restarts", type=int, default=3, help="restarts within the window that make a crash loop"
    )
    parser.add_argument("--stop-timeout", type=float, default=25.0, metavar="S")
    opts = parser.parse_args(own)
    if not command:
        parser.error("no command after --")
    setup_logging(opts.name)
    supervisor = Supervisor(
        opts.name,
        command,
        opts.state_file,
        opts.log_file,
        Backoff(opts.backoff_initial, opts.backoff_max, opts.reset_after),
        CrashLoop(opts.crash_window, opts.crash_restarts),
        opts.stop_timeout,
    )
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
