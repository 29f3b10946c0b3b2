"""Test helpers for users' own code: see what was committed, like structlog's capture_logs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alchemium.events.dispatch import watch_commits
from alchemium.events.event import DomainEvent

__all__ = ["capture_events"]


@contextmanager
def capture_events() -> Iterator[list[DomainEvent]]:
    """Yield a list that receives every event committed inside the block, in commit order.

    Events of units of work that roll back never appear. Works for units of work
    run in the block's task and in tasks it starts (the capture is a context variable).
    """
    captured: list[DomainEvent] = []
    with watch_commits(captured.extend):
        yield captured
