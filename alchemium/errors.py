"""The alchemium error hierarchy and the mapping from database driver errors.

Every exception the public API raises is an :class:`AlchemiumError`. Driver
errors are never leaked bare: they are mapped to the most specific subclass and
kept as ``__cause__``::

    AlchemiumError
    ├── RepositoryUsageError          the API was used the wrong way (no model set, ...)
    │   ├── UnitOfWorkError           session outside the block, entered twice, two tasks
    │   └── TenantRequiredError       a tenant-scoped model used with no tenant set
    ├── QueryError                    a filter / order_by / pagination argument is invalid
    │   ├── FieldNotFoundError
    │   ├── RelationNotFoundError
    │   ├── OrderByFieldError
    │   ├── InvalidFilterError
    │   └── PaginationParameterError
    ├── NotFoundError                 a row that must exist does not
    ├── MultipleResultsError          a strict lookup matched more than one row
    ├── TenantMismatchError           a write touches a row of another tenant
    ├── ConcurrencyConflictError      optimistic locking: the row changed under us
    ├── IntegrityViolation            the database refused the data
    │   ├── UniqueViolation
    │   ├── ForeignKeyViolation
    │   ├── NotNullViolation
    │   └── CheckViolation
    ├── DataValidationError           a value has the wrong type / shape for its column
    ├── DatabaseProgrammingError      the database refused the statement itself: a missing
    │                                 table or column, bad SQL, no unique constraint for an
    │                                 ON CONFLICT target (a bug or an old schema: not retried)
    ├── TransactionError              the transaction could not complete (connection lost, ...)
    │   ├── SerializationFailure      SQLSTATE 40001, safe to retry
    │   ├── DeadlockDetected          SQLSTATE 40P01, safe to retry
    │   └── CommitOutcomeUnknownError the connection was lost while COMMIT was in flight
    └── EventError
        ├── EventSerializationError   an event payload holds a value no encoder knows
        ├── EventConfigurationError   a model's events or a subscription cannot work as declared
        ├── EventDecodeError          a delivered payload value is not the JSON form of its type
        ├── UpcastError               a stored event cannot be brought to its current schema version
        └── OutboxError               the outbox is misconfigured or unreachable

Every error has a ``transient`` attribute: True when the same work, run again in a new
unit of work, may succeed and nothing of the failed attempt was committed (a
serialization failure, a deadlock, a lost connection before COMMIT, a busy SQLite
database). ``run_in_transaction`` retries exactly those. Bugs (a missing column,
invalid data) are never transient, and neither is a commit whose outcome is unknown.

PostgreSQL errors are mapped by SQLSTATE, SQLite errors by their extended error
code (``sqlite_errorcode``), never by searching the message text. The only text
read from a message is the SQLite column name, which that driver gives nowhere
else.

Why this module is long (about 650 lines): one class per error, each building its
message from its fields, and the one mapping from driver errors to them; the tree
above is only true if they stay together.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.exc import ObjectDeletedError, StaleDataError

__all__ = [
    "AlchemiumError",
    "CheckViolation",
    "CommitOutcomeUnknownError",
    "ConcurrencyConflictError",
    "DataValidationError",
    "DatabaseProgrammingError",
    "DeadlockDetected",
    "EventConfigurationError",
    "EventDecodeError",
    "EventError",
    "EventSerializationError",
    "FieldNotFoundError",
    "ForeignKeyViolation",
    "IntegrityViolation",
    "InvalidFilterError",
    "MultipleResultsError",
    "NotFoundError",
    "NotNullViolation",
    "OrderByFieldError",
    "OutboxError",
    "PaginationParameterError",
    "QueryError",
    "RelationNotFoundError",
    "RepositoryUsageError",
    "SerializationFailure",
    "TenantMismatchError",
    "TenantRequiredError",
    "TransactionError",
    "UniqueViolation",
    "UnitOfWorkError",
    "UpcastError",
    "db_errors",
    "is_disconnect",
    "map_db_error",
    "raise_mapped",
]


def _choices(valid: Iterable[str]) -> str:
    return ", ".join(sorted(valid)) or "(none)"


class AlchemiumError(Exception):
    """Base class of every error raised by alchemium.

    ``transient``: whether running the same work again, in a new unit of work, may
    succeed, nothing of this attempt having been committed. False unless a subclass
    (or the instance) says otherwise; ``run_in_transaction`` retries transient errors.
    """

    transient: bool = False


class RepositoryUsageError(AlchemiumError):
    """The library was used in a way it does not support (for example no ``model`` set)."""


class UnitOfWorkError(RepositoryUsageError):
    """A UnitOfWork was used outside its ``async with`` block, re-entered, or shared by tasks."""


class TenantRequiredError(RepositoryUsageError):
    """A tenant-scoped model was read or written while no tenant was set.

    Raised instead of returning every tenant's rows: set one with
    ``UnitOfWork(factory, tenant=...)`` or :func:`alchemium.use_tenant`.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(
            f"{model} is tenant-scoped but no tenant is set; pass UnitOfWork(..., tenant=...) "
            "or wrap the work in alchemium.use_tenant(...)"
        )


