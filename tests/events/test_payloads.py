"""Change event payloads of every column type, through the outbox and a relay, decoded back.

Each model here holds the column types one dialect returns (the generic ones on SQLite
and PostgreSQL, the PostgreSQL ones only there). A row is created, updated and deleted
through its repository inside a UnitOfWork with the outbox on; a relay delivers each
event, read back from the outbox, to a real subscriber; ``decode_payload`` must give
back the values written (or, for updates and deletes, the values the database held).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import ipaddress
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    Float,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    PickleType,
    SmallInteger,
    String,
    Text,
    Time,
    TypeDecorator,
    Unicode,
    Uuid,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemium import (
    CrudRepository,
    EventConfigurationError,
    UnitOfWork,
)
from alchemium.events import (
    DomainEvent,
    InProcessPublisher,
    OutboxRelay,
    SubscriberRegistry,
    decode_payload,
)
from alchemium.events.outbox import Outbox
from tests.events.conftest import Received
from tests.models import Money, MoneyType

Sessions = async_sessionmaker[AsyncSession]


class PayloadBase(DeclarativeBase):
    """The models of these tests: their tables are created only by the tests that use them."""


class Mood(enum.Enum):
    CALM = "calm"
    ANGRY = "angry"


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Declares no python_type: its values are taken to be its impl's (datetimes)."""

    impl = DateTime(timezone=True)
    cache_ok = True


class EveryGenericColumn(PayloadBase):
    """The generic types, as SQLite (and PostgreSQL) return them."""

    __tablename__ = "every_generic_column"
    id: Mapped[int] = mapped_column(primary_key=True)
    small: Mapped[int | None] = mapped_column(SmallInteger)
    big: Mapped[int | None] = mapped_column(BigInteger)
    flag: Mapped[bool | None] = mapped_column(Boolean)
    ratio: Mapped[float | None] = mapped_column(Float)
    precise: Mapped[float | None] = mapped_column(Double)
    amount: Mapped[decimal.Decimal | None] = mapped_column(Numeric(12, 4))
    loose: Mapped[float | None] = mapped_column(Numeric(12, 4, asdecimal=False))
    label: Mapped[str | None] = mapped_column(String(50))
    body: Mapped[str | None] = mapped_column(Text)
    wide: Mapped[str | None] = mapped_column(Unicode(50))
    day: Mapped[dt.date | None] = mapped_column(Date)
    moment: Mapped[dt.datetime | None] = mapped_column(DateTime)
    aware: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    clock: Mapped[dt.time | None] = mapped_column(Time)
    span: Mapped[dt.timedelta | None] = mapped_column(Interval)
    blob: Mapped[bytes | None] = mapped_column(LargeBinary)
    token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    mood: Mapped[Mood | None] = mapped_column(SAEnum(Mood, name="payload_mood"))
    grade: Mapped[str | None] = mapped_column(SAEnum("a", "b", name="payload_grade"))
    document: Mapped[Any] = mapped_column(JSON, nullable=True)
    pickled: Mapped[Any] = mapped_column(PickleType, nullable=True)
    utc: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class EveryPostgresColumn(PayloadBase):
    """The types of the PostgreSQL dialect, as asyncpg returns them."""

    __tablename__ = "every_postgres_column"
    id: Mapped[int] = mapped_column(primary_key=True)
    blob: Mapped[bytes | None] = mapped_column(pg.BYTEA)
    span: Mapped[dt.timedelta | None] = mapped_column(pg.INTERVAL)
    ratio: Mapped[float | None] = mapped_column(pg.DOUBLE_PRECISION)
    single: Mapped[float | None] = mapped_column(pg.REAL)
    amount: Mapped[decimal.Decimal | None] = mapped_column(pg.NUMERIC)
    host: Mapped[Any] = mapped_column(pg.INET, nullable=True)
    address: Mapped[Any] = mapped_column(pg.INET, nullable=True)
    network: Mapped[Any] = mapped_column(pg.CIDR, nullable=True)
    mac: Mapped[str | None] = mapped_column(pg.MACADDR)
    mac8: Mapped[str | None] = mapped_column(pg.MACADDR8)
    money: Mapped[str | None] = mapped_column(pg.MONEY)
    bits: Mapped[Any] = mapped_column(pg.BIT(4), nullable=True)
    varbits: Mapped[Any] = mapped_column(pg.BIT(varying=True), nullable=True)
    period: Mapped[Any] = mapped_column(pg.TSRANGE, nullable=True)
    aware_period: Mapped[Any] = mapped_column(pg.TSTZRANGE, nullable=True)
    days: Mapped[Any] = mapped_column(pg.DATERANGE, nullable=True)
    amounts: Mapped[Any] = mapped_column(pg.NUMRANGE, nullable=True)
    ints: Mapped[Any] = mapped_column(pg.INT4RANGE, nullable=True)
    bigs: Mapped[Any] = mapped_column(pg.INT8RANGE, nullable=True)
    multi: Mapped[Any] = mapped_column(pg.INT4MULTIRANGE, nullable=True)
    date_multi: Mapped[Any] = mapped_column(pg.DATEMULTIRANGE, nullable=True)
    grid: Mapped[Any] = mapped_column(pg.ARRAY(Integer, dimensions=2), nullable=True)
    words: Mapped[Any] = mapped_column(pg.ARRAY(Text), nullable=True)
    hosts: Mapped[Any] = mapped_column(pg.ARRAY(pg.INET), nullable=True)
    doc: Mapped[Any] = mapped_column(pg.JSONB, nullable=True)
    plain_doc: Mapped[Any] = mapped_column(pg.JSON, nullable=True)
    pairs: Mapped[Any] = mapped_column(pg.HSTORE, nullable=True)
    clock: Mapped[dt.time | None] = mapped_column(pg.TIME(timezone=True))
    moment: Mapped[dt.datetime | None] = mapped_column(pg.TIMESTAMP(timezone=True))
    day: Mapped[dt.date | None] = mapped_column(pg.DATE)
    token: Mapped[uuid.UUID | None] = mapped_column(pg.UUID)
    mood: Mapped[Mood | None] = mapped_column(pg.ENUM(Mood, name="payload_pg_mood"))
    name: Mapped[str | None] = mapped_column(pg.CITEXT)
    search: Mapped[str | None] = mapped_column(pg.TSVECTOR)
    query: Mapped[str | None] = mapped_column(pg.TSQUERY)
    oid: Mapped[int | None] = mapped_column(pg.OID)
    relation: Mapped[str | None] = mapped_column(pg.REGCLASS)


