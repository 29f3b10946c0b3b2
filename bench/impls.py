"""The implementations of the CRUD and bulk workloads (W1-W8) and of O1.

Each class does exactly the same logical work per call, written the way its
users are told to write it:

- ``raw``: asyncpg / aiosqlite and hand-written SQL (the floor of this stack).
  A lone INSERT runs in autocommit (one round trip); multi-statement work uses
  an explicit transaction.
- ``core``: SQLAlchemy Core on the engine, no ORM (bulk workloads only):
  ``conn.execute(insert(table), rows)`` (executemany), one ``UPDATE``/``DELETE``.
  The floor a repository built on SQLAlchemy can reach: the bulk targets' baseline.
- ``orm``: idiomatic SQLAlchemy 2.x, ``async with session.begin()`` per transaction;
  bulk: ``add_all``, ORM-enabled ``update()`` / ``delete()``.
- ``advanced_alchemy``: ``SQLAlchemyAsyncRepository`` built per session, writes with
  ``auto_commit=True``, everything else at its defaults (as its docs show).
- ``alchemium``: ``async with UnitOfWork(...)`` and the class-level repositories,
  no subscriber and no outbox (change events are still recorded, as in production).
- ``alchemium_outbox`` (bulk workloads only): the same calls in a unit of work with
  the outbox and one destination, so every row changed writes an event row and a
  delivery row in the same transaction.

A method that is missing means "not applicable" (advanced-alchemy has no outbox
and no update by filter).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, cast

from advanced_alchemy.filters import LimitOffset, OrderBy
from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from sqlalchemy import Table, delete, insert, select, update

from alchemium import UnitOfWork
from alchemium.events import SubscriberRegistry, flush_delivery_marks
from bench.env import Env
from bench.schema import (
    BULK_VALUES,
    HandOutbox,
    Item,
    ItemRepository,
    Write,
    WriteRepository,
    outbox,
)

__all__ = ["DESTINATION", "IMPLEMENTATIONS", "Implementation", "handle_event"]

Row = dict[str, Any]
EVENT = "write_created"
DESTINATION = "bench.relay"  # the relay destination of alchemium_outbox, O2, D1 and L1
WRITES = cast(Table, Write.__table__)


def handle_event(_event: object) -> None:
    """The in-process subscriber of O1: as cheap as a handler can be."""


def _payload(row: Row, pk: int) -> dict[str, Any]:
    return {**row, "id": pk}


class Implementation:
    """Base: holds the environment; subclasses implement the workloads."""

    name: ClassVar[str]

    def __init__(self, env: Env) -> None:
        self.env = env

    async def close(self) -> None:
        """Release what the implementation holds (nothing by default)."""

    async def settle(self) -> None:
        """Finish work deferred past the last call (timed: it is part of the cost)."""


# -- raw --------------------------------------------------------------------------------------


class RawPostgres(Implementation):
    name = "raw"
    COLS = "id, name, category, score, note"

    async def w1(self, row: Row) -> None:
        async with self.env.raw.acquire() as conn:
            await conn.fetchval(
                "INSERT INTO bench_writes (name, category, score, note) "
                "VALUES ($1, $2, $3, $4) RETURNING id",
                row["name"],
                row["category"],
                row["score"],
                row["note"],
            )

    async def w2(self, name: str) -> None:
        async with self.env.raw.acquire() as conn:
            await conn.fetchrow(f"SELECT {self.COLS} FROM bench_items WHERE name = $1", name)

    async def w3(self, category: str) -> None:
        async with self.env.raw.acquire() as conn:
            await conn.fetch(
                f"SELECT {self.COLS} FROM bench_items WHERE category = $1 "
                "ORDER BY score DESC, id LIMIT 50",
                category,
            )

    async def w4(self, pk: int) -> None:
        async with self.env.raw.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {self.COLS} FROM bench_items WHERE id = $1", pk)
            await conn.execute(
                "UPDATE bench_items SET score = $1 WHERE id = $2", row["score"] + 1, pk
            )

    async def w5(self, rows: Sequence[Row]) -> None:
        async with self.env.raw.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO bench_writes (name, category, score, note) VALUES ($1, $2, $3, $4)",
                [(r["name"], r["category"], r["score"], r["note"]) for r in rows],
            )

    async def w7(self, category: str) -> None:
        async with self.env.raw.acquire() as conn:
            await conn.execute(
                "UPDATE bench_writes SET note = $1, score = $2 WHERE category = $3",
                BULK_VALUES["note"],
                BULK_VALUES["score"],
                category,
            )

    async def w8(self, category: str) -> None:
        async with self.env.raw.acquire() as conn:
            await conn.execute("DELETE FROM bench_writes WHERE category = $1", category)

    async def o1(self, row: Row) -> None:
        async with self.env.raw.acquire() as conn:
            async with conn.transaction():
                pk = await conn.fetchval(
                    "INSERT INTO bench_writes (name, category, score, note) "
                    "VALUES ($1, $2, $3, $4) RETURNING id",
                    row["name"],
                    row["category"],
                    row["score"],
                    row["note"],
                )
                payload = _payload(row, pk)
                box = await conn.fetchval(
                    "INSERT INTO bench_outbox (event_id, name, payload, status, created_at) "
                    "VALUES ($1, $2, $3, 'claimed', now()) RETURNING id",
                    uuid.uuid4(),
                    EVENT,
                    json.dumps(payload),
                )
            handle_event(payload)
            await conn.execute("UPDATE bench_outbox SET status = 'delivered' WHERE id = $1", box)


class RawSqlite(Implementation):
    name = "raw"
    COLS = "id, name, category, score, note"

    async def w1(self, row: Row) -> None:
        db = self.env.raw
        await db.execute(
            "INSERT INTO bench_writes (name, category, score, note) VALUES (?, ?, ?, ?)",
            (row["name"], row["category"], row["score"], row["note"]),
        )
        await db.commit()

    async def w2(self, name: str) -> None:
        async with self.env.raw.execute(
            f"SELECT {self.COLS} FROM bench_items WHERE name = ?", (name,)
        ) as cursor:
            await cursor.fetchone()

    async def w3(self, category: str) -> None:
        async with self.env.raw.execute(
            f"SELECT {self.COLS} FROM bench_items WHERE category = ? "
            "ORDER BY score DESC, id LIMIT 50",
            (category,),
        ) as cursor:
            await cursor.fetchall()

    async def w4(self, pk: int) -> None:
        db = self.env.raw
        async with db.execute(f"SELECT {self.COLS} FROM bench_items WHERE id = ?", (pk,)) as cur:
            row = await cur.fetchone()
        await db.execute("UPDATE bench_items SET score = ? WHERE id = ?", (row[3] + 1, pk))
        await db.commit()

    async def w5(self, rows: Sequence[Row]) -> None:
        db = self.env.raw
        await db.executemany(
            "INSERT INTO bench_writes (name, category, score, note) VALUES (?, ?, ?, ?)",
            [(r["name"], r["category"], r["score"], r["note"]) for r in rows],
        )
        await db.commit()

    async def w7(self, category: str) -> None:
        db = self.env.raw
        await db.execute(
            "UPDATE bench_writes SET note = ?, score = ? WHERE category = ?",
            (BULK_VALUES["note"], BULK_VALUES["score"], category),
        )
        await db.commit()

    async def w8(self, category: str) -> None:
        db = self.env.raw
        await db.execute("DELETE FROM bench_writes WHERE category = ?", (category,))
        await db.commit()

    async def o1(self, row: Row) -> None:
        db = self.env.raw
        cursor = await db.execute(
            "INSERT INTO bench_writes (name, category, score, note) VALUES (?, ?, ?, ?)",
            (row["name"], row["category"], row["score"], row["note"]),
        )
        payload = _payload(row, cursor.lastrowid)
        cursor = await db.execute(
            "INSERT INTO bench_outbox (event_id, name, payload, status, created_at) "
            "VALUES (?, ?, ?, 'claimed', ?)",
            (uuid.uuid4().hex, EVENT, json.dumps(payload), dt.datetime.now(dt.timezone.utc)),
        )
        box = cursor.lastrowid
        await db.commit()
        handle_event(payload)
        await db.execute("UPDATE bench_outbox SET status = 'delivered' WHERE id = ?", (box,))
        await db.commit()


# -- SQLAlchemy Core ------------------------------------------------------------------------


class Core(Implementation):
    name = "core"

    async def w5(self, rows: Sequence[Row]) -> None:
        async with self.env.engine.begin() as conn:
            await conn.execute(insert(WRITES), list(rows))

    async def w7(self, category: str) -> None:
        async with self.env.engine.begin() as conn:
            await conn.execute(
                update(WRITES).where(WRITES.c.category == category).values(BULK_VALUES)
            )

    async def w8(self, category: str) -> None:
        async with self.env.engine.begin() as conn:
            await conn.execute(delete(WRITES).where(WRITES.c.category == category))


# -- hand-written SQLAlchemy ORM --------------------------------------------------------------


class Orm(Implementation):
    name = "orm"

    async def w1(self, row: Row) -> None:
        async with self.env.sessions() as session, session.begin():
            session.add(Write(**row))

    async def w2(self, name: str) -> None:
        async with self.env.sessions() as session, session.begin():
            (await session.execute(select(Item).where(Item.name == name))).scalar_one_or_none()

    async def w3(self, category: str) -> None:
        stmt = (
            select(Item)
            .where(Item.category == category)
            .order_by(Item.score.desc(), Item.id)
            .limit(50)
        )
        async with self.env.sessions() as session, session.begin():
            (await session.scalars(stmt)).all()

    async def w4(self, pk: int) -> None:
        async with self.env.sessions() as session, session.begin():
            item = await session.get(Item, pk)
            assert item is not None
            item.score += 1

    async def w5(self, rows: Sequence[Row]) -> None:
        async with self.env.sessions() as session, session.begin():
            session.add_all([Write(**r) for r in rows])

    async def w7(self, category: str) -> None:
        async with self.env.sessions() as session, session.begin():
            await session.execute(
                update(Write).where(Write.category == category).values(BULK_VALUES)
            )

    async def w8(self, category: str) -> None:
        async with self.env.sessions() as session, session.begin():
            await session.execute(delete(Write).where(Write.category == category))

    async def o1(self, row: Row) -> None:
        async with self.env.sessions() as session:
            async with session.begin():
                obj = Write(**row)
                session.add(obj)
                await session.flush()
                payload = _payload(row, obj.id)
                box = HandOutbox(
                    event_id=uuid.uuid4(),
                    name=EVENT,
                    payload=payload,
                    status="claimed",
                    created_at=dt.datetime.now(dt.timezone.utc),
                )
                session.add(box)
            handle_event(payload)
            async with session.begin():
                await session.execute(
                    update(HandOutbox).where(HandOutbox.id == box.id).values(status="delivered")
                )


# -- advanced-alchemy -------------------------------------------------------------------------


class ItemAARepository(SQLAlchemyAsyncRepository[Item]):
    model_type = Item


class WriteAARepository(SQLAlchemyAsyncRepository[Write]):
    model_type = Write


class AdvancedAlchemy(Implementation):
    name = "advanced_alchemy"

    async def w1(self, row: Row) -> None:
        async with self.env.sessions() as session:
            await WriteAARepository(session=session).add(Write(**row), auto_commit=True)

    async def w2(self, name: str) -> None:
        async with self.env.sessions() as session:
            await ItemAARepository(session=session).get_one_or_none(name=name)

    async def w3(self, category: str) -> None:
        async with self.env.sessions() as session:
            await ItemAARepository(session=session).get_many(
                LimitOffset(limit=50, offset=0),
                OrderBy(field_name="score", sort_order="desc"),
                OrderBy(field_name="id", sort_order="asc"),
                category=category,
            )

    async def w4(self, pk: int) -> None:
        async with self.env.sessions() as session:
            repo = ItemAARepository(session=session)
            item = await repo.get(pk)
            item.score += 1
            await repo.update(item, auto_commit=True)

    async def w5(self, rows: Sequence[Row]) -> None:
        async with self.env.sessions() as session:
            await WriteAARepository(session=session).add_many(
                [Write(**r) for r in rows], auto_commit=True
            )

    async def w8(self, category: str) -> None:
        async with self.env.sessions() as session:
            await WriteAARepository(session=session).delete_where(
                category=category, auto_commit=True
            )


# -- alchemium --------------------------------------------------------------------------------


class AlchemiumBulk(Implementation):
    """alchemium's bulk calls (W5, W7, W8) in the unit of work :meth:`uow` opens."""

    def uow(self) -> UnitOfWork:
        raise NotImplementedError

    async def w5(self, rows: Sequence[Row]) -> None:
        async with self.uow() as uow:
            await WriteRepository.create_many(uow.session, rows)

    async def w7(self, category: str) -> None:
        async with self.uow() as uow:
            await WriteRepository.update_where(uow.session, {"category": category}, BULK_VALUES)

    async def w8(self, category: str) -> None:
        async with self.uow() as uow:
            await WriteRepository.delete_where(uow.session, {"category": category})


