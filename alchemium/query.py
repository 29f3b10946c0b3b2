"""Building the SELECTs of a repository: filtered reads, the statement cache, keyset pages.

What ``CrudRepository`` sends to the database for reads, beside the filter language
it is built from (:mod:`alchemium.filters`): the statement of a filtered read, the
cache that reuses it for flat filter dicts, primary key predicates, and keyset
pagination (the "rows after this cursor" predicate and the cursor encoding). It
knows models (:mod:`alchemium.modelinfo`) and filters, never sessions or units of work.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    and_,
    any_,
    bindparam,
    false,
    or_,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import UnaryExpression
from sqlalchemy.sql.operators import asc_op, desc_op

from alchemium.encoding import decode_value, json_safe
from alchemium.errors import (
    DataValidationError,
    EventDecodeError,
    OrderByFieldError,
    PaginationParameterError,
    RepositoryUsageError,
)
from alchemium.filters import (
    OPERATORS,
    FilterSpec,
    OrderBySpec,
    RowScope,
    build_where,
    check_operand,
    eager_load_options,
    order_by_clauses,
    split_key,
)
from alchemium.modelinfo import ModelInfo

__all__ = [
    "cached_select",
    "check_int",
    "decode_cursor",
    "encode_cursor",
    "keyset_after",
    "keyset_keys",
    "pk_first",
    "pk_in",
    "pk_match",
    "pk_of",
    "pk_values",
    "select_rows",
]


def check_int(info: ModelInfo, name: str, value: object, minimum: int) -> int:
    """``value`` if it is an integer >= ``minimum`` (not a bool), else PaginationParameterError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PaginationParameterError(info.name, name, value, f"an integer >= {minimum}")
    return value


def select_rows(
    info: ModelInfo,
    filters: FilterSpec,
    *,
    scope: RowScope,
    order_by: OrderBySpec = None,
    joins: Iterable[str] | None = None,
) -> Select[Any]:
    """``SELECT model WHERE filters`` within ``scope``, with eager loads and ordering."""
    stmt = select(info.model).where(*build_where(info.model, filters, scope=scope))
    options = eager_load_options(info.model, joins, scope=scope)
    if options:
        stmt = stmt.options(*options)
    ordering = order_by_clauses(info.model, order_by)
    if ordering:
        stmt = stmt.order_by(*ordering)
    return stmt


def pk_of(info: ModelInfo, state: Any) -> Any:
    """The primary key of an object's state for messages: a value, or a tuple if composite."""
    if state.identity is not None:
        key = tuple(state.identity)
    else:
        key = tuple(state.dict.get(k) for k in info.primary_key)
    return key[0] if len(key) == 1 else key


def pk_values(info: ModelInfo, pk: Any) -> tuple[Any, ...]:
    """The primary key values in ``pk`` (a value, a tuple/list, or a dict by key name), checked.

    Every database gets the same answer for the same mistake: a value of the wrong
    type raises DataValidationError (PostgreSQL would refuse it, SQLite would look it up
    and find nothing), a wrong number of values or a dict naming other columns
    RepositoryUsageError, before anything is sent.
    """
    names = info.primary_key
    if isinstance(pk, Mapping):
        if set(pk) != set(names):
            raise RepositoryUsageError(
                f"{info.name} has the primary key ({', '.join(names)}); got a dict with "
                f"{', '.join(map(repr, pk)) or 'no keys'}: to look up by other columns, "
                "use get_one({...})"
            )
        values = tuple(pk[k] for k in names)
    elif isinstance(pk, (tuple, list)):
        values = tuple(pk)
    else:
        values = (pk,)
    if len(values) != len(names):
        raise RepositoryUsageError(
            f"{info.name} has a primary key of {len(names)} column(s) "
            f"({', '.join(names)}); got {pk!r}"
        )
    for name, value in zip(names, values, strict=True):
        if value is None:
            raise DataValidationError(
                f"{info.name}.{name}: a primary key value cannot be None",
                model=info.name,
                field=name,
            )
        info.check_value(name, value, what="primary key")
    return values


def pk_match(info: ModelInfo, pk: Any) -> list[ColumnElement[bool]]:
    """``pk_col = value`` clauses for ``pk``: a value, a tuple or a dict of key values."""
    values = pk_values(info, pk)
    return [info.columns[k] == value for k, value in zip(info.primary_key, values, strict=True)]


def keyset_keys(info: ModelInfo, order_by: Any) -> list[tuple[str, bool]]:
    """``(column name, descending)`` pairs for keyset pagination's ``order_by``.

    Takes column names (``"-created_at"``), model columns (``User.name``) and their
    ``.asc()``/``.desc()``, alone or in a list. Other expressions raise
    OrderByFieldError: a cursor must hold the value of each ordering column.
    """
    items = list(order_by) if isinstance(order_by, (list, tuple)) else [order_by]
    keys: list[tuple[str, bool]] = []
    for item in items:
        descending = False
        target = item
        if isinstance(item, UnaryExpression) and item.modifier in (desc_op, asc_op):
            descending = item.modifier is desc_op
            target = item.element
        name: str | None
        if isinstance(item, str):
            name, descending = item.lstrip("+-"), item.startswith("-")
        else:
            name = _column_name(info, target)
        if name is None or name not in info.columns:
            raise OrderByFieldError(
                info.name,
                item if isinstance(item, str) else str(item),
                info.columns,
            )
        keys.append((name, descending))
    return keys


