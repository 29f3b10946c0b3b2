"""Awaiting what must not be abandoned half-way: COMMIT, ROLLBACK, close.

``uncancellable(awaitable)`` finishes the awaitable even when its task is cancelled
meanwhile, and re-raises the cancellation afterwards: like ``asyncio.shield`` around a
task, but run inline in the caller's task (no extra task, no extra event loop
iterations on the common, uncancelled path).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

__all__ = ["uncancellable"]

T = TypeVar("T")


class _Shielded:
    """What the task waits on while ``uncancellable`` runs: the awaited future, uncancellable.

    ``Task.cancel()`` cancels the future its task waits on. This proxy refuses
    (``cancel`` returns False), so the task instead throws CancelledError at its next
    step, after the future has completed; ``uncancellable`` then records it and
    lets the awaitable go on. Everything else is the future's own.
    """

    __slots__ = ("_asyncio_future_blocking", "_future")

    def __init__(self, future: Any) -> None:
        self._future = future
        self._asyncio_future_blocking = True

    def get_loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop = self._future.get_loop()
        return loop

    def add_done_callback(self, fn: Callable[[Any], object], *, context: Any = None) -> None:
        self._future.add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        removed: int = self._future.remove_done_callback(fn)
        return removed

    def done(self) -> bool:
        done: bool = self._future.done()
        return done

    def result(self) -> Any:
        return self._future.result()

    def cancel(self, msg: Any = None) -> bool:
        return False


@types.coroutine
def uncancellable(
    awaitable: Awaitable[T], *, shield: Callable[[], bool] | None = None
) -> Generator[Any, None, T]:
    """Run ``awaitable`` to completion even if the caller is cancelled meanwhile.

    Used for COMMIT, ROLLBACK and close: abandoning them half-way would leave the
    connection in an unknown state or outside the pool. A cancellation received
    meanwhile is re-raised once the awaitable has finished (like ``asyncio.shield``
    around a task, but run inline in the caller's task: no extra task, no extra
    event loop iterations on the common, uncancelled path). With ``shield``, only
    the waits that begin while ``shield()`` is true are protected; a cancellation
    before that interrupts the awaitable as usual.
    """
    steps = awaitable.__await__()
    cancelled = False
    thrown: BaseException | None = None
    while True:
        try:
            yielded = steps.send(None) if thrown is None else steps.throw(thrown)
        except StopIteration as stop:
            result: T = stop.value
            break
        thrown = None
        future = yielded if getattr(yielded, "_asyncio_future_blocking", False) else None
        if future is not None and (shield is None or shield()):
            future._asyncio_future_blocking = False  # as the task would have done
            yielded = _Shielded(future)
        try:
            yield yielded
        except GeneratorExit:
            steps.close()
            raise
        except asyncio.CancelledError as err:
            if future is not None and future.cancelled():
                thrown = err  # the awaited future itself was cancelled: its caller decides
            else:
                cancelled = True  # our task was cancelled: finish first, raise afterwards
        except BaseException as err:  # noqa: BLE001 - the future's error, handed back to the awaitable
            thrown = err
    if cancelled:
        raise asyncio.CancelledError
    return result
