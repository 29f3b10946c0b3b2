"""CrudRepository: create, read, update, delete, bulk and upsert for one mapped model.

``class UserRepository(CrudRepository[User]): model = User`` is all it takes.
Every method is a classmethod taking the session first (positionally or as
``asession=``). Repositories never commit: they add, flush when they must read
back, and leave the transaction to the UnitOfWork. Inside a UnitOfWork every
change is recorded as a domain event (see ``alchemium.events``).

Input is validated before anything reaches the database: unknown data keys
raise FieldNotFoundError, wrongly typed values DataValidationError, bad filters
a QueryError. Database errors are mapped to alchemium exceptions.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    and_,
    delete,
    exists,
    false,
    func,
    insert,
    inspect,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.sql import Select

from alchemium.errors import (
    ConcurrencyConflictError,
    DataValidationError,
    FieldNotFoundError,
    InvalidFilterError,
    MultipleResultsError,
    NotFoundError,
    PaginationParameterError,
    RepositoryUsageError,
    db_errors,
    raise_mapped,
)
from alchemium.events import recording
from alchemium.events.event import json_safe
from alchemium.filters import (
    FilterSpec,
    OrderBySpec,
    build_where,
    eager_load_options,
    order_by_clauses,
)
from alchemium.modelinfo import ModelInfo, model_info

__all__ = ["CrudRepository", "KeysetPage", "Page"]

ModelT = TypeVar("ModelT")


@dataclass(frozen=True, slots=True)
class Page(Generic[ModelT]):
    """One page of results; ``total`` is None when the count was switched off."""

    items: list[ModelT]
    total: int | None
    page: int
    page_size: int

    @property
    def pages(self) -> int | None:
        """Number of pages, or None when the total is unknown."""
        if self.total is None:
            return None
        return max(1, -(-self.total // self.page_size))


@dataclass(frozen=True, slots=True)
class KeysetPage(Generic[ModelT]):
    """A page of keyset pagination; pass ``next_cursor`` as ``after=`` for the next one."""

    items: list[ModelT]
    next_cursor: str | None


def _check_int(info: ModelInfo, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PaginationParameterError(info.name, name, value, f"an integer >= {minimum}")
    return value


class CrudRepository(Generic[ModelT]):
    """CRUD operations for ``model``; subclass and set ``model``.

    Class options:
        model: the mapped class (required).
        entity_name: event prefix (default: snake_case of the class name, ``OrderLine`` ->
            ``order_line``, so events are ``order_line_created`` ...).
        record_events: set False to record no change events for this model.
    """

    model: type[ModelT]
    entity_name: ClassVar[str | None] = None
    record_events: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        model = cls.__dict__.get("model")
        if model is not None:
            info = model_info(model)
            recording.register_entity(
                model, entity=cls.entity_name or info.entity, enabled=cls.record_events
            )

    @classmethod
    def _info(cls) -> ModelInfo:
        model = getattr(cls, "model", None)
        if model is None:
            raise RepositoryUsageError(
                f"{cls.__name__}.model is not set; declare it: class {cls.__name__}"
                "(CrudRepository): model = YourModel"
            )
        return model_info(model)

    @classmethod
    def _check_data(cls, info: ModelInfo, data: Mapping[str, Any]) -> None:
        if not isinstance(data, Mapping):
            raise DataValidationError(
                f"{info.name}: data must be a dict of column values, got {type(data).__name__}",
                model=info.name,
            )
        for key, value in data.items():
            if key not in info.columns:
                raise FieldNotFoundError(info.name, key, info.columns)
            info.check_value(key, value)

    @classmethod
    def _select(
        cls,
        info: ModelInfo,
        filters: FilterSpec,
        *,
        order_by: OrderBySpec = None,
        joins: Iterable[str] | None = None,
    ) -> Select[Any]:
        stmt = select(info.model).where(*build_where(info.model, filters))
        options = eager_load_options(info.model, joins)
        if options:
            stmt = stmt.options(*options)
        ordering = order_by_clauses(info.model, order_by)
        if ordering:
            stmt = stmt.order_by(*ordering)
        return stmt

    # -- create ----------------------------------------------------------------------------

    @classmethod
    async def create(cls, asession: AsyncSession, data: Mapping[str, Any]) -> ModelT:
        """Add a new object built from ``data``; it is inserted at the next flush or commit."""
        info = cls._info()
        cls._check_data(info, data)
        obj: ModelT = info.model(**data)
        asession.add(obj)
        return obj

    @classmethod
    async def create_many(
        cls, asession: AsyncSession, rows: Sequence[Mapping[str, Any]]
    ) -> list[ModelT]:
        """Insert ``rows`` in one statement (executemany with RETURNING); objects have their keys.

        Records one ``<entity>_created`` event per row.
        """
        info = cls._info()
        rows = list(rows)
        if not rows:
            return []
        for row in rows:
            cls._check_data(info, row)
        stmt = insert(info.model).returning(info.model, sort_by_parameter_order=True)
        with db_errors(asession):
            objs = list((await asession.scalars(stmt, rows)).all())
        recording.record_rows(asession, info, "created", objs)
        return objs

    @classmethod
    async def upsert(
        cls,
        asession: AsyncSession,
        data: Mapping[str, Any],
        conflict: Sequence[str],
        update: Sequence[str] | None = None,
    ) -> ModelT:
        """Insert ``data`` or, if a row with the same ``conflict`` columns exists, update it."""
        return (await cls.upsert_many(asession, [data], conflict, update))[0]

    @classmethod
    async def upsert_many(
        cls,
        asession: AsyncSession,
        rows: Sequence[Mapping[str, Any]],
        conflict: Sequence[str],
        update: Sequence[str] | None = None,
    ) -> list[ModelT]:
        """INSERT ... ON CONFLICT (``conflict``) DO UPDATE for each row, on PostgreSQL and SQLite.

        ``update`` lists the columns overwritten on conflict (default: every column given
        except the conflict columns); a row never overwrites a column it does not give.
        Every row comes back, in input order, inserted or updated (with nothing to update,
        the existing row). Rows with different keys go in separate statements. Records one
        ``<entity>_upserted`` event per row with the row's values after the statement.
        """
        info = cls._info()
        rows = list(rows)
        if not rows:
            return []
        for row in rows:
            cls._check_data(info, row)
        if not conflict:
            raise InvalidFilterError(info.name, "conflict", "name at least one conflict column")
        for key in conflict:
            info.column(key)
        if update is not None:
            for key in update:
                info.column(key)
        dialect = asession.bind.dialect.name if asession.bind is not None else "postgresql"
        module = sqlite if dialect == "sqlite" else postgresql
        objs: list[ModelT] = []
        # One statement per run of rows with the same keys: the DO UPDATE SET list is per
        # statement, and a row must not overwrite a column it did not give with NULL.
        for _, group in groupby(rows, key=lambda row: frozenset(row)):
            batch = list(group)
            given = list(batch[0])
            targets = (
                [k for k in update if k in given]
                if update is not None
                else [k for k in given if k not in conflict]
            )
            stmt: Any = module.insert(info.model)
            set_: dict[str, Any] = {
                info.columns[key].name: getattr(stmt.excluded, info.columns[key].name)
                for key in targets
            }
            if not set_:
                # DO NOTHING would return no row for a conflict; a no-op update returns it.
                column = info.columns[conflict[0]]
                set_ = {column.name: column}
            stmt = stmt.on_conflict_do_update(
                index_elements=[info.columns[k].name for k in conflict], set_=set_
            )
            stmt = stmt.returning(info.model, sort_by_parameter_order=True)
            with db_errors(asession):
                result = await asession.scalars(
                    stmt, batch, execution_options={"populate_existing": True}
                )
                objs.extend(result.all())
        recording.record_rows(asession, info, "upserted", objs)
        return objs

    # -- read ------------------------------------------------------------------------------

    @classmethod
    async def get(cls, asession: AsyncSession, pk: Any) -> ModelT | None:
        """The object with primary key ``pk`` (a tuple for composite keys), or None."""
        info = cls._info()
        with db_errors(asession):
            return await asession.get(info.model, pk)

    @classmethod
    async def get_one(
        cls,
        asession: AsyncSession,
        filters: FilterSpec = None,
        joins: Iterable[str] | None = None,
        *,
        order_by: OrderBySpec = None,
        strict: bool = False,
    ) -> ModelT | None:
        """The first object matching ``filters``, or None.

        Without ``order_by`` "first" is whatever the database returns first. With
        ``strict=True`` more than one match raises MultipleResultsError.
        """
        info = cls._info()
        stmt = cls._select(info, filters, order_by=order_by, joins=joins).limit(2 if strict else 1)
        with db_errors(asession):
            found = list((await asession.scalars(stmt)).all())
        if strict and len(found) > 1:
            raise MultipleResultsError(info.name, filters)
        return found[0] if found else None

    @classmethod
    async def get_one_or_raise(
        cls,
        asession: AsyncSession,
        filters: FilterSpec = None,
        joins: Iterable[str] | None = None,
        *,
        order_by: OrderBySpec = None,
        strict: bool = False,
    ) -> ModelT:
        """Like :meth:`get_one`, but raises NotFoundError (naming model and filters) on no match."""
        found = await cls.get_one(asession, filters, joins, order_by=order_by, strict=strict)
        if found is None:
            raise NotFoundError(cls._info().name, filters)
        return found

    @classmethod
    async def list(
        cls,
        asession: AsyncSession,
        filters: FilterSpec = None,
        order_by: OrderBySpec = None,
        skip: int | None = None,
        limit: int | None = None,
        joins: Iterable[str] | None = None,
    ) -> list[ModelT]:
        """Objects matching ``filters``, ordered, from ``skip`` for at most ``limit`` rows."""
        info = cls._info()
        stmt = cls._select(info, filters, order_by=order_by, joins=joins)
        if skip is not None:
            stmt = stmt.offset(_check_int(info, "skip", skip, 0))
        if limit is not None:
            stmt = stmt.limit(_check_int(info, "limit", limit, 0))
        with db_errors(asession):
            return list((await asession.scalars(stmt)).all())

    @classmethod
    async def first(
        cls,
        asession: AsyncSession,
        filters: FilterSpec = None,
        order_by: OrderBySpec = None,
        joins: Iterable[str] | None = None,
    ) -> ModelT | None:
        """The first object in ``order_by`` order matching ``filters``, or None."""
        found = await cls.list(asession, filters, order_by=order_by, limit=1, joins=joins)
        return found[0] if found else None

    @classmethod
    async def count(cls, asession: AsyncSession, filters: FilterSpec = None) -> int:
        """Number of rows matching ``filters`` (one ``SELECT count(*)``)."""
        info = cls._info()
        stmt = select(func.count()).select_from(info.model).where(*build_where(info.model, filters))
        with db_errors(asession):
            return int((await asession.execute(stmt)).scalar_one())

    @classmethod
    async def exists(cls, asession: AsyncSession, filters: FilterSpec = None) -> bool:
        """Whether at least one row matches ``filters`` (``SELECT EXISTS``)."""
        info = cls._info()
        stmt = select(exists().where(*build_where(info.model, filters)).select_from(info.model))
        with db_errors(asession):
            return bool((await asession.execute(stmt)).scalar_one())

    @classmethod
    async def paginate(
        cls,
        asession: AsyncSession,
        filters: FilterSpec = None,
        order_by: OrderBySpec = None,
        page: int = 1,
        page_size: int = 50,
        joins: Iterable[str] | None = None,
        *,
        with_count: bool = True,
    ) -> Page[ModelT]:
        """One page (1-based) of ``page_size`` items and the total (unless ``with_count=False``).

        The total is one ``SELECT count(*)`` with the same WHERE and no ORDER BY/LIMIT.
        """
        info = cls._info()
        _check_int(info, "page", page, 1)
        _check_int(info, "page_size", page_size, 1)
        items = await cls.list(
            asession, filters, order_by, skip=(page - 1) * page_size, limit=page_size, joins=joins
        )
        total = await cls.count(asession, filters) if with_count else None
        return Page(items=items, total=total, page=page, page_size=page_size)

    @classmethod
    async def keyset(
        cls,
        asession: AsyncSession,
        filters: FilterSpec = None,
        order_by: str | Sequence[str] = "id",
        after: str | None = None,
        limit: int = 50,
        joins: Iterable[str] | None = None,
    ) -> KeysetPage[ModelT]:
        """Keyset (cursor) pagination: stable and O(limit) however deep the page.

        ``order_by`` takes column names (``"-created_at"``); the primary key is added as
        a tie-breaker. Pass the returned ``next_cursor`` as ``after`` to get the next page.
        """
        info = cls._info()
        _check_int(info, "limit", limit, 1)
        names = [order_by] if isinstance(order_by, str) else list(order_by)
        keys = [(n.lstrip("+-"), n.startswith("-")) for n in names]
        for name, _ in keys:
            if name not in info.columns:
                order_by_clauses(info.model, name)  # raises OrderByFieldError
        keys += [(pk, False) for pk in info.primary_key if pk not in {k for k, _ in keys}]
        stmt = cls._select(
            info, filters, order_by=[("-" if d else "") + k for k, d in keys], joins=joins
        )
        if after is not None:
            values = _decode_cursor(info, after, [k for k, _ in keys])
            stmt = stmt.where(_after(info, keys, values))
        with db_errors(asession):
            items = list((await asession.scalars(stmt.limit(limit + 1))).all())
        more = len(items) > limit
        items = items[:limit]
        cursor = _encode_cursor(items[-1], [k for k, _ in keys]) if more and items else None
        return KeysetPage(items=items, next_cursor=cursor)

    # -- update ----------------------------------------------------------------------------

    @classmethod
    def update(cls, obj: ModelT, data: Mapping[str, Any]) -> ModelT:
        """Set attributes of ``obj`` from ``data``; written at the next flush or commit.

        Synchronous (no I/O). Inside a UnitOfWork the flush records ``<entity>_updated``
        with only the columns whose value changed.
        """
        info = cls._info()
        if not isinstance(obj, info.model):
            raise RepositoryUsageError(
                f"{cls.__name__}.update expects a {info.name}, got {type(obj).__name__}"
            )
        cls._check_data(info, data)
        for pk in info.primary_key:
            if pk in data and inspect(obj).has_identity and data[pk] != getattr(obj, pk):
                raise DataValidationError(
                    f"{info.name}.{pk}: the primary key of a stored row cannot be changed",
                    model=info.name,
                    field=pk,
                )
        for key, value in data.items():
            setattr(obj, key, value)
        return obj

    @classmethod
    async def update_where(
        cls, asession: AsyncSession, filters: FilterSpec, data: Mapping[str, Any]
    ) -> int:
        """``UPDATE ... SET data WHERE filters``; returns the number of rows updated.

        Inside a UnitOfWork, records one ``<entity>_updated`` per changed row, with the
        old and new values (the rows are read, locked, before the update).
        """
        info = cls._info()
        cls._check_data(info, data)
        if not data:
            return 0
        where = build_where(info.model, filters)
        pk_cols = [info.columns[k] for k in info.primary_key]
        with db_errors(asession):
            old_rows = None
            if recording.wants_events(asession, info):
                cols = [info.columns[k] for k in info.columns]
                old_rows = (
                    await asession.execute(select(*cols).where(*where).with_for_update())
                ).all()
                if not old_rows:
                    return 0
                where = [_pk_in(pk_cols, _pk_first(info, old_rows))]
            stmt = update(info.model).where(*where).values(dict(data))
            result = await asession.execute(
                stmt, execution_options={"synchronize_session": "fetch"}
            )
        if old_rows is not None:
            recording.record_bulk_updates(asession, info, old_rows, data)
        return int(getattr(result, "rowcount", 0))

    # -- delete ----------------------------------------------------------------------------

    @classmethod
    async def delete(cls, asession: AsyncSession, obj: ModelT) -> None:
        """Delete ``obj``, also when it was loaded in an earlier, closed unit of work.

        Reads the row first (``SELECT ... FOR UPDATE`` on PostgreSQL) and raises
        NotFoundError if it no longer exists (or never did), also when another
        transaction deleted it meanwhile; an object added to this session and not yet
        flushed is simply discarded. The DELETE is sent at the
        next flush or commit; inside a UnitOfWork it records ``<entity>_deleted`` with
        the row's last column values.
        """
        info = cls._info()
        if not isinstance(obj, info.model):
            raise RepositoryUsageError(
                f"{cls.__name__}.delete expects a {info.name}, got {type(obj).__name__}"
            )
        state = inspect(obj)
        key = {k: state.dict.get(k) for k in info.primary_key}
        version_col = state.mapper.version_id_col
        version_prop = (
            state.mapper.get_property_by_column(version_col).key
            if version_col is not None
            else None
        )
        loaded_version = state.dict.get(version_prop) if version_prop is not None else None
        if state.pending and state.session_id == asession.sync_session.hash_key:
            # Added but never flushed: nothing to delete, just cancel the INSERT.
            asession.expunge(obj)
            return
        try:
            if state.session_id != asession.sync_session.hash_key:
                # Loaded elsewhere (often an earlier, closed unit of work): load the current
                # row into this session so the DELETE and its event see its real values.
                if state.identity is None:
                    raise NotFoundError(info.name, key)
                current = await asession.get(info.model, state.identity, with_for_update=True)
                if current is None:
                    raise NotFoundError(info.name, key)
                obj = current
            else:
                # Another transaction may have deleted the row since it was loaded: reload
                # it (locked on PostgreSQL, so it stays until our DELETE) to know it exists.
                try:
                    await asession.refresh(obj, with_for_update=True)
                except sa_exc.InvalidRequestError as err:
                    raise NotFoundError(info.name, key) from err
            # Optimistic locking: the row was reloaded above; a newer version means
            # another transaction changed it since the caller loaded it.
            if (
                version_prop is not None
                and loaded_version is not None
                and getattr(obj, version_prop) != loaded_version
            ):
                pk = key[info.primary_key[0]] if len(key) == 1 else tuple(key.values())
                raise ConcurrencyConflictError(info.name, pk) from StaleDataError(
                    f"DELETE of {info.name} {pk!r} expected version {loaded_version!r}, "
                    f"the row has version {getattr(obj, version_prop)!r}"
                )
            await asession.delete(obj)
        except (NotFoundError, ConcurrencyConflictError):
            raise
        except Exception as err:  # noqa: BLE001 - re-raised, mapped
            raise_mapped(err, asession)

    @classmethod
    async def delete_where(cls, asession: AsyncSession, filters: FilterSpec) -> int:
        """``DELETE ... WHERE filters``; returns the number of rows deleted.

        Inside a UnitOfWork, records one ``<entity>_deleted`` per row (via RETURNING).
        """
        info = cls._info()
        where = build_where(info.model, filters)
        with db_errors(asession):
            if recording.wants_events(asession, info):
                cols = [info.columns[k] for k in info.columns]
                stmt = delete(info.model).where(*where).returning(*cols)
                rows = (
                    await asession.execute(stmt, execution_options={"synchronize_session": "fetch"})
                ).all()
                recording.record_bulk_deletes(asession, info, rows)
                return len(rows)
            result = await asession.execute(
                delete(info.model).where(*where),
                execution_options={"synchronize_session": "fetch"},
            )
        return int(getattr(result, "rowcount", 0))


def _pk_first(info: ModelInfo, rows: Sequence[Any]) -> list[tuple[Any, ...]]:
    order = list(info.columns)
    idx = [order.index(k) for k in info.primary_key]
    return [tuple(row[i] for i in idx) for row in rows]


def _pk_in(pk_cols: list[Any], keys: list[tuple[Any, ...]]) -> ColumnElement[bool]:
    if len(pk_cols) == 1:
        clause: ColumnElement[bool] = pk_cols[0].in_([k[0] for k in keys])
        return clause
    return tuple_(*pk_cols).in_(keys)


def _after(info: ModelInfo, keys: list[tuple[str, bool]], values: list[Any]) -> ColumnElement[bool]:
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


def _encode_cursor(obj: Any, names: list[str]) -> str:
    values = [json_safe(getattr(obj, n), event="cursor", field=n) for n in names]
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode()


def _decode_cursor(info: ModelInfo, cursor: str, names: list[str]) -> list[Any]:
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
        kind = info.python_types.get(name)
        try:
            if value is not None and kind is dt.datetime:
                value = dt.datetime.fromisoformat(value)
            elif value is not None and kind is dt.date:
                value = dt.date.fromisoformat(value)
            elif value is not None and kind is decimal.Decimal:
                value = decimal.Decimal(value)
            elif value is not None and kind is uuid.UUID:
                value = uuid.UUID(value)
            info.check_value(name, value)
        except (ValueError, TypeError, decimal.InvalidOperation, DataValidationError) as err:
            raise PaginationParameterError(
                info.name, "after", cursor, "a cursor from next_cursor"
            ) from err
        decoded.append(value)
    return decoded
