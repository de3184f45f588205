"""A service's logs: JSON lines, and HTTP clients' per-request lines left out."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from services.common.logs import setup_logging


@pytest.fixture(autouse=True)
def root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_http_clients_log_warnings_but_not_each_request(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("storage", "INFO")
    for name in ("httpx", "elastic_transport.transport"):
        logging.getLogger(name).info("PUT https://es/_bulk [status:200]")
        logging.getLogger(name).warning("node unreachable")
    logging.getLogger("services.storage").info("sink running")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["logger"], e["msg"]) for e in lines] == [
        ("httpx", "node unreachable"),
        ("elastic_transport.transport", "node unreachable"),
        ("services.storage", "sink running"),
    ]
