"""Models shared by the test suite: a small blog/shop schema exercising every feature."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import uuid
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    PickleType,
    String,
    Table,
    TypeDecorator,
    Uuid,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from alchemium import CrudRepository
from alchemium.events import EventSourceMixin, SubjectKeys


class Base(DeclarativeBase):
    pass


class Status(enum.Enum):
    ACTIVE = "active"
    BLOCKED = "blocked"


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    position: Mapped[str | None] = mapped_column(String(100))
    age: Mapped[int | None] = mapped_column(
        Integer, CheckConstraint("age >= 0", name="ck_users_age")
    )
    email: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[Status] = mapped_column(SAEnum(Status), default=Status.ACTIVE)
    balance: Mapped[decimal.Decimal | None] = mapped_column(Numeric(12, 2))
    birthday: Mapped[dt.date | None] = mapped_column(Date)
    created_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


book_tags = Table(
    "book_tags",
    Base.metadata,
    Column("book_id", ForeignKey("books.id", ondelete="CASCADE"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
)


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    books: Mapped[list[Book]] = relationship(back_populates="author", lazy="raise")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    pages: Mapped[int | None] = mapped_column(Integer)
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books", lazy="raise")
    tags: Mapped[list[Tag]] = relationship(secondary=book_tags, lazy="raise")


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(50), unique=True)


class OrderLine(Base, EventSourceMixin):
    __tablename__ = "order_lines"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    sku: Mapped[str] = mapped_column(String(50))
    quantity: Mapped[int] = mapped_column(Integer, default=1)


class UserRepository(CrudRepository[User]):
    model = User


class AuthorRepository(CrudRepository[Author]):
    model = Author


class BookRepository(CrudRepository[Book]):
    model = Book


class TagRepository(CrudRepository[Tag]):
    model = Tag


class OrderLineRepository(CrudRepository[OrderLine]):
    model = OrderLine


# -- models for the domain-event tests ------------------------------------------------------


class Memo(Base):
    """Recorded under an overridden entity name (``note_*``)."""

    __tablename__ = "memos"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


class Scratch(Base):
    """Its repository switches change events off."""

    __tablename__ = "scratches"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


class Membership(Base):
    """A deferred foreign key: a dangling ``user_id`` fails at COMMIT, not at flush."""

    __tablename__ = "memberships"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", deferrable=True, initially="DEFERRED")
    )


class Attachment(Base):
    """Bytes: its events carry them in base64."""

    __tablename__ = "attachments"
    id: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Opaque:
    """A value of a type no encoder knows (picklable, so a PickleType column can hold it)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque)

    def __hash__(self) -> int:
        return 0


class Keepsake(Base):
    """PickleType: the type of its values is known only when an event is built."""

    __tablename__ = "keepsakes"
    id: Mapped[int] = mapped_column(primary_key=True)
    thing: Mapped[Any] = mapped_column(PickleType)


class MemoRepository(CrudRepository[Memo]):
    model = Memo
    entity_name = "note"


class ScratchRepository(CrudRepository[Scratch]):
    model = Scratch
    record_events = False


class MembershipRepository(CrudRepository[Membership]):
    model = Membership


class AttachmentRepository(CrudRepository[Attachment]):
    model = Attachment


class KeepsakeRepository(CrudRepository[Keepsake]):
    model = Keepsake


# -- optimistic locking ---------------------------------------------------------------------


class Document(Base):
    """Versioned: a concurrent update or delete raises ConcurrencyConflictError."""

    __tablename__ = "documents"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    __mapper_args__ = {"version_id_col": version}


class DocumentRepository(CrudRepository[Document]):
    model = Document


# -- soft delete ----------------------------------------------------------------------------


class Project(Base):
    """Soft-deleted; the name is unique among live projects only (partial unique index)."""

    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    tasks: Mapped[list[Task]] = relationship(back_populates="project", lazy="raise")
    __table_args__ = (
        Index(
            "uq_projects_name_live",
            "name",
            unique=True,
            postgresql_where=text("deleted_at IS NULL"),
            sqlite_where=text("deleted_at IS NULL"),
        ),
    )


class Task(Base):
    """Soft-deleted too: relationship filters from Project must not see deleted tasks."""

    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    project: Mapped[Project] = relationship(back_populates="tasks", lazy="raise")


class ProjectRepository(CrudRepository[Project]):
    model = Project
    soft_delete_column = "deleted_at"


class TaskRepository(CrudRepository[Task]):
    model = Task
    soft_delete_column = "deleted_at"


# -- tenant scoping -------------------------------------------------------------------------


class Customer(Base):
    """Tenant-scoped."""

    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50), index=True)
    name: Mapped[str] = mapped_column(String(100))
    tickets: Mapped[list[Ticket]] = relationship(back_populates="customer", lazy="raise")


class Ticket(Base):
    """Tenant-scoped; reached from Customer by relationship filters."""

    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50), index=True)
    subject: Mapped[str] = mapped_column(String(200))
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"))
    customer: Mapped[Customer | None] = relationship(back_populates="tickets", lazy="raise")


class CustomerRepository(CrudRepository[Customer]):
    model = Customer
    tenant_column = "tenant_id"


class TicketRepository(CrudRepository[Ticket]):
    model = Ticket
    tenant_column = "tenant_id"


# -- a value type of the application (register_encoder) -------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class Money:
    cents: int
    currency: str


class MoneyType(TypeDecorator[Money]):
    """Stored as sortable text; declares its Python type, so models using it are checked."""

    impl = String(40)
    cache_ok = True

    @property
    def python_type(self) -> type[Money]:
        return Money

    def process_bind_param(self, value: Money | None, dialect: Any) -> str | None:
        return None if value is None else f"{value.cents:012d} {value.currency}"

    def process_result_value(self, value: str | None, dialect: Any) -> Money | None:
        return None if value is None else parse_money(value)


def money_text(value: Money) -> str:
    """The JSON form an application would register for Money: ``"1250 EUR"``."""
    return f"{value.cents} {value.currency}"


def parse_money(text: str) -> Money:
    cents, currency = text.split()
    return Money(int(cents), currency)


# -- personal data (docs/lifecycle.md) -------------------------------------------------------


class Shopper(Base):
    """Sensitive columns, redacted: one declared in ``__alchemium__``, one flagged on the column."""

    __tablename__ = "shoppers"
    __alchemium__ = {"sensitive": ["email"]}
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str | None] = mapped_column(String(200))
    phone: Mapped[str | None] = mapped_column(String(40), info={"sensitive": True})


class Contact(Base):
    """A sensitive column, hashed (HMAC-SHA256)."""

    __tablename__ = "contacts"
    __alchemium__ = {"sensitive": ["email"], "sensitive_mode": "hash"}
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))


class Patient(Base):
    """Sensitive columns sealed with the patient's key (crypto-shredding)."""

    __tablename__ = "patients"
    __alchemium__ = {"sensitive": ["email", "phone"], "sensitive_mode": "encrypt"}
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str | None] = mapped_column(String(200))
    phone: Mapped[str | None] = mapped_column(String(40))
    born: Mapped[dt.date | None] = mapped_column(Date)


class ShopperRepository(CrudRepository[Shopper]):
    model = Shopper


class ContactRepository(CrudRepository[Contact]):
    model = Contact


class PatientRepository(CrudRepository[Patient]):
    model = Patient


# The subject key table joins the schema of every test; erasure itself is enabled by the
# ``erasure`` fixture (tests/events/test_personal_data.py).
subject_keys = SubjectKeys(Base.metadata)
