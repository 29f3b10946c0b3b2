"""pytest fixtures for users' own tests, loaded automatically when alchemium is installed.

``captured_events`` is :func:`alchemium.events.capture_events` as a fixture;
``captured_on_commit`` is :func:`alchemium.events.capture_on_commit` (collects the
``on_commit`` callbacks of committed units of work instead of running them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from alchemium.domain_event import DomainEvent
from alchemium.events.testing import capture_events, capture_on_commit

__all__ = ["captured_events", "captured_on_commit"]


@pytest.fixture
def captured_events() -> Iterator[list[DomainEvent]]:
    """The events committed during the test, in commit order."""
    with capture_events() as events:
        yield events


@pytest.fixture
def captured_on_commit() -> Iterator[list[Callable[[], Any]]]:
    """The ``on_commit`` callbacks of units of work committed during the test, not run."""
    with capture_on_commit() as callbacks:
        yield callbacks
