"""The application's models; the outbox tables join the same metadata in one line.

Alembic autogenerate compares this metadata with the database, so the migration it
writes creates ``users``, ``posts`` *and* the outbox tables with their indexes.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, ForeignKey, String, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from alchemium.events import enable_outbox


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    email: Mapped[str | None] = mapped_column(String(200), index=True)
    posts: Mapped[list[Post]] = relationship(back_populates="author", lazy="raise")


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text, default="")
    published_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    author: Mapped[User] = relationship(back_populates="posts", lazy="raise")


enable_outbox(Base.metadata)  # alchemium_outbox + alchemium_outbox_delivery
