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

Why this module is long (about 750 lines): it is the public API, CrudRepository's
methods with the docstrings users read. What they are built from lives beside it:
``query`` (SELECTs, the statement cache, keyset cursors), ``writes`` (data checks,
upserts, bulk inserts, reloading rows for a write), ``tenancy`` (write-time checks).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import (
    delete,
    exists,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from alchemium.errors import (
    DataValidationError,
    InvalidFilterError,
    MultipleResultsError,
    NotFoundError,
    RepositoryUsageError,
    TenantMismatchError,
    TenantRequiredError,
)
from alchemium.events import recording
from alchemium.filters import FilterSpec, OrderBySpec, RowScope, build_where
from alchemium.modelinfo import ModelInfo, configure_model, model_info
from alchemium.query import (
    cached_select,
    check_int,
    decode_cursor,
    encode_cursor,
    keyset_after,
    keyset_keys,
    pk_first,
    pk_in,
    pk_match,
    pk_of,
    pk_values,
    select_rows,
)
from alchemium.tenancy import check_row_tenant, register_tenant_model
from alchemium.uow import check_session, current_unit_of_work, session_operation, session_tenant
from alchemium.writes import (
    attach_for_update,
    check_data,
    insert_rows,
    load_for_write,
    session_sync,
    stamp_tenant,
    upsert_statement,
    utcnow,
)

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
        event_schema_version: the current schema version of the model's change
            events (default: undeclared, 1); stored events of older versions are
            upcast by the upcasters registered for them. See docs/lifecycle.md.
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
    event_schema_version: ClassVar[int | None] = None
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
                schema_version=cls.event_schema_version,
            )
            if info.tenant_column is not None:
                register_tenant_model(model)

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
    def _begin(cls, asession: Any, method: str) -> ModelInfo:
        """The model's info, once ``asession`` is checked to be an AsyncSession."""
        if type(asession) is not AsyncSession:
            check_session(asession, f"{cls.__name__}.{method}")
        return cls._info()

    @classmethod
    def _scope(
        cls, asession: AsyncSession, info: ModelInfo, *, include_deleted: bool = False
    ) -> RowScope:
        """The rows ``asession`` may see; raises TenantRequiredError for ``info`` if needed."""
        scope = RowScope(include_deleted=include_deleted, tenant=session_tenant(asession))
        if info.tenant_column is not None and scope.tenant is None:
            raise TenantRequiredError(info.name)
        return scope

    # -- create ----------------------------------------------------------------------------

    @classmethod
    async def create(cls, asession: AsyncSession, data: Mapping[str, Any]) -> ModelT:
        """Add a new object built from ``data``; it is inserted at the next flush or commit.

        A tenant-scoped model is stamped with the current tenant.
        """
        info = cls._begin(asession, "create")
        check_data(info, data)
        data = stamp_tenant(asession, info, data)
        obj: ModelT = info.model(**data)
        asession.add(obj)
        return obj

    @classmethod
    async def create_many(
        cls, asession: AsyncSession, rows: Sequence[Mapping[str, Any]]
    ) -> list[ModelT]:
        """INSERT ``rows`` in batches (executemany with RETURNING); objects have their keys.

        Returns the objects in input order, persistent in the session with every column
        the database returned. Records one ``<entity>_created`` event per row. Values
        are checked (and tenants stamped) for every row before anything is sent.
        """
        info = cls._begin(asession, "create_many")
        rows = list(rows)
        if not rows:
            return []
        for row in rows:
            check_data(info, row)
        if info.tenant_column is not None:
            rows = [stamp_tenant(asession, info, row) for row in rows]
        with session_operation(asession, "create_many()"):
            inserted = await insert_rows(asession, info, rows)
            if inserted is None:
                stmt = insert(info.model).returning(info.model, sort_by_parameter_order=True)
                objs = list((await asession.scalars(stmt, rows)).all())
        if inserted is None:
            recording.record_rows(asession, info, "created", objs)
            return objs
        objs, values = inserted
        recording.record_inserted(asession, info, values)
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
        info = cls._begin(asession, "upsert_many")
        rows = list(rows)
        if not rows:
            return []
        for row in rows:
            check_data(info, row)
        rows = [stamp_tenant(asession, info, row) for row in rows]
        if not conflict:
            raise InvalidFilterError(info.name, "conflict", "name at least one conflict column")
        for key in conflict:
            info.column(key)
        if update is not None:
            for key in update:
                info.column(key)
        dialect = asession.bind.dialect.name if asession.bind is not None else "postgresql"
        objs: list[ModelT] = []
        # One statement per run of rows with the same keys: the DO UPDATE SET list is per
        # statement, and a row must not overwrite a column it did not give with NULL.
        for _, group in groupby(rows, key=lambda row: frozenset(row)):
            batch = list(group)
            stmt = upsert_statement(info, dialect, batch, conflict, update)
            with session_operation(asession, "upsert_many()"):
                result = await asession.scalars(
                    stmt, batch, execution_options={"populate_existing": True}
                )
                found = list(result.all())
            tenant_column = info.tenant_column
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
        info = cls._begin(asession, "get")
        values = pk_values(info, pk)
        if info.soft_delete_column is None and info.tenant_column is None:
            with session_operation(asession, "get()"):
                return await asession.get(info.model, values)
        scope = cls._scope(asession, info, include_deleted=include_deleted)
        stmt = select(info.model).where(*pk_match(info, pk), *scope.clauses(info))
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
        info = cls._begin(asession, "get_one")
        scope = cls._scope(asession, info, include_deleted=include_deleted)
        limit = 2 if strict else 1
        cached = cached_select(info, filters, scope, order_by, joins, fixed_limit=limit)
        if cached is not None:
            stmt, params = cached
        else:
            stmt = select_rows(info, filters, scope=scope, order_by=order_by, joins=joins)
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
        info = cls._begin(asession, "list")
        scope = cls._scope(asession, info, include_deleted=include_deleted)
        cached = cached_select(info, filters, scope, order_by, joins, skip=skip, limit=limit)
        if cached is not None:
            stmt, params = cached
        else:
            stmt = select_rows(info, filters, scope=scope, order_by=order_by, joins=joins)
            if skip is not None:
                stmt = stmt.offset(check_int(info, "skip", skip, 0))
            if limit is not None:
                stmt = stmt.limit(check_int(info, "limit", limit, 0))
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
        info = cls._begin(asession, "count")
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
        info = cls._begin(asession, "exists")
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
        info = cls._begin(asession, "paginate")
        check_int(info, "page", page, 1)
        check_int(info, "page_size", page_size, 1)
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
        order_by: str | Any | Sequence[Any] = "id",
        after: str | None = None,
        limit: int = 50,
        joins: Iterable[str] | None = None,
        *,
        include_deleted: bool = False,
    ) -> KeysetPage[ModelT]:
        """Keyset (cursor) pagination: stable and O(limit) however deep the page.

        ``order_by`` takes column names (``"-created_at"``) or model columns
        (``User.name``, ``User.name.desc()``); other expressions raise OrderByFieldError.
        The primary key is added as a tie-breaker. Pass the returned ``next_cursor`` as
        ``after`` to get the next page.
        """
        info = cls._begin(asession, "keyset")
        check_int(info, "limit", limit, 1)
        keys = keyset_keys(info, order_by)
        keys += [(pk, False) for pk in info.primary_key if pk not in {k for k, _ in keys}]
        stmt = select_rows(
            info,
            filters,
            scope=cls._scope(asession, info, include_deleted=include_deleted),
            order_by=[("-" if d else "") + k for k, d in keys],
            joins=joins,
        )
        if after is not None:
            values = decode_cursor(info, after, [k for k, _ in keys])
            stmt = stmt.where(keyset_after(info, keys, values))
        with session_operation(asession, "keyset()"):
            items = list((await asession.scalars(stmt.limit(limit + 1))).all())
        more = len(items) > limit
        items = items[:limit]
        cursor = encode_cursor(items[-1], [k for k, _ in keys]) if more and items else None
        return KeysetPage(items=items, next_cursor=cursor)

    # -- update ----------------------------------------------------------------------------

    @classmethod
    def update(cls, obj: ModelT, data: Mapping[str, Any]) -> ModelT:
        """Set attributes of ``obj`` from ``data``; written at the next flush or commit.

        Synchronous (no I/O). Inside a UnitOfWork the flush records ``<entity>_updated``
        with only the columns whose value changed. Returns the object that will be written.

        An object in no session (loaded by a unit of work that has ended) is written by
        the unit of work the caller is in, with the stored values as the event's old
        values; if that unit of work's session already holds the row, its instance is
        updated and returned. With no unit of work current, or for an object that was
        never saved, RepositoryUsageError says what to do: the change is never dropped.

        An object of another tenant, or ``data`` moving it to another tenant, raises
        TenantMismatchError: here when the session or :func:`alchemium.use_tenant` names
        the tenant, else when the object is flushed in a unit of work of another tenant.
        """
        info = cls._info()
        if not isinstance(obj, info.model):
            raise RepositoryUsageError(
                f"{cls.__name__}.update expects a {info.name}, got {type(obj).__name__}"
            )
        check_data(info, data)
        state = inspect(obj)
        detached = state.session is None
        if info.tenant_column is not None:
            current = current_unit_of_work() if detached else None
            tenant = session_tenant(current.session if current is not None else state.session)
            if tenant is not None:
                # Without a tenant here (no unit of work, no use_tenant), the flush checks.
                check_row_tenant(info, state, tenant)
                given = data.get(info.tenant_column, tenant)
                if given != tenant:
                    raise TenantMismatchError(info.name, pk_of(info, state), tenant, given)
        if detached:
            obj = attach_for_update(info, obj, data, f"{cls.__name__}.update")
            state = inspect(obj)
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
        info = cls._begin(asession, "update_where")
        check_data(info, data)
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
            if recording.wants_events(asession, info, "updated"):
                cols = [info.columns[k] for k in info.columns]
                old_rows = (
                    await asession.execute(select(*cols).where(*where).with_for_update())
                ).all()
                if not old_rows:
                    return 0
                dialect = asession.get_bind().dialect.name
                where = [pk_in(pk_cols, pk_first(info, old_rows), dialect)]
            stmt = update(info.model).where(*where).values(dict(data))
            sync = "fetch" if old_rows is not None else session_sync(asession, info)
            result = await asession.execute(stmt, execution_options={"synchronize_session": sync})
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
        info = cls._begin(asession, "delete")
        current = await load_for_write(
            asession, info, obj, f"{cls.__name__}.delete", include_deleted=False
        )
        if current is None:
            return
        if info.soft_delete_column is not None:
            setattr(current, info.soft_delete_column, utcnow())
            return
        with session_operation(asession, "delete()"):
            await asession.delete(current)

    @classmethod
    async def hard_delete(cls, asession: AsyncSession, obj: ModelT) -> None:
        """Really DELETE ``obj``'s row, soft-deleted or not; like :meth:`delete` otherwise.

        Records ``<entity>_deleted`` (without ``soft``). For a model without soft
        delete it is the same as :meth:`delete`.
        """
        current = await load_for_write(
            asession,
            cls._begin(asession, "hard_delete"),
            obj,
            f"{cls.__name__}.hard_delete",
            include_deleted=True,
        )
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
        info = cls._begin(asession, "restore")
        if info.soft_delete_column is None:
            raise RepositoryUsageError(
                f"{cls.__name__}.restore: {info.name} has no soft delete; "
                "set soft_delete_column on its repository"
            )
        current = await load_for_write(
            asession,
            info,
            obj,
            f"{cls.__name__}.restore",
            include_deleted=True,
            discard_pending=False,
        )
        assert current is not None  # a pending object is returned as it is
        setattr(current, info.soft_delete_column, None)
        return current

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
        info = cls._begin(asession, "delete_where")
        where = build_where(
            info.model,
            filters,
            scope=cls._scope(asession, info, include_deleted=include_deleted),
        )
        soft = info.soft_delete_column is not None and not include_deleted
        stmt: Any = (
            update(info.model).where(*where).values({info.soft_delete_column: utcnow()})
            if soft
            else delete(info.model).where(*where)
        )
        with session_operation(asession, "delete_where()"):
            if recording.wants_events(asession, info, "deleted"):
                cols = [info.columns[k] for k in info.columns]
                rows = (
                    await asession.execute(
                        stmt.returning(*cols), execution_options={"synchronize_session": "fetch"}
                    )
                ).all()
                recording.record_bulk_deletes(asession, info, rows, soft=soft)
                return len(rows)
            result = await asession.execute(
                stmt, execution_options={"synchronize_session": session_sync(asession, info)}
            )
        return int(getattr(result, "rowcount", 0))
