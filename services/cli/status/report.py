"""What status finds: one check per component, and the report that gathers them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.cli.settings import EXIT_FAILURE, EXIT_OK
from services.cli.status.lag import GroupLag
from services.cli.status.rates import ServiceRates


@dataclass
class Check:
    """One component's answer: ok, or what is wrong with it (detail)."""

    name: str
    ok: bool
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DlqTotals:
    total: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    by_stage: dict[str, int] = field(default_factory=dict)
    partial: bool = False  # stopped at the time limit: counts of what was read by then
    error: str | None = None
    skipped: str | None = None  # not read because Kafka is down: that is the problem, not this


@dataclass
class StoreCount:
    store: str  # postgres, lake, search
    what: str  # rows in events, objects under events/, documents in events-*
    count: int | None = None
    note: str | None = None  # an expected absence, e.g. no events table yet: not a problem
    error: str | None = None
    skipped: str | None = None  # not counted because the store is down (reported there)


@dataclass
class Report:
    checked_at: datetime
    components: list[Check]
    groups: list[GroupLag]
    groups_error: str | None  # the offsets could not be read at all
    groups_skipped: str | None  # not read because Kafka is down
    rates: list[ServiceRates]
    dlq: DlqTotals
    stores: list[StoreCount]

    def problems(self) -> list[str]:
        """Everything that is not fine, one line each; empty means exit 0."""
        found = [f"{c.name}: {c.detail}" for c in self.components if not c.ok]
        if self.groups_error:
            found.append(f"consumer groups: {self.groups_error}")
        found += [f"group {g.group}: {g.error}" for g in self.groups if g.error]
        found += [f"{r.service} metrics: {r.error}" for r in self.rates if r.error]
        if self.dlq.error:
            found.append(f"dlq: {self.dlq.error}")
        found += [f"{s.store} count: {s.error}" for s in self.stores if s.error]
        return found

    def exit_code(self) -> int:
        return EXIT_FAILURE if self.problems() else EXIT_OK
