"""The filter language: filter dicts, ``order_by`` strings and eager-load paths to SQLAlchemy.

Grammar of a filter dict (all entries are ANDed)::

    filters  := { entry, ... }
    entry    := "field": value                       equality (None means IS NULL)
              | "field__op": value                   operator, see OPERATORS
              | "rel__...__field[__op]": value       through relationships, as EXISTS
              | "_or":  [filters, ...]               at least one group must match
              | "_and": [filters, ...]               every group must match
              | "_not": filters                      the group must not match

Rows a read may see: ``build_where(..., scope=RowScope(...))`` adds the hidden
predicates of soft-deleted (``deleted_at IS NULL``) and tenant-scoped
(``tenant_id = :tenant``) models, for the model itself and for every model a
relationship path reaches, so ``{"books__title": "x"}`` never matches through a
soft-deleted book or another tenant's book.

Keys are looked up among the mapped attributes and never interpolated into SQL;
values are always bound parameters. Anything unknown raises a QueryError subclass
naming the model, the key and the valid choices. Plain SQLAlchemy boolean
expressions can be passed instead of (or in a list with) dicts for everything
the language does not cover.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, ColumnElement, Integer, and_, false, func, not_, or_, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import QueryableAttribute, joinedload, selectinload, with_loader_criteria
from sqlalchemy.sql.elements import UnaryExpression
from sqlalchemy.sql.functions import FunctionElement

from alchemium.errors import (
    DataValidationError,
    FieldNotFoundError,
    InvalidFilterError,
    OrderByFieldError,
    RelationNotFoundError,
    TenantRequiredError,
)
from alchemium.modelinfo import ModelInfo, model_info

__all__ = [
    "OPERATORS",
    "FilterSpec",
    "OrderBySpec",
    "RowScope",
    "build_where",
    "check_operand",
    "eager_load_options",
    "order_by_clauses",
    "split_key",
]

FilterSpec = Mapping[str, Any] | ColumnElement[bool] | Sequence[Any] | None
OrderBySpec = str | Any | Sequence[Any] | None


@dataclass(frozen=True, slots=True)
class RowScope:
    """Which rows of soft-deleted and tenant-scoped models a statement may see.

    ``tenant`` is the current tenant (None: not set; a tenant-scoped model then
    raises TenantRequiredError rather than showing every tenant's rows).
    """

    include_deleted: bool = False
    tenant: str | None = None

    def clauses(self, info: ModelInfo) -> list[ColumnElement[bool]]:
        """The hidden predicates for ``info.model``: not soft-deleted, of this tenant."""
        clauses: list[ColumnElement[bool]] = []
        if info.soft_delete_column is not None and not self.include_deleted:
            clauses.append(getattr(info.model, info.soft_delete_column).is_(None))
        if info.tenant_column is not None:
            if self.tenant is None:
                raise TenantRequiredError(info.name)
            clauses.append(getattr(info.model, info.tenant_column) == self.tenant)
        return clauses


_STRING_OPS = frozenset({"like", "ilike", "startswith", "endswith", "contains", "icontains"})
_GROUPS = ("_or", "_and", "_not")


class _Position(FunctionElement[int]):
    """1-based position of a substring: ``strpos`` on PostgreSQL, ``instr`` on SQLite."""

    type = Integer()
    inherit_cache = True


@compiles(_Position)
def _strpos(element: _Position, compiler: Any, **kw: Any) -> str:
    return f"strpos({compiler.process(element.clauses, **kw)})"


@compiles(_Position, "sqlite")
def _instr(element: _Position, compiler: Any, **kw: Any) -> str:
    return f"instr({compiler.process(element.clauses, **kw)})"


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class _Like(FunctionElement[bool]):
    """``column LIKE pattern ESCAPE '\\'``, case-sensitive on every database.

    Arguments: the column, the LIKE pattern and the same pattern translated to GLOB.
    SQLite's LIKE ignores ASCII case, so SQLite runs the equivalent GLOB instead.
    """

    type = Boolean()
    inherit_cache = True


@compiles(_Like)
def _like(element: _Like, compiler: Any, **kw: Any) -> str:
    column, pattern, _glob = element.clauses
    return str(compiler.process(column.like(pattern, escape="\\"), **kw))


@compiles(_Like, "sqlite")
def _glob(element: _Like, compiler: Any, **kw: Any) -> str:
    column, _pattern, glob = element.clauses
    return f"{compiler.process(column, **kw)} GLOB {compiler.process(glob, **kw)}"


def _like_to_glob(pattern: str) -> str:
    """Translate a LIKE pattern (escape character ``\\``) to the equivalent GLOB pattern."""
    out = []
    chars = iter(pattern)
    for char in chars:
        if char == "%":
            out.append("*")
        elif char == "_":
            out.append("?")
        else:
            literal = next(chars, "") if char == "\\" else char
            out.append(f"[{literal}]" if literal in ("*", "?", "[") else literal)
    return "".join(out)


def _dangling_escape(pattern: str) -> bool:
    """Whether ``pattern`` ends with an escape character that escapes nothing."""
    return (len(pattern) - len(pattern.rstrip("\\"))) % 2 == 1


OPERATORS: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
    "eq": lambda c, v: c.is_(None) if v is None else c == v,
    "ne": lambda c, v: c.is_not(None) if v is None else or_(c != v, c.is_(None)),
    "lt": lambda c, v: c < v,
    "lte": lambda c, v: c <= v,
    "gt": lambda c, v: c > v,
    "gte": lambda c, v: c >= v,
    "in": lambda c, v: c.in_(v) if v else false(),
    "not_in": lambda c, v: or_(c.not_in(v), c.is_(None)) if v else true(),
    # LIKE patterns: % and _ are wildcards, backslash escapes one character.
    "like": lambda c, v: _Like(c, v, _like_to_glob(v)),
    "ilike": lambda c, v: c.ilike(v, escape="\\"),
    # Case-sensitive on both databases (SQLite's LIKE ignores ASCII case, PostgreSQL's does not).
    "startswith": lambda c, v: func.substr(c, 1, len(v)) == v,
    "endswith": lambda c, v: (
        func.substr(c, func.length(c) - len(v) + 1) == v if v else c.is_not(None)
    ),
    "contains": lambda c, v: _Position(c, v) > 0,
    "icontains": lambda c, v: c.ilike("%" + _escape_like(v) + "%", escape="\\"),
    "is_null": lambda c, v: c.is_(None) if v else c.is_not(None),
    "between": lambda c, v: c.between(v[0], v[1]),
}


def split_key(key: str) -> tuple[list[str], str]:
    """``"books__title__startswith"`` -> ``(["books", "title"], "startswith")`` (default ``eq``)."""
    parts = key.split("__")
    op = "eq"
    if len(parts) > 1 and parts[-1] in OPERATORS:
        op = parts.pop()
    return parts, op


def check_operand(info: ModelInfo, field: str, op: str, value: Any, key: str) -> None:
    """Validate the value's shape for ``op`` and each scalar's type for the column.

    Raises InvalidFilterError naming the model, the filter key and what was expected.
    """
    scalars: Iterable[Any]
    if op in ("in", "not_in"):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
            raise InvalidFilterError(info.name, key, f"{op!r} expects a list, got {value!r}")
        scalars = value
    elif op == "between":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise InvalidFilterError(info.name, key, "'between' expects [low, high]")
        scalars = value
    elif op == "is_null":
        if not isinstance(value, bool):
            raise InvalidFilterError(
                info.name, key, f"'is_null' expects True or False, got {value!r}"
            )
        return
    elif op in _STRING_OPS:
        if not isinstance(value, str):
            raise InvalidFilterError(info.name, key, f"{op!r} expects a string, got {value!r}")
        if info.python_types.get(field) not in (str, None):
            raise InvalidFilterError(info.name, key, f"{op!r} works on text columns only")
        if op in ("like", "ilike") and _dangling_escape(value):
            raise InvalidFilterError(
                info.name, key, f"{op!r} pattern ends with an unescaped backslash: {value!r}"
            )
        return
    else:
        if value is not None and op not in ("eq", "ne") and not _is_scalar(value):
            raise InvalidFilterError(info.name, key, f"{op!r} expects a single value")
        scalars = (value,)
    for scalar in scalars:
        if op not in ("eq", "ne") and scalar is None:
            raise InvalidFilterError(info.name, key, f"{op!r} does not accept None")
        try:
            info.check_value(field, scalar, what="filter value")
        except DataValidationError as err:
            raise InvalidFilterError(info.name, key, str(err)) from None


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (list, tuple, set, frozenset, dict))


def _entry(info: ModelInfo, key: str, value: Any, scope: RowScope | None) -> ColumnElement[bool]:
    if not key or key.startswith("__") or key.endswith("__"):
        raise InvalidFilterError(info.name, key, "empty field name")
    parts, op = split_key(key)
    return _path(info, parts, op, value, key, scope)


def _path(
    info: ModelInfo, parts: list[str], op: str, value: Any, key: str, scope: RowScope | None
) -> ColumnElement[bool]:
    head, rest = parts[0], parts[1:]
    rel = info.relationships.get(head)
    if rel is not None:
        if not rest:
            raise InvalidFilterError(
                info.name, key, f"{head!r} is a relationship; filter on one of its fields"
            )
        target = model_info(rel.mapper.class_)
        inner = _path(target, rest, op, value, key, scope)
        if scope is not None:
            inner = and_(inner, *scope.clauses(target))
        attr: Any = getattr(info.model, head)
        # EXISTS keeps one row per parent, so limit/count count parents, not joined rows.
        clause: ColumnElement[bool] = attr.any(inner) if rel.uselist else attr.has(inner)
        return clause
    if head not in info.columns:
        if rest:
            raise RelationNotFoundError(info.name, head, info.relationships)
        raise FieldNotFoundError(info.name, head, list(info.columns) + list(info.relationships))
    if rest:
        raise InvalidFilterError(
            info.name, key, f"unknown operator {'__'.join(rest)!r}; valid: {', '.join(OPERATORS)}"
        )
    check_operand(info, head, op, value, key)
    column = getattr(info.model, head)
    return OPERATORS[op](column, value)


def _group(info: ModelInfo, key: str, value: Any, scope: RowScope | None) -> ColumnElement[bool]:
    if key == "_not":
        if not isinstance(value, Mapping) or not value:
            raise InvalidFilterError(info.name, key, "'_not' expects a non-empty filter dict")
        # Two-valued logic: a row whose comparison is NULL does not match the group, so it
        # matches its negation ({"_not": {"age": 0}} includes rows where age IS NULL).
        return not_(func.coalesce(and_(*_clauses(info, value, scope)), false()))
    if key not in ("_or", "_and"):
        raise InvalidFilterError(
            info.name, key, f"unknown group; valid groups: {', '.join(_GROUPS)}"
        )
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidFilterError(
            info.name, key, f"{key!r} expects a non-empty list of filter dicts"
        )
    members = []
    for member in value:
        if not isinstance(member, Mapping) or not member:
            raise InvalidFilterError(info.name, key, f"{key!r} members must be non-empty dicts")
        members.append(and_(*_clauses(info, member, scope)))
    return or_(*members) if key == "_or" else and_(*members)


def _clauses(
    info: ModelInfo, filters: Mapping[str, Any], scope: RowScope | None
) -> list[ColumnElement[bool]]:
    clauses = []
    for key, value in filters.items():
        if not isinstance(key, str):
            raise InvalidFilterError(info.name, repr(key), "filter keys must be strings")
        if key.startswith("_") and not key.startswith("__"):
            clauses.append(_group(info, key, value, scope))
        else:
            clauses.append(_entry(info, key, value, scope))
    return clauses


def build_where(
    model: type[Any], filters: FilterSpec, *, scope: RowScope | None = None
) -> list[ColumnElement[bool]]:
    """Translate ``filters`` for ``model`` into a list of WHERE clauses (ANDed by the caller).

    With ``scope``, the clauses also hide soft-deleted rows and other tenants' rows of
    ``model`` and of every model reached through a relationship path.
    """
    info = model_info(model)
    clauses = scope.clauses(info) if scope is not None else []
    return clauses + _filter_clauses(info, filters, scope)


def _filter_clauses(
    info: ModelInfo, filters: FilterSpec, scope: RowScope | None
) -> list[ColumnElement[bool]]:
    if filters is None:
        return []
    if isinstance(filters, Mapping):
        return _clauses(info, filters, scope)
    if isinstance(filters, ColumnElement):
        return [filters]
    if isinstance(filters, Sequence) and not isinstance(filters, (str, bytes)):
        clauses: list[ColumnElement[bool]] = []
        for item in filters:
            clauses.extend(_filter_clauses(info, item, scope))
        return clauses
    raise InvalidFilterError(
        info.name, repr(filters), "filters must be a dict, a SQLAlchemy expression or a list"
    )


def order_by_clauses(model: type[Any], order_by: OrderBySpec) -> list[Any]:
    """``"name"``, ``"-created_at"``, an expression, or a list of those -> ORDER BY clauses.

    For named columns NULL sorts as the largest value on every database (last
    ascending, first descending), as PostgreSQL does by default.
    """
    if order_by is None:
        return []
    info = model_info(model)
    items = order_by if isinstance(order_by, (list, tuple)) else [order_by]
    clauses: list[Any] = []
    for item in items:
        if isinstance(item, str):
            name = item.lstrip("+-")
            if name not in info.columns:
                raise OrderByFieldError(info.name, item, info.columns)
            column = getattr(model, name)
            clause = column.desc() if item.startswith("-") else column.asc()
            if info.columns[name].nullable:
                # PostgreSQL's default (NULL is the largest value), made explicit so that
                # SQLite, which sorts NULL first, returns the same order.
                clause = clause.nulls_first() if item.startswith("-") else clause.nulls_last()
            clauses.append(clause)
        elif isinstance(item, (QueryableAttribute, UnaryExpression, ColumnElement)):
            clauses.append(item)
        else:
            raise OrderByFieldError(info.name, item, info.columns)
    return clauses


def eager_load_options(
    model: type[Any], joins: Iterable[str] | None, *, scope: RowScope | None = None
) -> list[Any]:
    """Loader options for relationship paths (``"author"``, ``"author.company"``).

    Collections use ``selectinload`` (one extra SELECT, never duplicates parents or
    truncates children under LIMIT); single objects use ``joinedload``. With ``scope``,
    soft-deleted and other tenants' related objects are left out of what is loaded.
    """
    if not joins:
        return []
    if isinstance(joins, str):
        joins = [joins]
    options: list[Any] = []
    criteria: dict[type[Any], list[ColumnElement[bool]]] = {}
    for path in joins:
        info = model_info(model)
        loader: Any = None
        for segment in path.split("."):
            rel = info.relationships.get(segment)
            if rel is None:
                raise RelationNotFoundError(info.name, segment, info.relationships)
            attr = getattr(info.model, segment)
            strategy = selectinload if rel.uselist else joinedload
            loader = strategy(attr) if loader is None else getattr(loader, strategy.__name__)(attr)
            info = model_info(rel.mapper.class_)
            if scope is not None and info.model not in criteria:
                criteria[info.model] = scope.clauses(info)
        options.append(loader)
    options.extend(
        with_loader_criteria(target, and_(*clauses), include_aliases=True)
        for target, clauses in criteria.items()
        if clauses
    )
    return options