class QueryError(AlchemiumError):
    """An argument describing a query (filter, ordering, pagination) is invalid."""


class FieldNotFoundError(QueryError):
    """A filter or data key names a field that the model does not have."""

    def __init__(self, model: str, field: str, valid: Iterable[str]) -> None:
        self.model, self.field, self.valid = model, field, sorted(valid)
        super().__init__(f"{model} has no field {field!r}; valid fields: {_choices(self.valid)}")


class RelationNotFoundError(QueryError):
    """A filter path or eager load names a relationship that the model does not have."""

    def __init__(self, model: str, relation: str, valid: Iterable[str]) -> None:
        self.model, self.relation, self.valid = model, relation, sorted(valid)
        super().__init__(
            f"{model} has no relationship {relation!r}; valid relationships: {_choices(self.valid)}"
        )


class OrderByFieldError(QueryError):
    """An ``order_by`` entry is not a column of the model."""

    def __init__(self, model: str, field: object, valid: Iterable[str]) -> None:
        self.model, self.field, self.valid = model, field, sorted(valid)
        super().__init__(
            f"cannot order {model} by {field!r}; use a column name, optionally prefixed "
            f"with '-' for descending: {_choices(self.valid)}"
        )


class InvalidFilterError(QueryError):
    """A filter key, operator or value is malformed."""

    def __init__(self, model: str, key: str, reason: str) -> None:
        self.model, self.key, self.reason = model, key, reason
        super().__init__(f"invalid filter {key!r} on {model}: {reason}")


class PaginationParameterError(QueryError):
    """``skip``/``limit``/``page``/``page_size`` is not an acceptable integer."""

    def __init__(self, model: str, parameter: str, value: object, expected: str) -> None:
        self.model, self.parameter, self.value = model, parameter, value
        super().__init__(f"{parameter}={value!r} for {model}: expected {expected}")


class NotFoundError(AlchemiumError):
    """No row matched where one was required."""

    def __init__(self, model: str, criteria: object) -> None:
        self.model, self.criteria = model, criteria
        super().__init__(f"no {model} matches {criteria!r}")


class MultipleResultsError(AlchemiumError):
    """A strict lookup matched more than one row."""

    def __init__(self, model: str, criteria: object) -> None:
        self.model, self.criteria = model, criteria
        super().__init__(f"more than one {model} matches {criteria!r}")


class TenantMismatchError(AlchemiumError):
    """A write (create, update, delete, restore) touches a row of another tenant.

    Reads never raise it: rows of other tenants are simply invisible to them.
    """

    def __init__(self, model: str, primary_key: object, tenant: object, row_tenant: object) -> None:
        self.model, self.primary_key = model, primary_key
        self.tenant, self.row_tenant = tenant, row_tenant
        super().__init__(
            f"{model} {primary_key!r} belongs to tenant {row_tenant!r}, "
            f"not to the current tenant {tenant!r}; it cannot be written here"
        )


