"""The health endpoints answer from their own thread, and say when the event loop stalls."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from services.common.health import HealthServer

PATHS = ("/healthz", "/readyz", "/metrics")


def test_endpoints_answer_while_the_loop_is_blocked_and_report_the_stall() -> None:
    async def scenario() -> tuple[dict[str, tuple[int, str]], int]:
        server = HealthServer("127.0.0.1", 0, lambda: (False, "waiting for opa"), stall_s=0.2)
        await server.start()
        url = f"http://127.0.0.1:{server.port}"
        answers: dict[str, tuple[int, str]] = {}

        def probe() -> None:
            # Wait (with a deadline) until the loop has been stuck for longer than stall_s.
            deadline = time.monotonic() + 10
            while time.monotonic() - server.last_beat < 0.5 and time.monotonic() < deadline:
                time.sleep(0.01)
            for path in PATHS:
                response = httpx.get(url + path, timeout=5)
                answers[path] = (response.status_code, response.text)

        try:
            await asyncio.sleep(0.05)
            prober = threading.Thread(target=probe)
            prober.start()
            prober.join(20)  # blocks the event loop, as a CPU-bound batch does
            deadline = time.monotonic() + 10
            while server.last_beat < time.monotonic() - 0.1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the loop turns again: its heartbeat resumes
            after = httpx.get(url + "/healthz", timeout=5).status_code
        finally:
            await server.close()
        return answers, after

    answers, after = asyncio.run(scenario())
    assert answers["/healthz"][0] == 503 and "stalled" in answers["/healthz"][1]
    assert answers["/readyz"] == (503, "waiting for opa\n")
    assert answers["/metrics"][0] == 200
    assert after == 200
