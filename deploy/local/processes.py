"""Local processes of the native stack: start in the background, find again, stop.

A process is known by its pid file under <stack>/run/, so `make down` in a new shell stops
what `make up` started; its output goes to <stack>/logs/<name>.log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Settings holding a secret (.stack/env has them: a shell that ran `make up` may have sourced
# it). No process the stack starts inherits them from that shell; it holds only those it is
# given (Stack.env_for): the broker or an ingester has no business with the lake's keys.
SECRET_SETTINGS = frozenset({"PIPELINE_PG_DSN", "PIPELINE_S3_ACCESS_KEY", "PIPELINE_S3_SECRET_KEY"})


class StackError(RuntimeError):
    """A component could not be installed, started or reached."""


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log yet)"


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    log: Path | None = None,
    interval: float = 0.25,
) -> None:
    """Poll `condition` until it holds; on timeout raise a StackError naming the log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except StackError:
            raise  # the condition found a hard failure (e.g. the process exited)
        except Exception:  # a probe failing is the same as "not yet"
            pass
        if time.monotonic() > deadline:
            where = f"\n--- last lines of {log} ---\n{log_tail(log)}" if log else ""
            raise StackError(f"{what} did not happen within {timeout:.0f}s{where}")
        time.sleep(interval)


def raise_exited(process: ManagedProcess) -> None:
    """A process that died while we waited for it to start: its log says why."""
    raise StackError(f"{process.name} exited during start; see {process.log_file}")


class ManagedProcess:
    def __init__(self, name: str, run_dir: Path, log_dir: Path, stop_signal: int = signal.SIGTERM):
        self.name = name
        self.pid_file = run_dir / f"{name}.pid"
        self.log_file = log_dir / f"{name}.log"
        self.stop_signal = stop_signal
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if alive(pid) else None

    def running(self) -> bool:
        return self.pid is not None

    def start(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
    ) -> None:
        # Logs may hold what a component saw (records in errors, paths, principals), pid files
        # and supervisor states what runs: the stack's user's only.
        for directory in (self.pid_file.parent, self.log_file.parent):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o700)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # also a log made by an older stack
        with os.fdopen(fd, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            log.flush()
            # A session of its own: the process outlives `make up` and ignores its Ctrl-C.
            self._popen = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**inherited_environment(), **(env or {})},
                cwd=cwd,
                start_new_session=True,
                user=user,
            )
        self.pid_file.write_text(str(self._popen.pid))

    def wait_healthy(
        self, healthy: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.25
    ) -> None:
        """Wait for `healthy()` after a start; a process that exits meanwhile fails at once,
        naming its log, instead of being waited on until the timeout."""

        def up_or_exited() -> bool:
            if self.exited():
                raise_exited(self)
            return healthy()

        wait_until(up_or_exited, timeout=timeout, what=what, log=self.log_file, interval=interval)

    def exited(self) -> bool:
        """True once a process this object started has died (e.g. bad config at start)."""
        return self._popen is not None and self._popen.poll() is not None

    def stop(self, timeout: float = 30.0) -> None:
        self._signal_and_wait(self.stop_signal, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def _signal_and_wait(self, sig: int, timeout: float) -> None:
        pid = self.pid
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        _signal_group(pid, sig)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        if alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while alive(pid):
                self._reap()
                time.sleep(0.1)
        self._reap()
        self.pid_file.unlink(missing_ok=True)

    def _reap(self) -> None:
        if self._popen is not None:
            self._popen.poll()


def inherited_environment() -> dict[str, str]:
    """Our environment without its secrets (SECRET_SETTINGS)."""
    return {k: v for k, v in os.environ.items() if k not in SECRET_SETTINGS}


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