class ConcurrencyConflictError(AlchemiumError):
    """The row was changed or deleted by another transaction since it was loaded."""

    def __init__(self, model: str, primary_key: object) -> None:
        self.model, self.primary_key = model, primary_key
        super().__init__(
            f"{model} {primary_key!r} was modified or deleted by another transaction; "
            "reload it and retry"
        )


class IntegrityViolation(AlchemiumError):
    """The database rejected the data because it breaks a constraint."""

    kind = "integrity constraint"

    def __init__(
        self,
        *,
        constraint: str | None = None,
        table: str | None = None,
        column: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.constraint, self.table, self.column, self.detail = constraint, table, column, detail
        where = ", ".join(
            f"{label} {value}"
            for label, value in (("constraint", constraint), ("table", table), ("column", column))
            if value
        )
        message = f"{self.kind} violated" + (f" ({where})" if where else "")
        super().__init__(message + (f": {detail}" if detail else ""))


class UniqueViolation(IntegrityViolation):
    """A unique or primary key constraint was violated."""

    kind = "unique constraint"


class ForeignKeyViolation(IntegrityViolation):
    """A foreign key constraint was violated."""

    kind = "foreign key constraint"


class NotNullViolation(IntegrityViolation):
    """A NOT NULL column received no value."""

    kind = "not-null constraint"


class CheckViolation(IntegrityViolation):
    """A CHECK constraint was violated."""

    kind = "check constraint"


class DataValidationError(AlchemiumError):
    """A value does not fit its column (wrong type, out of range, too long)."""

    def __init__(self, message: str, *, model: str | None = None, field: str | None = None):
        self.model, self.field = model, field
        super().__init__(message)


class TransactionError(AlchemiumError):
    """The transaction could not complete; nothing of it was committed unless stated.

    Transient (the connection was lost before COMMIT, the database is busy or
    restarting) unless ``transient=False`` says otherwise, as for an error the
    mapping does not know.
    """

    transient = True

    def __init__(self, message: str = "", *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient


class CommitOutcomeUnknownError(TransactionError):
    """The connection was lost while COMMIT was in flight: it may or may not have committed.

    Never transient: retrying could apply the work twice. Check whether the work is
    there (by a key you chose) before doing it again.
    """

    transient = False


class DatabaseProgrammingError(AlchemiumError):
    """The database refused the statement itself: a bug or a schema out of date, not an outage.

    A table or column that does not exist (migrations not run?), an ON CONFLICT target
    with no matching unique constraint, SQL the database cannot parse, a permission
    missing. PostgreSQL SQLSTATE class 42 and ``0A000``; SQLite's ``SQLITE_ERROR``.
    Retrying cannot help (``transient`` is False).
    """


class SerializationFailure(TransactionError):
    """A serializable transaction conflicted with another (SQLSTATE 40001); retry it."""


class DeadlockDetected(TransactionError):
    """The database broke a deadlock by aborting this transaction (SQLSTATE 40P01); retry it."""


class EventError(AlchemiumError):
    """Base class of errors about domain events and their delivery."""


class EventSerializationError(EventError):
    """An event payload holds a value that cannot be stored as JSON.

    ``reason`` says why (by default: no encoder knows the value's type); the message
    also says what to do about it.
    """

    def __init__(self, event: str, field: str, value: object, *, reason: str | None = None):
        self.event, self.field, self.value = event, field, value
        kind = type(value)
        what = reason or (
            f"no encoder knows {kind.__module__}.{kind.__qualname__}: register one with "
            "alchemium.register_encoder(type, encode, decode), or, for a column, leave it out "
            "of the events with event_exclude / event_transform on its repository"
        )
        super().__init__(f"event {event!r}: field {field!r} holds {_shown(value)}: {what}")


class EventConfigurationError(EventError):
    """A model's events or a subscription are declared in a way that cannot work.

    Raised when the declaration is made (a repository class is defined, a subscriber
    or destination registered), never later at a commit: a column whose type no
    encoder knows, an excluded or transformed field that is not a column, an event
    pattern with unsupported syntax. ``model`` and ``field`` are set when it is about
    a column.
    """

    def __init__(self, message: str, *, model: str | None = None, field: str | None = None):
        self.model, self.field = model, field
        super().__init__(message)


class EventDecodeError(EventError):
    """A payload value is not the JSON form (docs/events.md) of the type it is decoded as."""

    def __init__(
        self, field: str, value: object, expected: str, *, reason: str | None = None
    ) -> None:
        self.field, self.value, self.expected = field, value, expected
        where = f"{field}: " if field else ""
        why = f" ({reason})" if reason else ""
        super().__init__(f"{where}cannot decode {_shown(value)} as {expected}{why}")


def _shown(value: object) -> str:
    """``value`` for an error message: its type and a repr cut short (blobs, secrets)."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


class UpcastError(EventError):
    """A stored event cannot be brought to the current schema version of its name.

    Its upcaster raised (the error is ``__cause__``), no upcaster exists from its
    stored version, or it was stored at a version newer than this code knows (a
    rollback after newer code wrote it). The message names the event, its id and
    its stored version; a relay records it on the delivery row, which is retried and
    then dead, to be requeued once the upcaster is fixed.
    """

    def __init__(
        self, event: str, event_id: object, stored_version: int, current_version: int, why: str
    ) -> None:
        self.event, self.event_id = event, event_id
        self.stored_version, self.current_version = stored_version, current_version
        super().__init__(
            f"event {event!r} ({event_id}) stored at schema version {stored_version}, "
            f"current version {current_version}: {why}"
        )


class OutboxError(EventError):
    """The outbox is misconfigured (missing table, unknown destination, ...)."""


_PG_SQLSTATE: dict[str, type[AlchemiumError]] = {
    "23505": UniqueViolation,
    "23503": ForeignKeyViolation,
    "23502": NotNullViolation,
    "23514": CheckViolation,
    "40001": SerializationFailure,
    "40P01": DeadlockDetected,
    "40003": CommitOutcomeUnknownError,  # statement_completion_unknown
    "0A000": DatabaseProgrammingError,  # feature_not_supported
}

# SQLSTATE classes and codes of a transaction that may succeed when run again.
_PG_TRANSIENT_CLASSES = ("08", "53")  # connection exception, insufficient resources
_PG_TRANSIENT = frozenset({"55P03", "57P01", "57P02", "57P03", "57014", "40000"})

# SQLite extended result codes (https://www.sqlite.org/rescode.html).
_SQLITE_CODES: dict[int, type[AlchemiumError]] = {
    2067: UniqueViolation,  # SQLITE_CONSTRAINT_UNIQUE
    1555: UniqueViolation,  # SQLITE_CONSTRAINT_PRIMARYKEY
    787: ForeignKeyViolation,  # SQLITE_CONSTRAINT_FOREIGNKEY
    1299: NotNullViolation,  # SQLITE_CONSTRAINT_NOTNULL
    275: CheckViolation,  # SQLITE_CONSTRAINT_CHECK
    5: TransactionError,  # SQLITE_BUSY
    6: TransactionError,  # SQLITE_LOCKED
    517: SerializationFailure,  # SQLITE_BUSY_SNAPSHOT: a WAL snapshot went stale, retry
    1: DatabaseProgrammingError,  # SQLITE_ERROR: no such table/column, syntax, ON CONFLICT
}

# Python < 3.11 has no sqlite_errorcode; the message prefix is then the only signal.
_SQLITE_PREFIXES: tuple[tuple[str, type[AlchemiumError]], ...] = (
    ("UNIQUE constraint failed", UniqueViolation),
    ("FOREIGN KEY constraint failed", ForeignKeyViolation),
    ("NOT NULL constraint failed", NotNullViolation),
    ("CHECK constraint failed", CheckViolation),
    ("no such table", DatabaseProgrammingError),
    ("no such column", DatabaseProgrammingError),
    ("ON CONFLICT clause does not match", DatabaseProgrammingError),
)

_SQLITE_TARGET = re.compile(r"constraint failed: ([\w.]+)")


def _driver_error(err: BaseException) -> BaseException:
    """The innermost driver exception of a SQLAlchemy DBAPIError."""
    orig: BaseException = getattr(err, "orig", None) or err
    cause = orig.__cause__
    # asyncpg errors arrive wrapped in SQLAlchemy's adapter exception.
    if cause is not None and type(cause).__module__.startswith("asyncpg"):
        return cause
    return orig


def _sqlstate(driver: BaseException, orig: BaseException) -> str | None:
    for candidate in (driver, orig):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


def _integrity(cls: type[AlchemiumError], driver: BaseException) -> AlchemiumError:
    assert issubclass(cls, IntegrityViolation)
    constraint = getattr(driver, "constraint_name", None)
    table = getattr(driver, "table_name", None)
    column = getattr(driver, "column_name", None)
    detail = getattr(driver, "detail", None)
    if constraint is None and table is None and column is None:
        # SQLite names the target only in its message: "UNIQUE constraint failed: t.c" (the
        # column), "CHECK constraint failed: ck_name" (the constraint's name or expression).
        match = _SQLITE_TARGET.search(str(driver))
        if match and cls is CheckViolation:
            constraint = match.group(1)
        elif match:
            table, _, column = match.group(1).partition(".")
        detail = detail or str(driver)
    return cls(constraint=constraint, table=table, column=column or None, detail=detail)


def map_db_error(err: BaseException) -> AlchemiumError | None:
    """Return the alchemium exception for a SQLAlchemy/driver error, or None if not a DB error.

    The caller raises the result ``from err`` so the driver error stays the ``__cause__``.
    """
    if isinstance(err, AlchemiumError):
        return err
    if isinstance(err, OSError):
        # SQLAlchemy does not wrap errors raised while connecting: a refused or timed-out
        # connection (the server is down or restarting) arrives as the socket error itself.
        return TransactionError(f"could not reach the database: {type(err).__name__}: {err}")
    if isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated:
        driver = _driver_error(err)
        return TransactionError(f"the connection was lost: {type(driver).__name__}: {driver}")
    if not isinstance(err, sa_exc.DBAPIError):
        if isinstance(err, sa_exc.StatementError):
            # A parameter that SQLAlchemy could not bind (wrong type for the column type).
            return DataValidationError(f"invalid parameter value: {err.orig or err}")
        return None
    orig = err.orig if err.orig is not None else err
    driver = _driver_error(err)
    sqlstate = _sqlstate(driver, orig)
    cls: type[AlchemiumError] | None = None
    if sqlstate is not None:
        cls = _PG_SQLSTATE.get(sqlstate)
        if cls is None and sqlstate.startswith("22"):
            return DataValidationError(f"invalid data (SQLSTATE {sqlstate}): {driver}")
        if cls is None and sqlstate.startswith("23"):
            cls = IntegrityViolation
        if cls is None and sqlstate.startswith("42"):
            cls = DatabaseProgrammingError
        if cls is None:
            transient = sqlstate in _PG_TRANSIENT or sqlstate.startswith(_PG_TRANSIENT_CLASSES)
            return TransactionError(
                f"database error (SQLSTATE {sqlstate}): {type(driver).__name__}: {driver}",
                transient=transient,
            )
    else:
        code = getattr(orig, "sqlite_errorcode", None)
        if isinstance(code, int):
            cls = _SQLITE_CODES.get(code)
            if cls is None and code & 0xFF == 19:  # any other SQLITE_CONSTRAINT_*
                cls = IntegrityViolation
        else:
            message = str(orig)
            cls = next((c for prefix, c in _SQLITE_PREFIXES if message.startswith(prefix)), None)
    if cls is not None and issubclass(cls, IntegrityViolation):
        return _integrity(cls, driver)
    if cls is not None:
        summary = (cls.__doc__ or cls.__name__).split("\n", 1)[0]
        return cls(f"{summary}: {driver}".strip())
    if type(driver).__name__ == "DataError" or isinstance(err, sa_exc.DataError):
        return DataValidationError(f"invalid data: {driver}")
    if isinstance(err, sa_exc.ProgrammingError):
        return DatabaseProgrammingError(f"the database refused the statement: {driver}")
    return TransactionError(f"database error: {type(driver).__name__}: {driver}", transient=False)


def is_disconnect(err: BaseException) -> bool:
    """Whether ``err`` (or its cause chain) is a lost or refused connection."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) or getattr(seen, "connection_invalidated", False):
            return True
        seen = seen.__cause__
    return False


@contextmanager
def db_errors(session: Any = None) -> Iterator[None]:
    """Map database errors raised in the block to alchemium exceptions (see raise_mapped)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - always re-raised, mapped or unchanged
        raise_mapped(err, session)


def raise_mapped(err: BaseException, session: Any = None) -> NoReturn:
    """Re-raise a database error as its alchemium exception with the original as ``__cause__``.

    Errors that are not database errors (the user's own) are re-raised unchanged.
    ``session`` helps name the row of an optimistic-locking conflict.
    """
    if isinstance(err, StaleDataError):
        raise _stale(err, session) from err
    if isinstance(err, ObjectDeletedError):
        # An expired attribute was loaded for a row that no longer exists.
        raise _vanished(session) from err
    if isinstance(err, sa_exc.PendingRollbackError):
        raise TransactionError(
            "the transaction already failed (an earlier error was caught and ignored); "
            "nothing of it is committed. Let the error end the unit of work, or call "
            "rollback() before going on"
        ) from err
    if isinstance(err, sa_exc.InvalidRequestError) and "concurrent operations" in str(err):
        raise UnitOfWorkError(
            "the session was used by two tasks at once; a UnitOfWork and its session belong "
            "to one task at a time"
        ) from err
    mapped = map_db_error(err)
    if mapped is None or mapped is err:
        raise err
    raise mapped from err


_FLUSHED_KEY = "alchemium.rows_in_flush"
_STALE_TABLE = re.compile(r"on table '([^']+)'")


@sa_event.listens_for(Session, "before_flush")
def _remember_flushed_rows(session: Session, _context: Any, _instances: Any) -> None:
    """Note the stored rows a flush updates or deletes: a failed flush forgets them.

    Keeps the instance states only (a flush's hot path); ``_stale`` reads their class,
    table and identity if the flush fails, and a state keeps those across the rollback.
    """
    found = [
        state
        for state in map(instance_state, (*session.dirty, *session.deleted))
        if state.key is not None
    ]
    if found or _FLUSHED_KEY in session.info:
        session.info[_FLUSHED_KEY] = found


def _vanished(session: Any) -> AlchemiumError:
    """NotFoundError for the row a flush was writing when an expired attribute found it gone."""
    candidates = session.info.get(_FLUSHED_KEY, []) if session is not None else []
    if not candidates:
        return NotFoundError("row", None)
    state = candidates[0]
    identity = state.identity
    return NotFoundError(state.class_.__name__, identity[0] if len(identity) == 1 else identity)


def _stale(err: StaleDataError, session: Any) -> AlchemiumError:
    """The row a failed UPDATE/DELETE matched no longer: changed (versioned) or gone.

    StaleDataError names only the table; the row is the one of that table the flush
    was writing. With a version column the row may still exist in a newer version
    (ConcurrencyConflictError); without one, the row is gone (NotFoundError).
    """
    candidates = session.info.get(_FLUSHED_KEY, []) if session is not None else []
    match = _STALE_TABLE.search(str(err))
    if match:
        table = match.group(1)
        candidates = [s for s in candidates if s.mapper.local_table.name == table] or candidates
    if not candidates:
        return ConcurrencyConflictError("row", None)
    state = candidates[0]
    name, identity = state.class_.__name__, state.identity
    versioned = state.mapper.version_id_col is not None
    key = identity[0] if len(identity) == 1 else identity
    return ConcurrencyConflictError(name, key) if versioned else NotFoundError(name, key)
