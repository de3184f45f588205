"""The sample users seeded by migration 0002 (generators and tests must agree with it)."""

from __future__ import annotations

SAMPLE_USER_COUNT = 1000
FIRST_TEST_USER = 951  # u00951 .. u01000 are test users


def sample_user_id(n: int) -> str:
    return f"u{n:05d}"


def tier_of(n: int) -> str:
    return "free" if n % 10 < 6 else "pro" if n % 10 < 9 else "enterprise"