def _column_name(info: ModelInfo, target: Any) -> str | None:
    """The attribute name of ``target`` if it is one of ``info``'s columns (``User.name``)."""
    column = getattr(target, "expression", target)
    compare = getattr(column, "compare", None)
    if compare is None:
        return None
    for name, candidate in info.columns.items():
        if compare(candidate):
            return name
    return None


# -- statement cache for flat filter dicts ----------------------------------------------------
#
# get_one() and list() with a plain dict of column filters build the same SELECT again
# and again with different values. The statement is built once per shape, with bind
# parameters for the values (and the tenant, offset and limit), and reused: SQLAlchemy
# then also reuses its cache key (memoized on the statement object) and compiled SQL.
# The key holds the model, its soft-delete/tenant configuration, include_deleted, the
# filter keys in order, the order_by names and the limit/offset shape, never a value.
# Each call still validates every value exactly as build_where does. Anything else
# (expressions, _or/_and/_not groups, relationship paths, values that are None, empty
# lists or not exactly of the column's Python type, order_by expressions, joins) is
# built uncached as before.

_CACHEABLE_OPS = frozenset({"eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in"})
_STMT_CACHE_SIZE = 512
_stmt_cache: dict[tuple[Any, ...], tuple[Select[Any], tuple[tuple[str, str, str, str], ...]]] = {}
_TENANT_PARAM = "alchemium_tenant"
_LIMIT_PARAM = "alchemium_limit"
_OFFSET_PARAM = "alchemium_offset"


def _cacheable_value(op: str, value: Any, expected: type | None) -> bool:
    """Whether ``value`` binds as the column's own type, so the cached clause is the same.

    Only values of exactly the column's Python type (no None, no empty list): for
    others SQLAlchemy may pick another bind type (``coerce_compared_value``) or
    another clause (IS NULL, false()).
    """
    if expected is None:
        return False
    if op in ("in", "not_in"):
        return (
            type(value) in (list, tuple)
            and len(value) > 0
            and all(type(v) is expected for v in value)
        )
    return type(value) is expected


def cached_select(
    info: ModelInfo,
    filters: FilterSpec,
    scope: RowScope,
    order_by: OrderBySpec,
    joins: Iterable[str] | None,
    *,
    skip: int | None = None,
    limit: int | None = None,
    fixed_limit: int | None = None,
) -> tuple[Select[Any], dict[str, Any]] | None:
    """The cached statement and its parameters for a flat filter dict, or None (build it)."""
    if joins or type(filters) is not dict:
        return None
    tenant_column = info.tenant_column
    if tenant_column is not None and not _cacheable_value(
        "eq", scope.tenant, info.python_types.get(tenant_column)
    ):
        return None
    if order_by is None or type(order_by) is str:
        order_key: Any = order_by
    elif type(order_by) in (list, tuple) and all(type(o) is str for o in order_by):
        order_key = tuple(order_by)
    else:
        return None
    key = (
        info.model,
        info.soft_delete_column,
        info.tenant_column,
        scope.include_deleted,
        tuple(filters),
        order_key,
        fixed_limit,
        skip is not None,
        limit is not None,
    )
    entry = _stmt_cache.get(key)
    if entry is None:
        entry = _build_cached(
            info, filters, scope, order_by, skip=skip, limit=limit, fixed_limit=fixed_limit
        )
        if entry is None:
            return None
        if len(_stmt_cache) >= _STMT_CACHE_SIZE:
            _stmt_cache.clear()
        _stmt_cache[key] = entry
    stmt, shape = entry
    params: dict[str, Any] = {}
    python_types = info.python_types
    for value, (name, key_, field, op) in zip(filters.values(), shape, strict=True):
        if not _cacheable_value(op, value, python_types.get(field)):
            return None
        check_operand(info, field, op, value, key_)
        params[name] = list(value) if op in ("in", "not_in") else value
    if info.tenant_column is not None:
        params[_TENANT_PARAM] = scope.tenant
    if skip is not None:
        params[_OFFSET_PARAM] = check_int(info, "skip", skip, 0)
    if limit is not None:
        params[_LIMIT_PARAM] = check_int(info, "limit", limit, 0)
    return stmt, params


