"""Reading the dashboard's query and form parameters: strict, typed, with 400s that explain.

Every endpoint names the parameters it takes; any other one is refused (a typo in a
filter must not silently show every row). An empty value (an empty field of an HTML
form) counts as absent.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from alchemium.dashboard.errors import InvalidParameterError, UnknownResourceError
from alchemium.events.outbox_admin import DeadSelection

__all__ = [
    "MAX_PER_PAGE",
    "Page",
    "Params",
    "check_page",
    "parse_event_id",
]

MAX_PER_PAGE = 500
SELECTION_FIELDS = ("destination", "name", "aggregate_type", "aggregate_id")


@dataclass(frozen=True, slots=True)
class Page:
    """A page of a listing: 1-based ``number`` of ``size`` rows."""

    number: int
    size: int

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size


class Params:
    """The parameters of one request, checked against the names the endpoint takes."""

    def __init__(self, values: Mapping[str, str], allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise InvalidParameterError(
                unknown[0], f"not a parameter of this page (expected one of: {_names(allowed)})"
            )
        self._values = {k: v.strip() for k, v in values.items() if v.strip() != ""}

    def text(self, name: str, *, max_length: int = 200) -> str | None:
        value = self._values.get(name)
        if value is not None and len(value) > max_length:
            raise InvalidParameterError(name, f"at most {max_length} characters")
        return value

    def integer(self, name: str, default: int, *, low: int, high: int | None = None) -> int:
        raw = self._values.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError as err:
            raise InvalidParameterError(name, f"expected a whole number, got {raw!r}") from err
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise InvalidParameterError(name, f"expected a number {bound}, got {value}")
        return value

    def time(self, name: str) -> dt.datetime | None:
        """An ISO 8601 date or time; without an offset it is UTC."""
        raw = self._values.get(name)
        if raw is None:
            return None
        try:
            value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError as err:
            raise InvalidParameterError(
                name, f"expected an ISO 8601 time such as 2024-05-01T12:00:00Z, got {raw!r}"
            ) from err
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)

    def page(self, *, default_size: int = 50) -> Page:
        return Page(
            self.integer("page", 1, low=1),
            self.integer("per_page", default_size, low=1, high=MAX_PER_PAGE),
        )

    def selection(self) -> DeadSelection:
        """The dead-letter filter: destination, event name, aggregate type and id."""
        fields = {name: self.text(name) for name in SELECTION_FIELDS}
        return DeadSelection(**fields)


def parse_event_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError as err:
        raise InvalidParameterError(
            "event_id", f"expected a UUID such as 1b4e28ba-2fa1-11d2-883f-0016d3cca427, got {raw!r}"
        ) from err


def check_page(page: Page, rows: int, total: int | None = None) -> None:
    """Refuse a page past the end: a later page than the first with no row on it."""
    if page.number > 1 and rows == 0:
        pages = "" if total is None else f"; there {_pages(total, page.size)}"
        raise UnknownResourceError(f"page {page.number} is past the end{pages}")


def _pages(total: int, size: int) -> str:
    count = max(1, -(-total // size))
    return f"is 1 page of {size}" if count == 1 else f"are {count} pages of {size}"


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"
