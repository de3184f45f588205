"""One real native stack per test session, on free ports in its own state directory.

It never collides with a `make up` stack. Tests keep out of each other's way by using
their own topics, roles and ids.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.stack import Stack, free_ports

# Short broker-side decision cache, so runtime policy changes show within a second or two.
TEST_AUTHZ_CACHE_SECONDS = 1


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="pipeline-test-stack-"))
    test_stack = Stack(
        root,
        ports=free_ports(),
        authz_cache_seconds=TEST_AUTHZ_CACHE_SECONDS,
        service_env={"PIPELINE_LAKE_FLUSH_SECONDS": "2"},  # tests should not wait for the lake
    )
    try:
        test_stack.up(log=lambda line: print(f"[stack] {line}"))
        yield test_stack
    finally:
        test_stack.down(log=lambda line: None)
        if os.environ.get("PIPELINE_KEEP_TEST_STACK"):  # to read its logs after a failure
            print(f"[stack] kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
