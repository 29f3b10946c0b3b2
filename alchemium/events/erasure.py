"""Erasure by crypto-shredding: personal data in history, unreadable once its subject is erased.

Opt-in, with ``pip install 'alchemium[crypto]'`` (the ``cryptography`` package).
A model whose sensitive columns use ``sensitive_mode = "encrypt"``
(:mod:`alchemium.events.sensitive`) has their values encrypted in its change events
before anything stores them: outbox payloads, audit rows, what subscribers and
brokers receive. Each *subject* (a row of the model: ``"user:42"``, its entity
name and key, see :func:`subject_id`) has its own random 256-bit key, kept in its
own table (``alchemium_subject_keys``), and values are sealed with AES-GCM bound
to the subject (not to the column, so an upcaster may rename a key).

:func:`erase_subject` destroys the subject's key (a tombstone row stays, so values
recorded for it later are stored as ``"[erased]"``, never under a new key). No
history row is rewritten: the subject's values in old audit rows and outbox
payloads stay as they are and can no longer be read. :func:`reveal_payload`,
:func:`reveal_event` and :func:`alchemium.events.audit_history` turn sealed values
back into their JSON forms, or into ``"[erased]"``.

What it does not cover (docs/lifecycle.md): the application's own tables (delete
or anonymise the subject's rows yourself), copies already delivered (brokers,
consumers' databases and logs hold whatever was revealed to them), database
backups, WAL and replicas taken while the key existed, and PostgreSQL's old row
versions of the key table until VACUUM removes them.

The key table is read and written in the committing transaction, by the hook
:class:`SealingHook`, which runs before the outbox and audit hooks.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    LargeBinary,
    MetaData,
    String,
    Table,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from alchemium.domain_event import DomainEvent, PendingEvent
from alchemium.encoding import plain_json
from alchemium.errors import EventConfigurationError, EventDecodeError, EventError
from alchemium.events.outbox_schema import database_now, dialect_of
from alchemium.events.recording import CHANGE_ACTIONS, RecordedChange, entity_config
from alchemium.events.sensitive import ERASED, SensitiveFields, encrypting_fields
from alchemium.events.tables import create_tables, existing_table
from alchemium.modelinfo import model_info
from alchemium.uow import Commit, UnitOfWork, UnitOfWorkHooks, add_hooks

__all__ = [
    "SealingHook",
    "SubjectKeys",
    "create_subject_key_table",
    "default_subject_keys",
    "disable_erasure",
    "enable_erasure",
    "erase_subject",
    "reveal_event",
    "reveal_payload",
    "subject_id",
]

SEALED = "$erasable"  # the key of a sealed value: {"$erasable": token, "subject": id}
_INSERTS: dict[str, Any] = {"postgresql": pg_insert, "sqlite": sqlite_insert}


def _aesgcm() -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as err:
        raise EventConfigurationError(
            "sensitive_mode 'encrypt' needs the cryptography package: "
            "pip install 'alchemium[crypto]'"
        ) from err
    return AESGCM


def subject_id(model: type[Any] | str, key: object) -> str:
    """The subject id of row ``key`` of ``model`` (its entity name, or ``model`` if a str).

    ``subject_id(User, 42) == "user:42"``: the id the key table and
    :func:`erase_subject` use for the personal data of that row.
    """
    if isinstance(model, str):
        return f"{model}:{key}"
    config = entity_config(model)
    return f"{config.entity if config else model_info(model).entity}:{key}"


class SubjectKeys:
    """The table of per-subject keys in ``metadata`` and the statements on it."""

    def __init__(
        self,
        metadata: MetaData,
        *,
        table_name: str = "alchemium_subject_keys",
        schema: str | None = None,
    ) -> None:
        self.metadata = metadata
        table = existing_table(metadata, table_name, schema)
        self.table = (
            table
            if table is not None
            else Table(
                table_name,
                metadata,
                Column("subject", String(200), primary_key=True),
                # NULL once erased: the row stays as a tombstone.
                Column("key", LargeBinary, nullable=True),
                Column("created_at", DateTime(timezone=True), nullable=False),
                Column("erased_at", DateTime(timezone=True), nullable=True),
                schema=schema,
            )
        )

    def keys_for(self, session: Session, subjects: Iterable[str]) -> dict[str, bytes | None]:
        """The key of each subject (None if erased), creating missing ones; synchronous.

        Runs in the committing transaction: a key is created only if the data sealed
        with it commits. Concurrent first writes for one subject create one key (the
        insert skips an existing row; the SELECT after it reads the winner).
        """
        wanted = sorted(set(subjects))
        found = self._read(session.execute(self._select(wanted)))
        missing = [s for s in wanted if s not in found]
        if missing:
            insert = (
                _INSERTS[session.get_bind().dialect.name](self.table)
                .values(created_at=database_now())
                .on_conflict_do_nothing()
            )
            session.execute(insert, [{"subject": s, "key": os.urandom(32)} for s in missing])
            found.update(self._read(session.execute(self._select(missing))))
        return found

    async def read(
        self, conn: AsyncSession | AsyncConnection, subjects: Iterable[str]
    ) -> dict[str, bytes | None]:
        """The key of each known subject (None if erased); unknown subjects are absent."""
        wanted = sorted(set(subjects))
        return self._read(await conn.execute(self._select(wanted))) if wanted else {}

    def _select(self, subjects: Sequence[str]) -> Any:
        t = self.table
        return select(t.c.subject, t.c.key).where(t.c.subject.in_(list(subjects)))

    @staticmethod
    def _read(rows: Iterable[Any]) -> dict[str, bytes | None]:
        return {subject: (bytes(key) if key is not None else None) for subject, key in rows}

    async def erase(self, conn: AsyncSession | AsyncConnection, subject: str) -> bool:
        """Destroy ``subject``'s key; True if there was one. Leaves a tombstone row."""
        t = self.table
        destroyed = await conn.execute(
            update(t)
            .where(t.c.subject == subject, t.c.key.is_not(None))
            .values(key=None, erased_at=database_now())
        )
        if getattr(destroyed, "rowcount", 0):
            return True
        tombstone = (
            _INSERTS[dialect_of(conn)](t)
            .values(subject=subject, key=None, created_at=database_now(), erased_at=database_now())
            .on_conflict_do_nothing()
        )
        await conn.execute(tombstone)
        return False


