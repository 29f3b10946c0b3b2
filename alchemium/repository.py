"""CrudRepository: create, read, update, delete, bulk and upsert for one mapped model.

``class UserRepository(CrudRepository[User]): model = User`` is all it takes.
Every method is a classmethod taking the session first (positionally or as
``asession=``). Repositories never commit: they add, flush when they must read
back, and leave the transaction to the UnitOfWork. Inside a UnitOfWork every
change is recorded as a domain event (see ``alchemium.events``).

Input is validated before anything reaches the database: unknown data keys
raise FieldNotFoundError, wrongly typed values DataValidationError, bad filters
a QueryError. Database errors are mapped to alchemium exceptions.

Soft delete and tenant scoping are opt-in class options (``soft_delete_column``,
``tenant_column``); they are facts about the model (see ``modelinfo.configure_model``)
and every read, write and relationship filter of every repository honours them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    Integer,
    and_,
    bindparam,
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
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.sql import Select

from alchemium.context import session_tenant
from alchemium.encoding import decode_value, json_safe
from alchemium.errors import (
    ConcurrencyConflictError,
    DataValidationError,
    EventDecodeError,
    FieldNotFoundError,
    InvalidFilterError,
    MultipleResultsError,
    NotFoundError,
    PaginationParameterError,
    RepositoryUsageError,
    TenantMismatchError,
    TenantRequiredError,
    raise_mapped,
)
from alchemium.events import recording
from alchemium.filters import (
    OPERATORS,
    FilterSpec,
    OrderBySpec,
    RowScope,
    _check_operand,
    build_where,
    eager_load_options,
    order_by_clauses,
)
from alchemium.modelinfo import ModelInfo, configure_model, model_info
from alchemium.uow import session_operation

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
        event_exclude: columns left out of the model's change events (``("password_hash",)``).
        event_transform: ``{column: function}``; the events carry ``function(value)``
            instead of the value (``{"avatar": len}``); None stays None. Both options
            are per model and checked when the class is defined, with every column the
            events carry: one whose type no encoder knows raises EventConfigurationError
            there. See docs/events.md.
        soft_delete_column: a nullable datetime column (``"deleted_at"``); when set,
            ``delete`` stamps it instead of deleting, every read hides stamped rows
            unless ``include_deleted=True``, ``restore`` clears it and ``hard_delete``
            removes the row. See docs/soft-delete.md.
        tenant_column: a column holding the tenant (``"tenant_id"``); when set, every
            read sees only the current tenant's rows, every create is stamped with it,
            writing another tenant's row raises TenantMismatchError and using the model
            with no tenant set raises TenantRequiredError. See docs/tenancy.md.

    The two options describe the table, so they hold for every repository of the
    model and for relationship filters from other models.
    """

    model: type[ModelT]
    entity_name: ClassVar[str | None] = None
    record_events: ClassVar[bool] = True
    event_exclude: ClassVar[Collection[str] | None] = None
    event_transform: ClassVar[Mapping[str, Callable[[Any], Any]] | None] = None
    soft_delete_column: ClassVar[str | None] = None
    tenant_column: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        model = cls.__dict__.get("model")
        if model is not None:
            info = configure_model(
                model, soft_delete_column=cls.soft_delete_column, tenant_column=cls.tenant_column
            )
            recording.register_entity(
                model,
                entity=cls.entity_name or info.entity,
                enabled=cls.record_events,
                exclude=cls.event_exclude,
                transform=cls.event_transform,
            )
            if info.tenant_column is not None:
                _tenant_models.add(model)

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
    def _stamp_tenant(
        cls, asession: AsyncSession, info: ModelInfo, data: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """``data`` with the current tenant in the tenant column; another tenant raises."""
        if info.tenant_column is None:
            return data
        tenant = _required_tenant(info, asession)
        given = data.get(info.tenant_column)
        if given is None:
            return {**data, info.tenant_column: tenant}
        if given != tenant:
            raise TenantMismatchError(info.name, info.key_of(data), tenant, given)
        return data

    @classmethod
    def _scope(
        cls, asession: AsyncSession, info: ModelInfo, *, include_deleted: bool = False
    ) -> RowScope:
        """The rows ``asession`` may see; raises TenantRequiredError for ``info`` if needed."""
        scope = RowScope(include_deleted=include_deleted, tenant=session_tenant(asession))
        if info.tenant_column is not None and scope.tenant is None:
            raise TenantRequiredError(info.name)
        return scope

    @classmethod
    def _select(
        cls,
        info: ModelInfo,
        filters: FilterSpec,
        *,
        scope: RowScope,
        order_by: OrderBySpec = None,
        joins: Iterable[str] | None = None,
    ) -> Select[Any]:
        stmt = select(info.model).where(*build_where(info.model, filters, scope=scope))
        options = eager_load_options(info.model, joins, scope=scope)
        if options:
            stmt = stmt.options(*options)
        ordering = order_by_clauses(info.model, order_by)
        if ordering:
            stmt = stmt.order_by(*ordering)
        return stmt

    # -- create ----------------------------------------------------------------------------

    @classmethod
    async def create(cls, asession: AsyncSession, data: Mapping[str, Any]) -> ModelT:
        """Add a new object built from ``data``; it is inserted at the next flush or commit.

        A tenant-scoped model is stamped with the current tenant.
        """
        info = cls._info()
        cls._check_data(info, data)
        data = cls._stamp_tenant(asession, info, data)
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
        rows = [cls._stamp_tenant(asession, info, row) for row in rows]
        stmt = insert(info.model).returning(info.model, sort_by_parameter_order=True)
        with session_operation(asession, "create_many()"):
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

        A tenant-scoped model is stamped with the current tenant, and a conflicting row
        of another tenant is left alone and raises TenantMismatchError. Conflicts are
        detected by the database's unique constraints, so a soft-deleted row conflicts
        too (and stays soft-deleted); see docs/soft-delete.md for partial unique indexes.
        """
        info = cls._info()
        rows = list(rows)
        if not rows:
            return []
        for row in rows:
            cls._check_data(info, row)
        rows = [cls._stamp_tenant(asession, info, row) for row in rows]
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
            tenant_column = info.tenant_column
            stmt = stmt.on_conflict_do_update(
                index_elements=[info.columns[k].name for k in conflict],
                set_=set_,
                # Another tenant's row is never overwritten: no row comes back for it.
                where=(
                    info.columns[tenant_column] == batch[0][tenant_column]
                    if tenant_column is not None
                    else None
                ),
            )
            stmt = stmt.returning(info.model, sort_by_parameter_order=True)
            with session_operation(asession, "upsert_many()"):
                result = await asession.scalars(
                    stmt, batch, execution_options={"populate_existing": True}
                )
                found = list(result.all())
            if len(found) < len(batch):
                assert tenant_column is not None
                returned = {tuple(getattr(o, k) for k in conflict) for o in found}
                missing = next(
                    tuple(r[k] for k in conflict)
                    for r in batch
                    if tuple(r[k] for k in conflict) not in returned
                )
                raise TenantMismatchError(
                    info.name, missing, batch[0][tenant_column], "another tenant"
                )
            objs.extend(found)
        recording.record_rows(asession, info, "upserted", objs)
        return objs

    # -- read ------------------------------------------------------------------------------

    @classmethod
    async def get(
        cls, asession: AsyncSession, pk: Any, *, include_deleted: bool = False
    ) -> ModelT | None:
        """The object with primary key ``pk`` (a tuple for composite keys), or None.

        None as well for a soft-deleted row (unless ``include_deleted``) and for a row
        of another tenant. Plain models use ``Session.get`` (no SQL when the object is
        already in the session); soft-deleted and tenant-scoped ones always SELECT.
        """
        info = cls._info()
        if info.soft_delete_column is None and info.tenant_column is None:
            with session_operation(asession, "get()"):
                return await asession.get(info.model, pk)
        scope = cls._scope(asession, info, include_deleted=include_deleted)
        stmt = select(info.model).where(*_pk_match(info, pk), *scope.clauses(info))
        with session_operation(asession, "get()"):
            found: ModelT | None = (await asession.scalars(stmt)).first()
        return found

    @classmethod
    async def get_one(
        cls,
        asession: AsyncSession,
        filters: FilterSpec = None,
        joins: Iterable[str] | None = None,
        *,
        order_by: OrderBySpec = None,
        strict: bool = False,
        include_deleted: bool = False,
    ) -> ModelT | None:
        """The first object matching ``filters``, or None.

        Without ``order_by`` "first" is whatever the database returns first. With
        ``strict=True`` more than one match raises MultipleResultsError.
        """
        info = cls._info()
        scope = cls._scope(asession, info, include_deleted=include_deleted)
        limit = 2 if strict else 1
        cached = _cached_select(info, filters, scope, order_by, joins, fixed_limit=limit)
        if cached is not None:
            stmt, params = cached
        else:
            stmt = cls._select(info, filters, scope=scope, order_by=order_by, joins=joins)
            stmt, params = stmt.limit(limit), None
        with session_operation(asession, "get_one()"):
            found = list((await asession.scalars(stmt, params)).all())
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
        include_deleted: bool = False,
    ) -> ModelT:
        """Like :meth:`get_one`, but raises NotFoundError (naming model and filters) on no match."""
        found = await cls.get_one(
            asession,
            filters,
            joins,
            order_by=order_by,
            strict=strict,
            include_deleted=include_deleted,
        )
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
        *,
        include_deleted: bool = False,
    ) -> list[ModelT]:
        """Objects matching ``filters``, ordered, from ``skip`` for at most ``limit`` rows."""
        info = cls._info()
        scope = cls._scope(asession, info, include_deleted=include_deleted)
        cached = _cached_select(info, filters, scope, order_by, joins, skip=skip, limit=limit)
        if cached is not None:
            stmt, params = cached
        else:
            stmt = cls._select(info, filters, scope=scope, order_by=order_by, joins=joins)
            if skip is not None:
                stmt = stmt.offset(_check_int(info, "skip", skip, 0))
            if limit is not None:
                stmt = stmt.limit(_check_int(info, "limit", limit, 0))
            params = None
        with session_operation(asession, "list()"):
            return list((await asession.scalars(stmt, params)).all())

    @classmethod
    async def first(
        cls,
        asession: AsyncSession,
        filters: FilterSpec = None,
        order_by: OrderBySpec = None,
        joins: Iterable[str] | None = None,
        *,
        include_deleted: bool = False,
    ) -> ModelT | None:
        """The first object in ``order_by`` order matching ``filters``, or None."""
        found = await cls.list(
            asession,
            filters,
            order_by=order_by,
            limit=1,
            joins=joins,
            include_deleted=include_deleted,
        )
        return found[0] if found else None

    @classmethod
    async def count(
        cls, asession: AsyncSession, filters: FilterSpec = None, *, include_deleted: bool = False
    ) -> int:
        """Number of rows matching ``filters`` (one ``SELECT count(*)``)."""
        info = cls._info()
        scope = cls._scope(asession, info, include_deleted=include_deleted)
        where = build_where(info.model, filters, scope=scope)
        stmt = select(func.count()).select_from(info.model).where(*where)
        with session_operation(asession, "count()"):
            return int((await asession.execute(stmt)).scalar_one())

    @classmethod
    async def exists(
        cls, asession: AsyncSession, filters: FilterSpec = None, *, include_deleted: bool = False
    ) -> bool:
        """Whether at least one row matches ``filters`` (``SELECT EXISTS``)."""
        info = cls._info()
        scope = cls._scope(asession, info, include_deleted=include_deleted)
        where = build_where(info.model, filters, scope=scope)
        stmt = select(exists().where(*where).select_from(info.model))
        with session_operation(asession, "exists()"):
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
        include_deleted: bool = False,
    ) -> Page[ModelT]:
        """One page (1-based) of ``page_size`` items and the total (unless ``with_count=False``).

        The total is one ``SELECT count(*)`` with the same WHERE and no ORDER BY/LIMIT.
        """
        info = cls._info()
        _check_int(info, "page", page, 1)
        _check_int(info, "page_size", page_size, 1)
        items = await cls.list(
            asession,
            filters,
            order_by,
            skip=(page - 1) * page_size,
            limit=page_size,
            joins=joins,
            include_deleted=include_deleted,
        )
        total = (
            await cls.count(asession, filters, include_deleted=include_deleted)
            if with_count
            else None
        )
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
        *,
        include_deleted: bool = False,
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
            info,
            filters,
            scope=cls._scope(asession, info, include_deleted=include_deleted),
            order_by=[("-" if d else "") + k for k, d in keys],
            joins=joins,
        )
        if after is not None:
            values = _decode_cursor(info, after, [k for k, _ in keys])
            stmt = stmt.where(_after(info, keys, values))
        with session_operation(asession, "keyset()"):
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
        with only the columns whose value changed. An object of another tenant, or
        ``data`` moving it to another tenant, raises TenantMismatchError: here when the
        object's session or :func:`alchemium.use_tenant` names the tenant, else when the
        object is flushed in a unit of work of another tenant.
        """
        info = cls._info()
        if not isinstance(obj, info.model):
            raise RepositoryUsageError(
                f"{cls.__name__}.update expects a {info.name}, got {type(obj).__name__}"
            )
        cls._check_data(info, data)
        state = inspect(obj)
        tenant = session_tenant(state.session) if info.tenant_column is not None else None
        if info.tenant_column is not None and tenant is not None:
            # Without a tenant here (a detached object, no use_tenant), the flush checks.
            _check_row_tenant(info, state, tenant)
            given = data.get(info.tenant_column, tenant)
            if given != tenant:
                raise TenantMismatchError(info.name, _pk_of(info, state), tenant, given)
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
        cls,
        asession: AsyncSession,
        filters: FilterSpec,
        data: Mapping[str, Any],
        *,
        include_deleted: bool = False,
    ) -> int:
        """``UPDATE ... SET data WHERE filters``; returns the number of rows updated.

        Inside a UnitOfWork, records one ``<entity>_updated`` per changed row, with the
        old and new values (the rows are read, locked, before the update). Soft-deleted
        rows are left alone unless ``include_deleted``; only the current tenant's rows
        are touched, and ``data`` cannot move them to another tenant.
        """
        info = cls._info()
        cls._check_data(info, data)
        scope = cls._scope(asession, info, include_deleted=include_deleted)
        if info.tenant_column is not None and data.get(info.tenant_column, scope.tenant) != (
            scope.tenant
        ):
            raise TenantMismatchError(
                info.name, filters, scope.tenant, data.get(info.tenant_column)
            )
        if not data:
            return 0
        where = build_where(info.model, filters, scope=scope)
        pk_cols = [info.columns[k] for k in info.primary_key]
        with session_operation(asession, "update_where()"):
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
        """Delete ``obj`` (soft-delete it if the model has ``soft_delete_column``).

        Works also when ``obj`` was loaded in an earlier, closed unit of work. Reads the
        row first (``SELECT ... FOR UPDATE`` on PostgreSQL) and raises NotFoundError if
        it no longer exists (or never did, or is already soft-deleted), also when
        another transaction deleted it meanwhile; an object added to this session and
        not yet flushed is simply discarded. A row of another tenant raises
        TenantMismatchError. The DELETE (or the UPDATE setting the soft-delete column
        to now, UTC) is sent at the next flush or commit; inside a UnitOfWork it
        records ``<entity>_deleted`` with the row's last column values, plus
        ``"soft": true`` for a soft delete.
        """
        info = cls._info()
        current = await cls._load_for_write(asession, obj, "delete", include_deleted=False)
        if current is None:
            return
        if info.soft_delete_column is not None:
            setattr(current, info.soft_delete_column, _now())
            return
        with session_operation(asession, "delete()"):
            await asession.delete(current)

    @classmethod
    async def hard_delete(cls, asession: AsyncSession, obj: ModelT) -> None:
        """Really DELETE ``obj``'s row, soft-deleted or not; like :meth:`delete` otherwise.

        Records ``<entity>_deleted`` (without ``soft``). For a model without soft
        delete it is the same as :meth:`delete`.
        """
        current = await cls._load_for_write(asession, obj, "hard_delete", include_deleted=True)
        if current is None:
            return
        with session_operation(asession, "hard_delete()"):
            await asession.delete(current)

    @classmethod
    async def restore(cls, asession: AsyncSession, obj: ModelT) -> ModelT:
        """Undo the soft delete of ``obj``; returns the object of this session.

        Reads (and locks) the row like :meth:`delete`; NotFoundError if it does not
        exist, TenantMismatchError for another tenant's row. Inside a UnitOfWork the
        flush records ``<entity>_restored``; restoring a row that is not deleted
        changes nothing and records nothing.
        """
        info = cls._info()
        if info.soft_delete_column is None:
            raise RepositoryUsageError(
                f"{cls.__name__}.restore: {info.name} has no soft delete; "
                "set soft_delete_column on its repository"
            )
        current = await cls._load_for_write(asession, obj, "restore", include_deleted=True)
        if current is None:
            current = obj
        setattr(current, info.soft_delete_column, None)
        return current

    @classmethod
    async def _load_for_write(
        cls, asession: AsyncSession, obj: ModelT, action: str, *, include_deleted: bool
    ) -> ModelT | None:
        """``obj`` as stored now, in ``asession`` and locked, checked for tenant and version.

        Returns None for an object added to this session and never flushed, after
        discarding it from the session (there is no row to write).
        """
        info = cls._info()
        if not isinstance(obj, info.model):
            raise RepositoryUsageError(
                f"{cls.__name__}.{action} expects a {info.name}, got {type(obj).__name__}"
            )
        state = inspect(obj)
        pk = _pk_of(info, state)
        tenant = None
        if info.tenant_column is not None:
            tenant = _required_tenant(info, asession)
            _check_row_tenant(info, state, tenant)
        version_col = state.mapper.version_id_col
        version_prop = (
            state.mapper.get_property_by_column(version_col).key
            if version_col is not None
            else None
        )
        loaded_version = state.dict.get(version_prop) if version_prop is not None else None
        if state.pending and state.session_id == asession.sync_session.hash_key:
            # Added but never flushed: nothing to write, just cancel the INSERT.
            asession.expunge(obj)
            return None
        try:
            if state.session_id != asession.sync_session.hash_key:
                # Loaded elsewhere (often an earlier, closed unit of work): load the current
                # row into this session so the write and its event see its real values.
                if state.identity is None:
                    raise NotFoundError(info.name, pk)
                current = await asession.get(info.model, state.identity, with_for_update=True)
                if current is None:
                    raise NotFoundError(info.name, pk)
                obj = current
            else:
                # Another transaction may have deleted the row since it was loaded: reload
                # it (locked on PostgreSQL, so it stays until our write) to know it exists.
                if state.modified:
                    # refresh() would silently drop the caller's unflushed changes.
                    await asession.flush()
                try:
                    await asession.refresh(obj, with_for_update=True)
                except sa_exc.InvalidRequestError as err:
                    raise NotFoundError(info.name, pk) from err
        except (NotFoundError, ConcurrencyConflictError):
            raise
        except Exception as err:  # noqa: BLE001 - re-raised, mapped
            raise_mapped(err, asession)
        if info.tenant_column is not None:
            _check_row_tenant(info, inspect(obj), tenant)
        if (
            info.soft_delete_column is not None
            and not include_deleted
            and getattr(obj, info.soft_delete_column) is not None
        ):
            raise NotFoundError(info.name, pk)
        # Optimistic locking: the row was reloaded above; a newer version means
        # another transaction changed it since the caller loaded it.
        if (
            version_prop is not None
            and loaded_version is not None
            and getattr(obj, version_prop) != loaded_version
        ):
            raise ConcurrencyConflictError(info.name, pk) from StaleDataError(
                f"{action.upper()} of {info.name} {pk!r} expected version {loaded_version!r}, "
                f"the row has version {getattr(obj, version_prop)!r}"
            )
        return obj

    @classmethod
    async def delete_where(
        cls, asession: AsyncSession, filters: FilterSpec, *, include_deleted: bool = False
    ) -> int:
        """``DELETE ... WHERE filters``; returns the number of rows deleted.

        For a soft-deleted model this is an ``UPDATE`` setting the soft-delete column
        of the matching rows that are not deleted yet (with ``include_deleted=True``
        it really DELETEs every matching row, deleted or not: a purge). Only the
        current tenant's rows are touched. Inside a UnitOfWork, records one
        ``<entity>_deleted`` per row (via RETURNING), with ``"soft": true`` when soft.
        """
        info = cls._info()
        where = build_where(
            info.model,
            filters,
            scope=cls._scope(asession, info, include_deleted=include_deleted),
        )
        soft = info.soft_delete_column is not None and not include_deleted
        stmt: Any = (
            update(info.model).where(*where).values({info.soft_delete_column: _now()})
            if soft
            else delete(info.model).where(*where)
        )
        with session_operation(asession, "delete_where()"):
            if recording.wants_events(asession, info):
                cols = [info.columns[k] for k in info.columns]
                rows = (
                    await asession.execute(
                        stmt.returning(*cols), execution_options={"synchronize_session": "fetch"}
                    )
                ).all()
                recording.record_bulk_deletes(asession, info, rows, soft=soft)
                return len(rows)
            result = await asession.execute(
                stmt, execution_options={"synchronize_session": "fetch"}
            )
        return int(getattr(result, "rowcount", 0))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pk_of(info: ModelInfo, state: Any) -> Any:
    """The primary key of an object's state for messages: a value, or a tuple if composite."""
    if state.identity is not None:
        key = tuple(state.identity)
    else:
        key = tuple(state.dict.get(k) for k in info.primary_key)
    return key[0] if len(key) == 1 else key