class EveryGenericColumnRepository(CrudRepository[EveryGenericColumn]):
    model = EveryGenericColumn


class EveryPostgresColumnRepository(CrudRepository[EveryPostgresColumn]):
    model = EveryPostgresColumn


GENERIC_CREATED: dict[str, Any] = {
    "small": -32768,
    "big": 2**62,
    "flag": False,
    "ratio": math.nan,
    "precise": math.inf,
    "amount": decimal.Decimal("-12.5000"),
    "loose": 0.25,
    "label": "ünïcödé",
    "body": "",
    "wide": "\N{SNOWMAN}",
    "day": dt.date(1999, 12, 31),
    "moment": dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
    "aware": dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
    "clock": dt.time(0, 0, 0, 1),
    "span": -dt.timedelta(days=2, microseconds=5),
    "blob": b"",
    "token": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "mood": Mood.ANGRY,
    "grade": "b",
    "document": {"nested": [1, {"deep": None}], "text": "x"},
    "pickled": {"any": ("python", "object")},
    "utc": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
}

GENERIC_UPDATED: dict[str, Any] = {
    "small": 1,
    "big": -1,
    "flag": True,
    "ratio": -math.inf,
    "precise": 1.5,
    "amount": decimal.Decimal("99999999.9999"),
    "loose": -0.5,
    "label": "b",
    "body": "long " * 100,
    "wide": "w",
    "day": dt.date(2000, 1, 1),
    "moment": dt.datetime(1970, 1, 1),
    "aware": dt.datetime(2030, 6, 1, tzinfo=dt.timezone.utc),
    "clock": dt.time(23, 59, 59),
    "span": dt.timedelta(days=10_000, seconds=1),
    "blob": bytes(range(256)),
    "token": uuid.UUID(int=0),
    "mood": Mood.CALM,
    "grade": "a",
    "document": [1, 2, 3],
    "pickled": None,
    "utc": dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc),
}

