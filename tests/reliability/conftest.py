"""Counters shared by the reliability tests, printed as one summary at the end of the run."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

STATS: Counter[str] = Counter()

_ORDER = [
    "units_of_work",
    "faults_injected",
    "events_committed",
    "events_delivered",
    "events_duplicated",
    "events_lost",
    "connections_leaked",
]


@pytest.fixture
def stats() -> Counter[str]:
    """Add to these counters; the totals are printed after the run."""
    return STATS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not STATS:
        return
    terminalreporter.section("alchemium reliability summary")
    for key in [*_ORDER, *sorted(k for k in STATS if k not in _ORDER)]:
        terminalreporter.write_line(f"{key.replace('_', ' '):<22} {STATS.get(key, 0)}")


# Extra engines (one per relay) and a Redis server, shared with the relay tests.
from tests.events.relay_support import new_engine, redis_server  # noqa: E402, F401