class Alchemium(AlchemiumBulk):
    name = "alchemium"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        # A registry of its own: W1-W8 dispatch to nobody, O1 to one subscriber.
        self.quiet = SubscriberRegistry("bench-quiet")
        self.o1_registry = SubscriberRegistry("bench-o1")
        self.o1_registry.subscribe(EVENT, handle_event, name="bench.handle_event")

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.env.sessions, registry=self.quiet)

    async def w1(self, row: Row) -> None:
        async with self.uow() as uow:
            await WriteRepository.create(uow.session, row)

    async def w2(self, name: str) -> None:
        async with self.uow() as uow:
            await ItemRepository.get_one(uow.session, {"name": name})

    async def w3(self, category: str) -> None:
        async with self.uow() as uow:
            await ItemRepository.list(
                uow.session, {"category": category}, order_by=["-score", "id"], limit=50
            )

    async def w4(self, pk: int) -> None:
        async with self.uow() as uow:
            item = await ItemRepository.get(uow.session, pk)
            assert item is not None
            ItemRepository.update(item, {"score": item.score + 1})

    async def o1(self, row: Row) -> None:
        # WriteRepository records "write_created" itself; the outbox makes it durable.
        async with UnitOfWork(self.env.sessions, registry=self.o1_registry, outbox=outbox) as uow:
            await WriteRepository.create(uow.session, row)

    async def settle(self) -> None:
        # O1's delivery marks are batched in the background: the run pays for them too.
        await flush_delivery_marks()


class AlchemiumOutbox(AlchemiumBulk):
    """alchemium's bulk calls with the outbox on: one event + one delivery row per row.

    Only the bulk workloads: the single-row outbox cost is O1's.
    """

    name = "alchemium_outbox"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.routed = SubscriberRegistry("bench-bulk-outbox")
        self.routed.add_destination(DESTINATION, "write_*")

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.env.sessions, registry=self.routed, outbox=outbox)


_COMMON: dict[str, type[Implementation]] = {
    "core": Core,
    "orm": Orm,
    "advanced_alchemy": AdvancedAlchemy,
    "alchemium": Alchemium,
    "alchemium_outbox": AlchemiumOutbox,
}
IMPLEMENTATIONS: dict[str, dict[str, type[Implementation]]] = {
    "postgresql": {"raw": RawPostgres, **_COMMON},
    "sqlite": {"raw": RawSqlite, **_COMMON},
}