PG_CREATED: dict[str, Any] = {
    "blob": b"",
    "span": dt.timedelta(days=428, seconds=14706, microseconds=700000),
    "ratio": math.nan,
    "single": -math.inf,
    "amount": decimal.Decimal("NaN"),
    "host": ipaddress.ip_interface("192.168.0.1/24"),
    "address": ipaddress.ip_address("2001:db8::1"),
    "network": ipaddress.ip_network("10.0.0.0/8"),
    "mac": "08:00:2b:01:02:03",
    "mac8": "08:00:2b:01:02:03:04:05",
    "money": "$12.50",
    "bits": pg.BitString("1010"),
    "varbits": pg.BitString(""),
    "period": pg.Range(dt.datetime(2024, 1, 1), dt.datetime(2024, 2, 1)),
    "aware_period": pg.Range(dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), None),
    "days": pg.Range(None, dt.date(2024, 1, 1), bounds="(]"),
    "amounts": pg.Range(decimal.Decimal("1.5"), decimal.Decimal("2.5"), bounds="[]"),
    "ints": pg.Range(empty=True),
    "bigs": pg.Range(None, None, bounds="()"),
    "multi": pg.MultiRange([pg.Range(1, 3), pg.Range(5, 7)]),
    "date_multi": pg.MultiRange([]),
    "grid": [[1, 2], [3, None]],
    "words": [],
    "hosts": [ipaddress.ip_address("10.0.0.1"), ipaddress.ip_interface("::1/64")],
    "doc": {"a": {"b": [True, None, 1.5]}},
    "plain_doc": ["x", {"y": 1}],
    "pairs": {"k": "v", "empty": None},
    "clock": dt.time(12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    "moment": dt.datetime(2024, 5, 17, 12, 30, tzinfo=dt.timezone.utc),
    "day": dt.date(2024, 5, 17),
    "token": uuid.uuid4(),
    "mood": Mood.CALM,
    "name": "MixedCase",
    "search": "'a':1 'b':2",
    "query": "'a' & 'b'",
    "oid": 42,
    "relation": "pg_class",
}

PG_UPDATED: dict[str, Any] = {
    "blob": b"\x00" * 3,
    "span": dt.timedelta(0),
    "ratio": math.inf,
    "single": 0.5,
    "amount": decimal.Decimal("-Infinity"),
    "host": ipaddress.ip_interface("10.1.2.3/16"),
    "address": ipaddress.ip_address("127.0.0.1"),
    "network": ipaddress.ip_network("2001:db8::/32"),
    "mac": "08:00:2b:01:02:04",
    "mac8": "08:00:2b:01:02:03:04:06",
    "money": "$0.01",
    "bits": pg.BitString("0101"),
    "varbits": pg.BitString("111"),
    "period": pg.Range(empty=True),
    "aware_period": pg.Range(None, dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)),
    "days": pg.Range(dt.date(2024, 1, 1), dt.date(2024, 12, 31), bounds="[)"),
    "amounts": pg.Range(decimal.Decimal("0"), None),
    "ints": pg.Range(1, 10),
    "bigs": pg.Range(-(2**40), 2**40),
    "multi": pg.MultiRange([pg.Range(10, 20)]),
    "date_multi": pg.MultiRange([pg.Range(dt.date(2024, 1, 1), dt.date(2024, 1, 5))]),
    "grid": [[9]],
    "words": ["with space", "quote'\"", ""],
    "hosts": [],
    "doc": [],
    "plain_doc": {"changed": True},
    "pairs": {},
    "clock": dt.time(0, 0, tzinfo=dt.timezone.utc),
    "moment": dt.datetime(1999, 1, 1, tzinfo=dt.timezone.utc),
    "day": dt.date(1999, 1, 1),
    "token": uuid.UUID(int=7),
    "mood": Mood.ANGRY,
    "name": "other",
    "search": "'c':3",
    "query": "'c'",
    "oid": 7,
    "relation": "pg_type",
}