# -- sealing and revealing values -----------------------------------------------------------


def _aad(subject: str) -> bytes:
    # Bound to the subject, not to the column: an upcaster may rename a key.
    return f"alchemium-subject:{subject}".encode()


def _seal(key: bytes | None, subject: str, field: str, value: Any) -> Any:
    if value is None:
        return None
    if key is None:  # the subject was erased: nothing of it is stored again
        return ERASED
    nonce = os.urandom(12)
    sealed = _aesgcm()(key).encrypt(nonce, json.dumps(value).encode(), _aad(subject))
    return {SEALED: base64.b64encode(nonce + sealed).decode(), "subject": subject}


def _open(keys: Mapping[str, bytes | None], field: str, value: Mapping[str, Any]) -> Any:
    subject = str(value.get("subject"))
    if subject not in keys:
        raise EventDecodeError(
            field,
            "(sealed)",
            "a value sealed with a subject key",
            reason=f"no key row for subject {subject!r}: the key table was not restored "
            "with the data, or the value comes from another database",
        )
    key = keys[subject]
    if key is None:
        return ERASED
    try:
        raw = base64.b64decode(str(value[SEALED]))
        plain = _aesgcm()(key).decrypt(raw[:12], raw[12:], _aad(subject))
    except Exception as err:
        raise EventDecodeError(
            field,
            "(sealed)",
            "a value sealed with a subject key",
            reason=f"it does not open with the key of {subject!r} ({type(err).__name__})",
        ) from err
    return json.loads(plain)


