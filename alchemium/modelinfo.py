"""What alchemium needs to know about a mapped class, computed once per class.

Repositories, filters and event recording all ask the same questions (which
columns, which relationships, which primary key, which Python type a column
accepts). Inspecting the mapper on every call costs time on hot paths, so the
answers are cached per class.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import ColumnProperty, Mapper, RelationshipProperty
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.sqltypes import (
    JSON,
    BigInteger,
    Float,
    Integer,
    Numeric,
    SmallInteger,
    String,
)
from sqlalchemy.sql.type_api import TypeEngine

from alchemium.errors import DataValidationError, FieldNotFoundError, RepositoryUsageError

__all__ = ["ModelInfo", "configure_model", "model_info", "snake_case"]

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def snake_case(name: str) -> str:
    """``OrderLine`` -> ``order_line``, ``HTTPRequest`` -> ``http_request``."""
    return _CAMEL.sub("_", name).lower()


# Python values accepted for a column whose python_type is the key (besides the type itself).
_ALSO_ACCEPTED: dict[type, tuple[type, ...]] = {
    float: (int, decimal.Decimal),
    decimal.Decimal: (int, float),
    dt.datetime: (),
    dt.date: (),
    uuid.UUID: (),
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Cached facts about one mapped class.

    ``soft_delete_column`` and ``tenant_column`` are set by :func:`configure_model`
    (from the options of the model's CrudRepository); None means the model is not
    soft-deleted / not tenant-scoped.
    """

    model: type[Any]
    name: str
    entity: str
    mapper: Mapper[Any]
    columns: dict[str, Column[Any]]
    python_types: dict[str, type | None]
    relationships: dict[str, RelationshipProperty[Any]]
    primary_key: tuple[str, ...]
    soft_delete_column: str | None = None
    tenant_column: str | None = None
    # Per column: the exact value types that pass the type check of check_value at once,
    # and what is left to check for them (see _fast_check). Derived from the columns.
    fast_checks: dict[str, tuple[frozenset[type], tuple[int, int] | int | None]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def column(self, key: str) -> Column[Any]:
        """The column for attribute ``key``, or FieldNotFoundError naming the valid ones."""
        try:
            return self.columns[key]
        except KeyError:
            raise FieldNotFoundError(self.name, key, self.columns) from None

    def check_value(self, key: str, value: object, *, what: str = "value") -> None:
        """Raise DataValidationError if ``value`` cannot be stored in column ``key``.

        Both databases must reject the same input: PostgreSQL would refuse a string
        for an integer column, a string longer than ``String(n)``, an integer outside
        the column's range or a number with too many digits for ``Numeric(p, s)``,
        while SQLite would store them all, so the checks run here. Lengths and digits
        are checked for data only (``what="value"``), not for filter values, which
        may be anything comparable; integer ranges for both, as the driver cannot
        send an out-of-range integer parameter.
        """
        if value is None:
            return
        fast = self.fast_checks.get(key)
        if fast is not None and type(value) in fast[0]:
            # The common case, decided without the general checks below (same outcome).
            bound = fast[1]
            if bound is None:
                return
            if isinstance(bound, tuple):
                if bound[0] <= value <= bound[1]:  # type: ignore[operator]
                    return
            elif what != "value" or len(value) <= bound:  # type: ignore[arg-type]
                return
        expected = self.python_types.get(key)
        if expected is None:
            return
        if issubclass(expected, enum.Enum):
            # SQLAlchemy's Enum binds members and their names.
            names = getattr(self.columns[key].type, "enums", ())
            ok = isinstance(value, expected) or (isinstance(value, str) and value in names)
        elif isinstance(value, bool) and expected is not bool:
            ok = False
        elif expected is dt.date:
            ok = isinstance(value, dt.date) and not isinstance(value, dt.datetime)
        else:
            ok = isinstance(value, (expected, *_ALSO_ACCEPTED.get(expected, ())))
        if not ok:
            raise DataValidationError(
                f"{self.name}.{key}: {what} {value!r} is a {type(value).__name__}, "
                f"expected {expected.__name__}",
                model=self.name,
                field=key,
            )
        problem = _does_not_fit(self.columns[key], value, data=what == "value")
        if problem is not None:
            shown = value if not isinstance(value, str) or len(value) <= 40 else value[:40] + "..."
            raise DataValidationError(
                f"{self.name}.{key}: {what} {shown!r} {problem}", model=self.name, field=key
            )

    def identity(self, obj: object) -> str:
        """The primary key of ``obj`` as a string (composite keys joined by ``:``).

        An expired object (committed with ``expire_on_commit``) has no key in its dict;
        its identity key is used then.
        """
        state = inspect(obj)
        primary_key = self.primary_key
        if len(primary_key) == 1:
            # The same result as below, without the generators, for the usual single key.
            values = state.dict
            key = primary_key[0]
            if key in values:
                return str(values[key])
            identity = state.identity
            return str(identity[0]) if identity is not None else "None"
        if state.identity is not None and any(k not in state.dict for k in self.primary_key):
            return ":".join(str(v) for v in state.identity)
        return self.key_of(state.dict)

    def key_of(self, values: Mapping[str, Any]) -> str:
        """The primary key in a mapping of column values, as :meth:`identity` writes it."""
        return ":".join(str(values.get(key)) for key in self.primary_key)


# Integer ranges of PostgreSQL's types; SQLite stores 64-bit integers for all of them.
_INT_BITS: tuple[tuple[type[TypeEngine[Any]], int], ...] = (
    (SmallInteger, 16),
    (BigInteger, 64),
    (Integer, 32),
)


def _does_not_fit(column: Column[Any], value: object, *, data: bool) -> str | None:
    """Why ``value`` (already of the right Python type) does not fit ``column``, or None."""
    kind = column.type
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(kind, Integer):
        low, high = _int_range(kind)
        bits = next(b for cls, b in _INT_BITS if isinstance(kind, cls))
        if not low <= value <= high:
            return f"is out of range for a {bits}-bit integer column ({low}..{high})"
        return None
    if not data:
        return None
    if isinstance(value, str) and isinstance(kind, String) and kind.length is not None:
        if len(value) > kind.length:
            return f"has {len(value)} characters, the column holds at most {kind.length}"
        return None
    if (
        isinstance(value, (int, float, decimal.Decimal))
        and isinstance(kind, Numeric)
        and not isinstance(kind, Float)
        and kind.precision is not None
    ):
        digits = kind.precision - (kind.scale or 0)
        number = decimal.Decimal(value)
        if number.is_finite() and abs(number) >= decimal.Decimal(10) ** digits:
            return (
                f"has more than {digits} digits before the decimal point, too many for "
                f"Numeric({kind.precision}, {kind.scale or 0})"
            )
    return None


def _int_range(kind: Integer) -> tuple[int, int]:
    bits = next(b for cls, b in _INT_BITS if isinstance(kind, cls))
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _fast_check(
    column: Column[Any], expected: type | None
) -> tuple[frozenset[type], tuple[int, int] | int | None] | None:
    """What ``check_value`` needs for values of the column's own exact Python type.

    ``(types, bound)``: a value whose ``type()`` is in ``types`` has the right type;
    ``bound`` is then the integer range it must lie in (a tuple), the maximum length
    of a string (an int, checked for data only) or None (nothing more to check).
    None: no shortcut, the general checks apply.
    """
    kind = column.type
    if expected is int and isinstance(kind, Integer):
        return frozenset({int}), _int_range(kind)
    if expected is str:
        length = kind.length if isinstance(kind, String) else None
        return frozenset({str}), length
    if expected in (dt.datetime, dt.date, uuid.UUID, bool) and not isinstance(kind, Numeric):
        return frozenset({expected}), None
    return None


def _python_type(column: Column[Any]) -> type | None:
    if isinstance(column.type, JSON):
        return None
    try:
        python_type: type = column.type.python_type
    except NotImplementedError:
        return None
    if python_type is object:
        return None
    return python_type


_cache: dict[type[Any], ModelInfo] = {}


def model_info(model: type[Any]) -> ModelInfo:
    """Inspect ``model`` once; raise RepositoryUsageError if it is not a mapped class."""
    info = _cache.get(model)
    if info is None:
        info = _cache[model] = _inspect_model(model)
    return info


def configure_model(
    model: type[Any], *, soft_delete_column: str | None, tenant_column: str | None
) -> ModelInfo:
    """Make ``model`` soft-deleted and/or tenant-scoped (None leaves an option as it is).

    These are facts about the table, not about one repository: filters through a
    relationship must hide the soft-deleted or foreign rows of the target model too.
    A second, conflicting declaration for the same model raises RepositoryUsageError.
    """
    info = model_info(model)
    soft = _option(info, "soft_delete_column", info.soft_delete_column, soft_delete_column)
    tenant = _option(info, "tenant_column", info.tenant_column, tenant_column)
    if (soft, tenant) != (info.soft_delete_column, info.tenant_column):
        info = _cache[model] = replace(info, soft_delete_column=soft, tenant_column=tenant)
    return info


def _option(info: ModelInfo, option: str, current: str | None, column: str | None) -> str | None:
    if column is None:
        return current
    if column not in info.columns:
        raise RepositoryUsageError(
            f"{option} = {column!r}: {info.name} has no such column; "
            f"columns: {', '.join(sorted(info.columns))}"
        )
    if current is not None and current != column:
        raise RepositoryUsageError(
            f"{info.name} already has {option} = {current!r}; "
            f"another repository declares {column!r}"
        )
    return column


def _inspect_model(model: type[Any]) -> ModelInfo:
    try:
        mapper: Mapper[Any] = inspect(model)
    except Exception as err:
        raise RepositoryUsageError(f"{model!r} is not a mapped SQLAlchemy class") from err
    columns: dict[str, Column[Any]] = {}
    for prop in mapper.column_attrs:
        if isinstance(prop, ColumnProperty) and len(prop.columns) == 1:
            col = prop.columns[0]
            if isinstance(col, Column):
                columns[prop.key] = col
    pk_keys = tuple(mapper.get_property_by_column(col).key for col in mapper.primary_key)
    python_types = {key: _python_type(col) for key, col in columns.items()}
    fast_checks: dict[str, tuple[frozenset[type], tuple[int, int] | int | None]] = {}
    for key, col in columns.items():
        fast = _fast_check(col, python_types[key])
        if fast is not None:
            fast_checks[key] = fast
    return ModelInfo(
        model=model,
        name=model.__name__,
        entity=snake_case(model.__name__),
        mapper=mapper,
        columns=columns,
        python_types=python_types,
        relationships={rel.key: rel for rel in mapper.relationships},
        primary_key=pk_keys,
        fast_checks=fast_checks,
    )