def same(a: Any, b: Any) -> bool:
    """Equal values of the same type, NaN equal to NaN (floats and Decimals).

    A subclass counts as its type: asyncpg returns its own subclass of uuid.UUID.
    """
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if not (isinstance(a, type(b)) or isinstance(b, type(a))) or isinstance(a, bool) != isinstance(
        b, bool
    ):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, decimal.Decimal) and a.is_nan():
        return bool(b.is_nan())
    return bool(a == b)


def assert_same(decoded: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    if set(expected) == {"changes"}:
        decoded, expected = decoded.get("changes", {}), expected["changes"]
    wrong = {
        k for k in expected.keys() | decoded.keys() if not same(decoded.get(k), expected.get(k))
    }
    assert not wrong, {k: (decoded.get(k), expected.get(k)) for k in sorted(wrong)}


@dataclasses.dataclass
class Consumer:
    """A real subscriber the relay delivers to (through an InProcessPublisher)."""

    events: list[DomainEvent] = dataclasses.field(default_factory=list)

    def handle(self, event: DomainEvent) -> None:
        json.dumps(event.to_dict(), allow_nan=False)  # strict JSON, as a broker would carry it
        self.events.append(event)


@pytest.fixture
def consumer(registry: SubscriberRegistry) -> Consumer:
    """A consumer named ``consumer``: a destination of the units of work, fed by the relay."""
    registry.add_destination("consumer")
    return Consumer()


async def relay_to(consumer: Consumer, session_factory: Sessions, outbox: Outbox) -> DomainEvent:
    """Deliver what is pending for ``consumer`` with a relay; the one event delivered."""
    consumers = SubscriberRegistry("consumer side")
    consumers.subscribe("*", consumer.handle, name="consumer")
    relay = OutboxRelay(session_factory, InProcessPublisher(consumers), listen=False, outbox=outbox)
    before = len(consumer.events)
    assert await relay.run_once() == 1
    assert len(consumer.events) == before + 1
    return consumer.events[-1]


def columns_of(obj: Any, model: type[Any]) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in model.__table__.columns}


@pytest.fixture
async def payload_tables(engine: AsyncEngine) -> None:
    tables = [EveryGenericColumn.__table__]
    if engine.dialect.name == "postgresql":
        tables.append(EveryPostgresColumn.__table__)
        async with engine.begin() as conn:
            await conn.execute(text("CREATE EXTENSION IF NOT EXISTS hstore"))
            await conn.execute(text("CREATE EXTENSION IF NOT EXISTS citext"))
    async with engine.begin() as conn:
        await conn.run_sync(PayloadBase.metadata.create_all, tables=tables)


@pytest.mark.parametrize(
    ("repository", "created", "updated", "only_on"),
    [
        pytest.param(
            EveryGenericColumnRepository, GENERIC_CREATED, GENERIC_UPDATED, None, id="generic"
        ),
        pytest.param(
            EveryPostgresColumnRepository, PG_CREATED, PG_UPDATED, "postgresql", id="postgres"
        ),
    ],
)
async def test_every_column_type_round_trips_through_the_relay(
    backend: str,
    session_factory: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    consumer: Consumer,
    payload_tables: None,
    repository: Any,
    created: dict[str, Any],
    updated: dict[str, Any],
    only_on: str | None,
) -> None:
    if only_on is not None and backend != only_on:
        pytest.skip("PostgreSQL only: INET, ranges, arrays, HSTORE... are PostgreSQL types")
    model = repository.model
    async with UnitOfWork(session_factory, registry=registry) as uow:
        row = await repository.create(uow.session, created)
        await uow.flush()
        row_id = row.id
    event = await relay_to(consumer, session_factory, outbox)
    assert event.name.endswith("_created")
    assert_same(decode_payload(model, event.payload), {"id": row_id, **created})

    async with UnitOfWork(session_factory, registry=registry) as uow:
        row = await repository.get(uow.session, row_id)
        stored = columns_of(row, model)  # what the database returned
        repository.update(row, updated)
    event = await relay_to(consumer, session_factory, outbox)
    assert event.name.endswith("_updated")
    expected = {
        key: {"old": stored[key], "new": value}
        for key, value in updated.items()
        if not same(stored[key], value)
    }
    assert_same(decode_payload(model, event.payload), {"changes": expected})

    async with UnitOfWork(session_factory, registry=registry) as uow:
        row = await repository.get(uow.session, row_id)
        stored = columns_of(row, model)
        await repository.delete(uow.session, row)
    event = await relay_to(consumer, session_factory, outbox)
    assert event.name.endswith("_deleted")
    assert_same(decode_payload(model, event.payload), stored)


