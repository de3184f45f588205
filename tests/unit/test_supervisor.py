"""The supervisor of the native stack's services: backoff, crash loops, the state file,
signals, and PipelineService killing only the service under it. Real processes, with
timings scaled down; every wait is for a condition, with a deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploy.local.components import PipelineService
from deploy.local.processes import alive
from deploy.local.supervisor import Backoff, CrashLoop, error_lines

REPO = Path(__file__).resolve().parents[2]
# A stand-in service: records each start (pid, PIPELINE_RESTARTS), then behaves as told.
CHILD = """
import os, signal, sys, time
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]

def terminated(*_):
    (out / "terminated").write_text(str(os.getpid()))
    sys.exit(0)

signal.signal(signal.SIGTERM, terminated)
with open(out / "starts", "a") as f:
    f.write(f"{os.getpid()} {os.environ.get('PIPELINE_RESTARTS')}\\n")
if mode == "crash":
    print('{"level":"info","msg":"starting"}', flush=True)
    print("Traceback (most recent call last):\\n  File \\"x.py\\", line 1\\nValueError: boom", file=sys.stderr)
    sys.exit(3)
if mode == "exit":
    sys.exit(int(sys.argv[3]))
if mode == "crash-then-exit":  # the first start crashes, the later ones exit with argv[3]
    sys.exit(3 if len((out / "starts").read_text().splitlines()) == 1 else int(sys.argv[3]))
if mode == "slow-crash":
    time.sleep(float(sys.argv[3]))
    sys.exit(3)
while True:
    signal.pause()