def _sealed_subjects(value: Any, found: set[str]) -> set[str]:
    if isinstance(value, Mapping):
        if SEALED in value:
            found.add(str(value.get("subject")))
        else:
            for item in value.values():
                _sealed_subjects(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _sealed_subjects(item, found)
    return found


def _reveal(value: Any, keys: Mapping[str, bytes | None], field: str) -> Any:
    if isinstance(value, Mapping):
        if SEALED in value:
            return _open(keys, field, value)
        # An update diff seals "old"/"new" under the column's name, the field here.
        inner = field if set(value) <= {"old", "new"} else None
        return {k: _reveal(v, keys, inner or k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_reveal(v, keys, field) for v in value]
    return value


async def reveal_payload(
    session: AsyncSession | AsyncConnection,
    payload: Mapping[str, Any],
    *,
    keys: SubjectKeys | None = None,
) -> dict[str, Any]:
    """``payload`` (or an audit row's changes) with its sealed values opened.

    Each sealed value becomes its JSON form, or ``"[erased]"`` if its subject was
    erased. One SELECT of the keys involved (none if nothing is sealed). Raises
    EventDecodeError, naming the field, for a value whose key row is missing or that
    does not open with its key.
    """
    plain = plain_json(payload)
    subjects = _sealed_subjects(plain, set())
    if not subjects:
        return dict(plain)
    found = await _resolve(keys).read(session, subjects)
    return dict(_reveal(plain, found, ""))


async def reveal_event(
    session: AsyncSession | AsyncConnection, event: DomainEvent, *, keys: SubjectKeys | None = None
) -> DomainEvent:
    """``event`` with its payload's sealed values opened (see :func:`reveal_payload`)."""
    payload = await reveal_payload(session, event.payload, keys=keys)
    if payload == plain_json(event.payload):
        return event
    return event.with_payload(payload)


async def erase_subject(
    session: AsyncSession | AsyncConnection, subject: str, *, keys: SubjectKeys | None = None
) -> bool:
    """Destroy ``subject``'s key (``"user:42"``, see :func:`subject_id`); True if it had one.

    Runs one UPDATE (and, for a subject with no key yet, an INSERT of a tombstone) on
    ``session``: commit it. From then on the subject's sealed values read as
    ``"[erased]"`` and new ones are stored as ``"[erased]"``. Erasing twice is harmless.
    """
    if not isinstance(subject, str) or not subject:
        raise EventError(f"erase_subject expects a subject id such as 'user:42', got {subject!r}")
    return await _resolve(keys).erase(session, subject)


# -- the commit hook -----------------------------------------------------------------------


class SealingHook(UnitOfWorkHooks):
    """Seals the sensitive values of change events before the outbox and audit hooks run.

    Added first among the unit of work hooks. Does nothing (one dict lookup) unless
    a model uses ``sensitive_mode = "encrypt"``.
    """

    def before_commit(self, uow: UnitOfWork, session: Session, commit: Commit) -> None:
        """Replace the commit's change events of encrypting models by sealed copies."""
        encrypting = encrypting_fields()
        if not encrypting:
            return
        recorded = commit.recorded
        targets: list[tuple[int, SensitiveFields]] = []
        for i, item in enumerate(recorded):
            entity = item.entity if isinstance(item, RecordedChange) else _entity(item)
            fields = encrypting.get(entity) if entity is not None else None
            if fields is not None and item.name.removeprefix(f"{entity}_") in CHANGE_ACTIONS:
                targets.append((i, fields))
        if not targets:
            return
        keyring = default_subject_keys()
        if keyring is None:
            model = targets[0][1]
            raise EventConfigurationError(
                f"{model.model} has sensitive columns ({', '.join(sorted(model.fields))}) with "
                "sensitive_mode 'encrypt', but erasure is not enabled: call "
                "alchemium.events.enable_erasure(metadata) and create its table",
                model=model.model,
            )
        events = [(i, fields, _built(recorded[i])) for i, fields in targets]
        keys = keyring.keys_for(
            session, (f"{e.aggregate_type}:{e.aggregate_id}" for _, _, e in events)
        )
        for i, fields, event in events:
            subject = f"{event.aggregate_type}:{event.aggregate_id}"
            recorded[i] = event.with_payload(
                _sealed_payload(plain_json(event.payload), fields, subject, keys[subject])
            )


def _entity(item: Any) -> str | None:
    return item.aggregate_type if isinstance(item, DomainEvent) else None


def _built(item: DomainEvent | PendingEvent) -> DomainEvent:
    return item if isinstance(item, DomainEvent) else item.build()


def _sealed_payload(
    payload: dict[str, Any], fields: SensitiveFields, subject: str, key: bytes | None
) -> dict[str, Any]:
    changes = payload.get("changes")
    if len(payload) == 1 and isinstance(changes, Mapping):
        return {
            "changes": {
                column: (
                    {side: _seal(key, subject, column, v) for side, v in diff.items()}
                    if column in fields.fields and isinstance(diff, Mapping)
                    else diff
                )
                for column, diff in changes.items()
            }
        }
    return {
        column: _seal(key, subject, column, value) if column in fields.fields else value
        for column, value in payload.items()
    }


_default: list[SubjectKeys] = []
_hook = SealingHook()
add_hooks(_hook, first=True)


def enable_erasure(metadata: MetaData, **options: Any) -> SubjectKeys:
    """Add the subject key table to ``metadata`` and seal ``encrypt``-mode values with it.

    Checks that ``cryptography`` is installed (EventConfigurationError otherwise).
    Call it before ``create_all`` / Alembic autogenerate, or create the table with
    :func:`create_subject_key_table`.
    """
    _aesgcm()
    keys = SubjectKeys(metadata, **options)
    _default[:] = [keys]
    return keys


def disable_erasure() -> None:
    """Forget the key table (commits with ``encrypt``-mode values then raise)."""
    _default.clear()


def default_subject_keys() -> SubjectKeys | None:
    """The key table set by :func:`enable_erasure`, if any."""
    return _default[0] if _default else None


def _resolve(keys: SubjectKeys | None) -> SubjectKeys:
    found = keys or default_subject_keys()
    if found is None:
        raise EventError("erasure is not enabled; call enable_erasure(metadata) first")
    return found


async def create_subject_key_table(engine: AsyncEngine, keys: SubjectKeys | None = None) -> None:
    """Create the subject key table if it does not exist; nothing else."""
    table = _resolve(keys)
    await create_tables(engine, table.metadata, [table.table])