# -- what a model's events carry: event_exclude, event_transform -------------------------


class Account(PayloadBase):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    avatar: Mapped[bytes | None] = mapped_column(LargeBinary)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class AccountRepository(CrudRepository[Account]):
    model = Account
    soft_delete_column = "deleted_at"
    event_exclude = ("password_hash",)
    event_transform = {"avatar": len}


@pytest.fixture
async def accounts(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(PayloadBase.metadata.create_all, tables=[Account.__table__])


def assert_policy_held(received: Received) -> None:
    for event in received.events:
        values = event.payload.get("changes", event.payload)
        assert "password_hash" not in values, event
        avatar = values.get("avatar")
        sizes = [avatar["old"], avatar["new"]] if isinstance(avatar, Mapping) else [avatar]
        assert all(size is None or isinstance(size, int) for size in sizes), event


async def test_excluded_and_transformed_columns_in_every_change_event(
    session_factory: Sessions, registry: SubscriberRegistry, received: Received, accounts: None
) -> None:
    secret = {"password_hash": "$argon2$secret"}
    async with UnitOfWork(session_factory, registry=registry) as uow:
        account = await AccountRepository.create(
            uow.session, {"name": "ann", "avatar": b"abc", **secret}
        )
        await uow.flush()
        AccountRepository.update(account, {"avatar": b"abcde", "name": "anne"})
        await uow.flush()
        AccountRepository.update(account, {"password_hash": "$argon2$new"})  # no event
        await uow.flush()
        await AccountRepository.delete(uow.session, account)  # soft
        await uow.flush()
        await AccountRepository.restore(uow.session, account)
        await uow.flush()
        await AccountRepository.hard_delete(uow.session, account)
    assert received.names() == [
        "account_created",
        "account_updated",
        "account_deleted",
        "account_restored",
        "account_deleted",
    ]
    created, updated, soft, restored, hard = received.events
    assert dict(created.payload) == {"id": account.id, "name": "ann", "avatar": 3}
    assert decode_payload(Account, updated.payload) == {
        "changes": {"avatar": {"old": 3, "new": 5}, "name": {"old": "ann", "new": "anne"}}
    }
    assert soft.payload["soft"] is True
    assert restored.payload["avatar"] == 5
    assert hard.payload["avatar"] == 5
    assert_policy_held(received)


async def test_bulk_operations_honour_the_event_policy(
    session_factory: Sessions, registry: SubscriberRegistry, received: Received, accounts: None
) -> None:
    async with UnitOfWork(session_factory, registry=registry) as uow:
        await AccountRepository.create_many(
            uow.session,
            [
                {"name": "a", "password_hash": "h1", "avatar": b"1"},
                {"name": "b", "password_hash": "h2", "avatar": None},
            ],
        )
        await AccountRepository.upsert_many(
            uow.session, [{"name": "a", "password_hash": "h3", "avatar": b"12"}], conflict=["name"]
        )
        await AccountRepository.update_where(
            uow.session, {"name": "b"}, {"password_hash": "h4", "avatar": b"1234"}
        )
        await AccountRepository.update_where(uow.session, {"name": "a"}, {"password_hash": "h5"})
        await AccountRepository.delete_where(uow.session, {"name": "a"})
        await AccountRepository.delete_where(uow.session, {}, include_deleted=True)
    assert received.names() == [
        "account_created",
        "account_created",
        "account_upserted",
        "account_updated",  # b's avatar; a's password change alone records nothing
        "account_deleted",
        "account_deleted",
        "account_deleted",
    ]
    assert [e.payload.get("avatar") for e in received.events[:3]] == [1, None, 2]
    assert dict(received.events[3].payload) == {"changes": {"avatar": {"old": None, "new": 4}}}
    assert_policy_held(received)


class Profile(PayloadBase):
    __tablename__ = "profiles"
    id: Mapped[int] = mapped_column(primary_key=True)
    bio: Mapped[str] = mapped_column(String(200))
    secret: Mapped[str | None] = mapped_column(String(200))


def test_event_policy_mistakes_are_refused_when_the_repository_is_defined() -> None:
    with pytest.raises(EventConfigurationError, match=r"Profile has no column 'secrett'"):

        class Misspelt(CrudRepository[Profile]):
            model = Profile
            event_exclude = ("secrett",)

    with pytest.raises(EventConfigurationError, match="not a string"):

        class NotATuple(CrudRepository[Profile]):
            model = Profile
            event_exclude = "secret"

    with pytest.raises(EventConfigurationError, match="both"):

        class Both(CrudRepository[Profile]):
            model = Profile
            event_exclude = ("secret",)
            event_transform = {"secret": str.upper}

    class ProfileRepository(CrudRepository[Profile]):
        model = Profile
        event_exclude = ("secret",)

    class ReadOnlyProfiles(CrudRepository[Profile]):  # declares nothing: the policy stays
        model = Profile

    with pytest.raises(EventConfigurationError, match="declare it once"):

        class Leaky(CrudRepository[Profile]):
            model = Profile
            event_exclude = ()

    assert ProfileRepository.event_exclude == ("secret",)
    assert ReadOnlyProfiles.event_exclude is None


# -- types of the application: encoders, and the check when a model is configured -----------


class Invoice(PayloadBase):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[Money] = mapped_column(MoneyType)


def test_a_column_no_encoder_knows_is_reported_when_the_repository_is_defined() -> None:
    with pytest.raises(EventConfigurationError) as info:

        class InvoiceRepository(CrudRepository[Invoice]):
            model = Invoice

    assert (info.value.model, info.value.field) == ("Invoice", "total")
    message = str(info.value)
    assert "Invoice.total" in message
    assert "tests.models.Money" in message
    assert "register_encoder(Money" in message
    assert "event_exclude = ('total',)" in message
    assert "record_events = False" in message

    class Untracked(CrudRepository[Invoice]):  # each way out is accepted
        model = Invoice
        record_events = False


async def test_a_registered_encoder_serves_change_events_custom_events_and_cursors(
    money_encoder: None,
    engine: AsyncEngine,
    session_factory: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    consumer: Consumer,
) -> None:
    class InvoiceRepository(CrudRepository[Invoice]):
        model = Invoice

    async with engine.begin() as conn:
        await conn.run_sync(PayloadBase.metadata.create_all, tables=[Invoice.__table__])
    async with UnitOfWork(session_factory, registry=registry) as uow:
        for cents in (100, 250, 300):
            await InvoiceRepository.create(uow.session, {"total": Money(cents, "EUR")})
        await uow.flush()
        uow.record(
            "invoice_sent",
            aggregate_type="invoice",
            aggregate_id=1,
            payload={"due": Money(1, "EUR")},
        )
    consumers = SubscriberRegistry("consumer side")
    consumers.subscribe("*", consumer.handle, name="consumer")
    relay = OutboxRelay(session_factory, InProcessPublisher(consumers), listen=False, outbox=outbox)
    assert await relay.run_once() == 4
    *created, sent = consumer.events
    assert [e.payload["total"] for e in created] == ["100 EUR", "250 EUR", "300 EUR"]
    assert decode_payload(Invoice, created[1].payload)["total"] == Money(250, "EUR")
    assert sent.payload == {"due": "1 EUR"}

    async with UnitOfWork(session_factory, registry=registry) as uow:
        first = await InvoiceRepository.keyset(uow.session, order_by="total", limit=1)
        assert first.next_cursor is not None
        second = await InvoiceRepository.keyset(
            uow.session, order_by="total", limit=1, after=first.next_cursor
        )
    assert [i.total for i in first.items + second.items] == [Money(100, "EUR"), Money(250, "EUR")]