"""


def eventually(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


class Run:
    """One supervisor process over the stand-in service, in tmp_path."""

    def __init__(self, tmp_path: Path, *child_args: str, options: tuple[str, ...] = ()):
        self.dir = tmp_path
        self.state_file = tmp_path / "run" / "svc.supervisor.json"
        self.log_file = tmp_path / "svc.log"
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        argv = [
            sys.executable, "-m", "deploy.local.supervisor", "--name=svc",
            f"--state-file={self.state_file}", f"--log-file={self.log_file}",
            "--backoff-initial=0.05", "--backoff-max=0.4", *options,
            "--", sys.executable, str(script), str(tmp_path), *child_args,
        ]  # fmt: skip
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}

    def starts(self) -> list[tuple[int, str]]:
        try:
            lines = (self.dir / "starts").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [(int(pid), restarts) for pid, restarts in (line.split() for line in lines)]

    def delays(self) -> list[float]:
        """The backoff of each restart, as the supervisor logged it."""
        entries = [
            json.loads(line) for line in self.log_file.read_text().splitlines() if line.startswith("{")
        ]
        return [e["restart_in_s"] for e in entries if e.get("msg") == "service exited, restarting"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture
def runs() -> Any:
    started: list[Run] = []
    yield started
    for run in started:
        run.close()


# ---- pure logic -------------------------------------------------------------------------


def test_backoff_doubles_to_its_maximum_and_resets() -> None:
    backoff = Backoff(initial=1, maximum=30)
    assert [backoff.next_delay() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    backoff.reset()
    assert backoff.next_delay() == 1


def test_three_restarts_within_the_window_are_a_crash_loop() -> None:
    loop = CrashLoop(window=300, restarts=3)
    for at in (0, 100, 200):
        assert not loop.looping(at)
        loop.restarted(at)
    assert loop.looping(250)
    assert loop.count(250) == 3
    assert not loop.looping(301)  # the first one left the window
    loop.restarted(310)
    assert loop.looping(320)
    loop.clear()
    assert not loop.looping(320)


def test_error_lines_pick_tracebacks_and_error_records() -> None:
    log = "\n".join(
        [
            '{"level":"info","logger":"x","msg":"stage running"}',
            '{"level":"warning","logger":"supervisor","msg":"service exited","error":"ValueError"}',
            '{"level":"error","logger":"services","msg":"ingester crashed","exc":"Traceback (most recent'
            ' call last):\\n  File \\"a.py\\"\\nKafkaException: broker gone"}',
            "Traceback (most recent call last):",
            '  File "b.py", line 3',
            "ValueError: boom",
        ]
    )
    assert error_lines(log) == [
        "ingester crashed: KafkaException: broker gone",
        "Traceback (most recent call last):",
        "ValueError: boom",
    ]
    assert error_lines("\n".join(f"RuntimeError: {i}" for i in range(9))) == [
        f"RuntimeError: {i}" for i in range(4, 9)
    ]


# ---- the supervisor as a process ---------------------------------------------------------


def test_a_crashing_service_is_restarted_with_growing_backoff_until_a_crash_loop(
    tmp_path: Path, runs: list[Run]
) -> None:
    run = Run(tmp_path, "crash")
    runs.append(run)
    state = eventually(lambda: run.state().get("restarts", 0) >= 4 and run.state(), 20, "four restarts")
    assert state["crash_looping"] is True
    assert state["last_exit_code"] == 3 and state["last_exit_signal"] is None
    assert state["last_error"] == ["Traceback (most recent call last):", "ValueError: boom"]
    assert state["supervisor_pid"] == run.process.pid
    assert run.delays()[:4] == [0.05, 0.1, 0.2, 0.4]
    assert run.delays()[4:6] in ([], [0.4], [0.4, 0.4])  # the maximum
    # Each start is told how often the service was restarted before it.
    assert [restarts for _, restarts in run.starts()[:4]] == ["0", "1", "2", "3"]


def test_a_run_longer_than_reset_after_resets_the_backoff_and_the_crash_loop(
    tmp_path: Path, runs: list[Run]
) -> None:
    run = Run(tmp_path, "slow-crash", "0.3", options=("--reset-after=0.2",))
    runs.append(run)
    state = eventually(lambda: run.state().get("restarts", 0) >= 4 and run.state(), 20, "four restarts")
    assert state["crash_looping"] is False
    assert set(run.delays()) == {0.05}


def test_a_killed_service_is_restarted_and_its_signal_recorded(tmp_path: Path, runs: list[Run]) -> None:
    run = Run(tmp_path, "serve")
    runs.append(run)
    first = eventually(lambda: run.starts() and run.state().get("pid"), 10, "service running")
    os.kill(first, signal.SIGKILL)
    second = eventually(
        lambda: (pid := run.state().get("pid")) not in (None, first) and pid, 10, "service running again"
    )
    state = run.state()
    assert (state["restarts"], state["starts"], state["last_exit_signal"]) == (1, 2, "SIGKILL")
    assert not state["crash_looping"]
    assert eventually(lambda: len(run.starts()) == 2 and run.starts(), 10, "second start recorded") == [
        (first, "0"),
        (second, "1"),
    ]


def test_sigterm_stops_the_service_and_the_supervisor_without_a_restart(
    tmp_path: Path, runs: list[Run]
) -> None:
    run = Run(tmp_path, "serve")
    runs.append(run)
    child = eventually(lambda: run.starts() and run.state().get("pid"), 10, "service running")
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(10) == 0
    assert (tmp_path / "terminated").read_text() == str(child)  # the service got SIGTERM itself
    state = run.state()
    assert (state["state"], state["restarts"], state["pid"]) == ("stopped", 0, None)
    assert len(run.starts()) == 1


def test_a_process_group_sigterm_as_make_down_sends_stops_everything(tmp_path: Path, runs: list[Run]) -> None:
    service = PipelineService(tmp_path, "svc", 0)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # As PipelineService.start does, with the stand-in service instead of services.<name>.
    service.process.start(
        [
            sys.executable, "-m", "deploy.local.supervisor", "--name=svc",
            f"--state-file={service.state_file}", f"--log-file={service.process.log_file}",
            "--backoff-initial=0.05", "--", sys.executable, str(script), str(tmp_path), "serve",
        ],
        cwd=REPO,
    )  # fmt: skip
    try:
        child = eventually(lambda: service.service_pid, 10, "service running under the supervisor")
        assert child != service.process.pid
        killed = service.kill_service()  # only the service: the supervisor restarts it
        assert killed == child and not alive(child)
        again = eventually(lambda: service.service_pid, 10, "service restarted")
        assert again != child and service.process.running()
        assert service.supervisor_state()["restarts"] == 1  # type: ignore[index]
        started = time.monotonic()
        service.process.stop(timeout=10)
        assert time.monotonic() - started < 5
        assert not alive(again) and not service.process.running()
        assert (tmp_path / "terminated").read_text() == str(again)  # a graceful stop, not a kill
    finally:
        service.process.kill()


@pytest.mark.parametrize(("code", "state"), [(0, "stopped"), (2, "failed")])
def test_a_clean_exit_or_a_settings_error_is_not_restarted(
    tmp_path: Path, runs: list[Run], code: int, state: str
) -> None:
    run = Run(tmp_path, "exit", str(code))
    runs.append(run)
    assert run.process.wait(10) == code
    saved = run.state()
    assert (saved["state"], saved["restarts"], saved["last_exit_code"]) == (state, 0, code)
    assert len(run.starts()) == 1


def test_a_settings_error_after_a_restart_is_retried(tmp_path: Path, runs: list[Run]) -> None:
    """Exit 2 is final only at the first start: after a crash it means the environment
    changed under the service (e.g. an SVID half rewritten), which a later start may not see."""
    run = Run(tmp_path, "crash-then-exit", "2", options=("--backoff-initial=0.05", "--backoff-max=0.1"))
    runs.append(run)
    eventually(lambda: len(run.starts()) >= 3, 10, "restarted after exit 2")
    assert run.process.poll() is None


def test_the_service_dies_with_its_supervisor(tmp_path: Path, runs: list[Run]) -> None:
    run = Run(tmp_path, "serve")
    runs.append(run)
    child = eventually(lambda: run.state().get("pid"), 10, "service running")
    run.process.kill()
    run.process.wait(10)
    eventually(lambda: not alive(child), 10, "no orphaned service")