def _pk_match(info: ModelInfo, pk: Any) -> list[ColumnElement[bool]]:
    """``pk_col = value`` clauses for ``pk``: a value, a tuple or a dict of key values."""
    if isinstance(pk, Mapping):
        values = [pk.get(k) for k in info.primary_key]
    elif isinstance(pk, (tuple, list)):
        values = list(pk)
    else:
        values = [pk]
    if len(values) != len(info.primary_key):
        raise RepositoryUsageError(
            f"{info.name} has a primary key of {len(info.primary_key)} column(s) "
            f"({', '.join(info.primary_key)}); got {pk!r}"
        )
    return [info.columns[k] == value for k, value in zip(info.primary_key, values, strict=True)]


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


def _cached_select(
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
        _check_operand(info, field, op, value, key_)
        params[name] = list(value) if op in ("in", "not_in") else value
    if info.tenant_column is not None:
        params[_TENANT_PARAM] = scope.tenant
    if skip is not None:
        params[_OFFSET_PARAM] = _check_int(info, "skip", skip, 0)
    if limit is not None:
        params[_LIMIT_PARAM] = _check_int(info, "limit", limit, 0)
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
        parts = key.split("__")
        op = "eq"
        if len(parts) > 1 and parts[-1] in OPERATORS:
            op = parts.pop()
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


def _required_tenant(info: ModelInfo, session: Any) -> str:
    tenant = session_tenant(session)
    if tenant is None:
        raise TenantRequiredError(info.name)
    return tenant


def _stored_value(state: Any, key: str) -> Any:
    """The value of attribute ``key`` as stored (before unflushed changes), or None if unknown."""
    value = state.committed_state.get(key, state.dict.get(key))
    return None if value is NO_VALUE else value


def _check_row_tenant(info: ModelInfo, state: Any, tenant: str | None) -> None:
    """Raise TenantMismatchError if the row of ``state`` is stored for another tenant."""
    assert info.tenant_column is not None
    stored = _stored_value(state, info.tenant_column)
    if stored is not None and stored != tenant:
        raise TenantMismatchError(info.name, _pk_of(info, state), tenant, stored)


_tenant_models: set[type[Any]] = set()


@sa_event.listens_for(Session, "before_flush")
def _check_tenants(session: Session, _flush_context: Any, _instances: Any) -> None:
    """Stamp new rows of tenant-scoped models; refuse to write rows of another tenant.

    Covers writes that bypass the repository too (``session.add``, setting attributes
    of a loaded object), so the only way to another tenant's row is raw SQL.
    """
    if not _tenant_models:
        return
    for obj in (*session.new, *session.dirty, *session.deleted):
        if type(obj) not in _tenant_models:
            continue
        info = model_info(type(obj))
        column = info.tenant_column
        assert column is not None
        tenant = _required_tenant(info, session)
        state = inspect(obj)
        value = state.dict.get(column)
        if state.pending and value is None:
            setattr(obj, column, tenant)
            continue
        stored = _stored_value(state, column)
        if stored is None and state.identity is not None:
            # Expired (e.g. detached after a rollback): ask the database whose row it is,
            # as the UPDATE/DELETE the flush sends names the primary key only.
            pk = [info.columns[k] for k in info.primary_key]
            stmt = select(info.columns[column]).where(
                *(col == v for col, v in zip(pk, state.identity, strict=True))
            )
            with session.no_autoflush:
                stored = session.connection().execute(stmt).scalar()
        for found in (stored, value):
            if found is not None and found != tenant:
                raise TenantMismatchError(info.name, _pk_of(info, state), tenant, found)


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
        try:
            value = decode_value(info.columns[name].type, value, field=f"{info.name}.{name}")
            info.check_value(name, value)
        except (EventDecodeError, DataValidationError) as err:
            raise PaginationParameterError(
                info.name, "after", cursor, "a cursor from next_cursor"
            ) from err
        decoded.append(value)
    return decoded