def _build_cached(
    info: ModelInfo,
    filters: dict[str, Any],
    scope: RowScope,
    order_by: OrderBySpec,
    *,
    skip: int | None,
    limit: int | None,
    fixed_limit: int | None,
) -> tuple[Select[Any], tuple[tuple[str, str, str, str], ...]] | None:
    """A statement with bind parameters for this shape, or None if it is not cacheable."""
    shape: list[tuple[str, str, str, str]] = []
    for key, value in filters.items():
        if type(key) is not str or not key or key.startswith("_") or key.endswith("__"):
            return None
        parts, op = split_key(key)
        if len(parts) != 1 or parts[0] not in info.columns or op not in _CACHEABLE_OPS:
            return None
        if not _cacheable_value(op, value, info.python_types.get(parts[0])):
            return None
        shape.append((f"alchemium_f{len(shape)}", key, parts[0], op))
    # Validates the whole request (values included) and raises as the uncached path would.
    build_where(info.model, filters, scope=scope)
    ordering = order_by_clauses(info.model, order_by)
    model = info.model
    clauses: list[ColumnElement[bool]] = []
    if info.soft_delete_column is not None and not scope.include_deleted:
        clauses.append(getattr(model, info.soft_delete_column).is_(None))
    if info.tenant_column is not None:
        column = info.columns[info.tenant_column]
        clauses.append(
            getattr(model, info.tenant_column) == bindparam(_TENANT_PARAM, type_=column.type)
        )
    for name, _key, field, op in shape:
        attr = getattr(model, field)
        expanding = op in ("in", "not_in")
        param = bindparam(name, type_=info.columns[field].type, expanding=expanding)
        if op == "in":
            clauses.append(attr.in_(param))
        elif op == "not_in":
            clauses.append(or_(attr.not_in(param), attr.is_(None)))
        else:
            clauses.append(OPERATORS[op](attr, param))
    stmt = select(model).where(*clauses)
    if ordering:
        stmt = stmt.order_by(*ordering)
    if skip is not None:
        stmt = stmt.offset(bindparam(_OFFSET_PARAM, type_=Integer))
    if limit is not None:
        stmt = stmt.limit(bindparam(_LIMIT_PARAM, type_=Integer))
    if fixed_limit is not None:
        stmt = stmt.limit(fixed_limit)
    return stmt, tuple(shape)


def pk_first(info: ModelInfo, rows: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The primary keys of ``rows`` (tuples of every column, in ``info.columns`` order)."""
    order = list(info.columns)
    idx = [order.index(k) for k in info.primary_key]
    return [tuple(row[i] for i in idx) for row in rows]


def pk_in(
    pk_cols: list[Any], keys: list[tuple[Any, ...]], dialect: str = ""
) -> ColumnElement[bool]:
    """``pk IN (keys)`` for a single or a composite primary key.

    On PostgreSQL a single key is ``pk = ANY(:array)``: one parameter however many
    keys, where ``IN`` sends (and the server parses) one parameter per key.
    """
    if len(pk_cols) == 1:
        column = pk_cols[0]
        values = [k[0] for k in keys]
        if dialect == "postgresql":
            array: ColumnElement[bool] = column == any_(
                bindparam("alchemium_keys", values, type_=ARRAY(column.type))
            )
            return array
        clause: ColumnElement[bool] = column.in_(values)
        return clause
    return tuple_(*pk_cols).in_(keys)


def keyset_after(
    info: ModelInfo, keys: list[tuple[str, bool]], values: list[Any]
) -> ColumnElement[bool]:
    """Rows strictly after ``values`` in the (mixed-direction) key order.

    NULL sorts as the largest value (see ``order_by_clauses``), so it is handled here
    explicitly: comparisons with NULL are never true in SQL.
    """
    alternatives = []
    for i, (name, descending) in enumerate(keys):
        column = getattr(info.model, name)
        value = values[i]
        nullable = bool(info.columns[name].nullable)
        beyond: ColumnElement[bool]
        if value is None:
            beyond = column.is_not(None) if descending else false()
        elif descending:
            beyond = column < value
        else:
            beyond = or_(column > value, column.is_(None)) if nullable else column > value
        equal = [
            getattr(info.model, keys[j][0]).is_(None)
            if values[j] is None
            else getattr(info.model, keys[j][0]) == values[j]
            for j in range(i)
        ]
        alternatives.append(and_(*equal, beyond))
    return or_(*alternatives)


def encode_cursor(obj: Any, names: list[str]) -> str:
    """The keyset cursor after ``obj``: its ``names`` values as URL-safe base64 JSON."""
    values = [json_safe(getattr(obj, n), event="cursor", field=n) for n in names]
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode()


def decode_cursor(info: ModelInfo, cursor: str, names: list[str]) -> list[Any]:
    """The values of a cursor from :func:`encode_cursor`; PaginationParameterError if not one."""
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(values, list) or len(values) != len(names):
            raise ValueError("wrong length")
    except (ValueError, TypeError) as err:
        raise PaginationParameterError(
            info.name, "after", cursor, "a cursor from next_cursor"
        ) from err
    decoded = []
    for name, value in zip(names, values, strict=True):
        try:
            value = decode_value(info.columns[name].type, value, field=f"{info.name}.{name}")
            info.check_value(name, value)
        except (EventDecodeError, DataValidationError) as err:
            raise PaginationParameterError(
                info.name, "after", cursor, "a cursor from next_cursor"
            ) from err
        decoded.append(value)
    return decoded
