"""The example's tables: users, plus the outbox tables in the same metadata."""

from __future__ import annotations

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemium import CrudRepository
from alchemium.events import Outbox


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    email: Mapped[str | None] = mapped_column(String(200))
    position: Mapped[str | None] = mapped_column(String(100))
    age: Mapped[int | None] = mapped_column(CheckConstraint("age >= 0", name="ck_users_age"))


class UserRepository(CrudRepository[User]):
    model = User


# The outbox tables join the app's metadata, so create_all (or Alembic) creates them.
# Most apps write `enable_outbox(Base.metadata)`, which also makes it the default for
# every UnitOfWork; this example passes it explicitly so several apps can share a process.
outbox = Outbox(Base.metadata)
