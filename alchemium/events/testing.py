"""Test helpers for users' own code: see what was committed, like structlog's capture_logs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from alchemium.domain_event import DomainEvent
from alchemium.events.dispatch import watch_commits
from alchemium.uow import Commit, UnitOfWork, UnitOfWorkHooks, add_hooks

__all__ = ["capture_events", "capture_on_commit"]


@contextmanager
def capture_events() -> Iterator[list[DomainEvent]]:
    """Yield a list that receives every event committed inside the block, in commit order.

    Events of units of work that roll back never appear. Works for units of work
    run in the block's task and in tasks it starts (the capture is a context variable).
    """
    captured: list[DomainEvent] = []
    with watch_commits(captured.extend):
        yield captured


_on_commit: ContextVar[tuple[list[Callable[[], Any]], bool] | None] = ContextVar(
    "alchemium_on_commit_capture", default=None
)


@contextmanager
def capture_on_commit(*, execute: bool = False) -> Iterator[list[Callable[[], Any]]]:
    """Yield a list that receives the ``on_commit`` callbacks of units of work committed inside.

    With ``execute=False`` (the default) they are collected instead of run, so a test
    can look at them and call them itself (an async callback returns a coroutine to
    await); with ``execute=True`` they also run as usual. Callbacks of units of work
    (or savepoints) that roll back never appear.
    """
    captured: list[Callable[[], Any]] = []
    token = _on_commit.set((captured, execute))
    try:
        yield captured
    finally:
        _on_commit.reset(token)


class _OnCommitCapture(UnitOfWorkHooks):
    """Hands a committed unit of work's ``on_commit`` callbacks to the active capture.

    Its ``after_commit`` runs before the unit of work runs the callbacks; with
    ``execute=False`` it takes them, so they do not run.
    """

    async def after_commit(self, uow: UnitOfWork, commit: Commit) -> None:
        capture = _on_commit.get()
        if capture is None or not commit.callbacks:
            return
        captured, execute = capture
        captured.extend(commit.callbacks)
        if not execute:
            commit.callbacks.clear()


add_hooks(_OnCommitCapture())
