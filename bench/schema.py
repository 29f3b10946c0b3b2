"""The tables every implementation reads and writes, and the data the reads find.

``bench_items`` is seeded once per backend (W2-W4 read and update it);
``bench_writes`` receives W1/W5/W6/O1 inserts and holds the rows W7 updates and
W8 deletes; ``bench_outbox`` is the hand-written outbox of the ``raw`` and ``orm``
O1/L1 implementations. alchemium's own outbox tables are added to the same
metadata (O1, the bulk workloads with the outbox, O2, D1, L1, L2).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, DateTime, Index, Integer, String, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemium import CrudRepository
from alchemium.events.outbox import Outbox

__all__ = [
    "BULK_CATEGORY",
    "BULK_VALUES",
    "CATEGORIES",
    "Base",
    "HandOutbox",
    "Item",
    "ItemRepository",
    "Write",
    "WriteRepository",
    "bulk_row",
    "item_row",
    "outbox",
    "write_row",
]

CATEGORIES = 20
BULK_CATEGORY = "bulk"  # every row W7 updates and W8 deletes
BULK_VALUES: dict[str, object] = {"note": "updated", "score": 7}  # what W7 sets


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    category: Mapped[str] = mapped_column(String(20))
    score: Mapped[int] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(String(200))
    __table_args__ = (Index("ix_bench_items_category_score", "category", "score"),)


class Write(Base):
    __tablename__ = "bench_writes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    category: Mapped[str] = mapped_column(String(20))
    score: Mapped[int] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(String(200))


class HandOutbox(Base):
    """A typical hand-written outbox: one row per event, a status column."""

    __tablename__ = "bench_outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[object] = mapped_column(Uuid)
    name: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, object]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class ItemRepository(CrudRepository[Item]):
    model = Item


class WriteRepository(CrudRepository[Write]):
    model = Write


# Not enable_outbox(): W1 must measure alchemium without an outbox; O1 passes it explicitly.
outbox = Outbox(Base.metadata)


def item_row(i: int) -> dict[str, object]:
    """Seeded row ``i``: unique name, one of CATEGORIES categories, a scattered score."""
    return {
        "name": f"item-{i}",
        "category": f"c{i % CATEGORIES}",
        "score": (i * 7919) % 1000,
        "note": "seeded",
    }


def bulk_row(i: int) -> dict[str, object]:
    """Row ``i`` of the rows W7 updates and W8 deletes (inserted untimed)."""
    return {"name": f"bulk-{i}", "category": BULK_CATEGORY, "score": i % 1000, "note": "seeded"}


def write_row(tag: str, i: int) -> dict[str, object]:
    """Row ``i`` of a write workload; ``tag`` keeps implementations' rows apart."""
    return {"name": f"{tag}-{i}", "category": "w", "score": i % 1000, "note": "written"}
