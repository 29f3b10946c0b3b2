"""Reading what an action request asks for: a form of a page, or the JSON body of the API.

A page posts one row (``row``), the checked rows (``ids``) or a selection (``scope=
selection`` with the filter fields and ``expected``, the count the operator saw); the
API posts ``{"ids": [...]}`` or ``{"selection": {...}, "expected": N}``. Anything else
is an :class:`InvalidParameterError` naming the field, before the database is asked.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from alchemium.dashboard.errors import InvalidParameterError, UnsupportedMediaError
from alchemium.dashboard.params import SELECTION_FIELDS, Params
from alchemium.dashboard.security import CSRF_FIELD
from alchemium.events.outbox_admin import DeadSelection

__all__ = [
    "ActionRequest",
    "one",
    "parse_form_action",
    "parse_json_action",
    "read_form",
    "read_json",
]

MAX_BODY_BYTES = 1 << 20
MAX_IDS = 10_000

ActionRequest = tuple["list[int] | None", "DeadSelection | None", "int | None"]
"""``(ids, selection, expected)``: either ids, or a selection with the expected count."""


async def read_form(request: Request) -> dict[str, list[str]]:
    """An url-encoded form body (what the pages send), as lists of values per field."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise UnsupportedMediaError("send the form as application/x-www-form-urlencoded")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise InvalidParameterError("body", f"at most {MAX_BODY_BYTES} bytes")
    form: dict[str, list[str]] = {}
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=MAX_IDS + 20)
    except (UnicodeDecodeError, ValueError) as err:
        raise InvalidParameterError("body", f"not a readable form: {err}") from err
    for key, value in pairs:
        form.setdefault(key, []).append(value)
    return form


def one(form: dict[str, list[str]], key: str) -> str | None:
    values = form.get(key)
    return values[-1] if values else None


def _positive(raw: Any, name: str) -> int:
    if isinstance(raw, bool):
        raise InvalidParameterError(name, f"expected delivery ids (whole numbers), got {raw!r}")
    try:
        value = int(raw)
    except (TypeError, ValueError) as err:
        raise InvalidParameterError(name, f"expected a delivery id, got {raw!r}") from err
    if value < 1 or (isinstance(raw, float)):
        raise InvalidParameterError(name, f"expected a delivery id of 1 or more, got {raw!r}")
    return value


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidParameterError("body", f"at most {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise InvalidParameterError("body", f"not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise InvalidParameterError("body", "expected a JSON object")
    return body


def parse_json_action(
    body: dict[str, Any],
) -> tuple[list[int] | None, DeadSelection | None, int | None]:
    """``{"ids": [...]}`` or ``{"selection": {...}, "expected": N}``."""
    unknown = sorted(set(body) - {"ids", "selection", "expected"})
    if unknown:
        raise InvalidParameterError(unknown[0], "expected 'ids', or 'selection' and 'expected'")
    if ("ids" in body) == ("selection" in body):
        raise InvalidParameterError("ids", "give either 'ids' or 'selection' (with 'expected')")
    if "ids" in body:
        raw = body["ids"]
        if not isinstance(raw, list) or not raw or len(raw) > MAX_IDS:
            raise InvalidParameterError("ids", f"expected a list of 1 to {MAX_IDS} delivery ids")
        if "expected" in body:
            raise InvalidParameterError("expected", "only with 'selection'")
        return [_positive(v, "ids") for v in raw], None, None
    raw_selection = body["selection"]
    if not isinstance(raw_selection, dict):
        raise InvalidParameterError("selection", f"expected an object with {SELECTION_FIELDS}")
    for key, value in raw_selection.items():
        if key not in SELECTION_FIELDS:
            raise InvalidParameterError(f"selection.{key}", f"expected one of {SELECTION_FIELDS}")
        if value is not None and not isinstance(value, str):
            raise InvalidParameterError(f"selection.{key}", f"expected a string, got {value!r}")
    expected = body.get("expected")
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidParameterError(
            "expected", "the number of dead rows the selection matched when you looked (0 or more)"
        )
    return None, DeadSelection(**raw_selection), expected


def parse_form_action(form: dict[str, list[str]]) -> ActionRequest:
    """What a page's action form asks for (its CSRF token is checked by the caller)."""
    allowed = {CSRF_FIELD, "row", "ids", "scope", "next", "expected", *SELECTION_FIELDS}
    unknown = sorted(set(form) - allowed)
    if unknown:
        raise InvalidParameterError(unknown[0], "not a field of the action form")
    row = one(form, "row")
    if row:
        return [_positive(row, "row")], None, None
    if one(form, "scope") == "selection":
        values = {k: one(form, k) or "" for k in (*SELECTION_FIELDS, "expected")}
        params = Params(values, (*SELECTION_FIELDS, "expected"))
        expected = params.integer("expected", -1, low=0)
        if expected < 0:
            raise InvalidParameterError("expected", "how many rows the selection showed")
        return None, params.selection(), expected
    ids = [_positive(v, "ids") for v in form.get("ids", [])]
    if not ids:
        raise InvalidParameterError("ids", "select at least one dead letter")
    return ids, None, None
