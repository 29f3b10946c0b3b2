"""Tenants at write time: new rows are stamped, rows of another tenant are refused.

A tenant-scoped model (``tenant_column`` on its repository) is checked at every
flush, whatever wrote it: repository calls, ``session.add`` or attributes set on a
loaded object. Reads are scoped by the filters (``RowScope``); this is the write side.
For PostgreSQL Row Level Security, ``UnitOfWork(tenant_setting=...)`` names the
tenant to the database at the start of each transaction (``_set_tenant_setting``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session
from sqlalchemy.orm.base import NO_VALUE

from alchemium.errors import TenantMismatchError, TenantRequiredError, UnitOfWorkError
from alchemium.modelinfo import ModelInfo, model_info
from alchemium.query import pk_of
from alchemium.uow import current_unit_of_work, session_tenant

__all__ = ["check_row_tenant", "register_tenant_model", "required_tenant", "stored_value"]


def required_tenant(info: ModelInfo, session: Any) -> str:
    """The tenant ``session`` acts for; TenantRequiredError naming ``info``'s model if none."""
    tenant = session_tenant(session)
    if tenant is None:
        raise TenantRequiredError(info.name)
    return tenant


def stored_value(state: Any, key: str) -> Any:
    """The value of attribute ``key`` as stored (before unflushed changes), or None if unknown."""
    value = state.committed_state.get(key, state.dict.get(key))
    return None if value is NO_VALUE else value


def check_row_tenant(info: ModelInfo, state: Any, tenant: str | None) -> None:
    """Raise TenantMismatchError if the row of ``state`` is stored for another tenant."""
    assert info.tenant_column is not None
    stored = stored_value(state, info.tenant_column)
    if stored is not None and stored != tenant:
        raise TenantMismatchError(info.name, pk_of(info, state), tenant, stored)


_tenant_models: set[type[Any]] = set()


def register_tenant_model(model: type[Any]) -> None:
    """Check every flush of ``model`` for its tenant (see :func:`_check_tenants`)."""
    _tenant_models.add(model)


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
        tenant = required_tenant(info, session)
        state = inspect(obj)
        value = state.dict.get(column)
        if state.pending and value is None:
            setattr(obj, column, tenant)
            continue
        stored = stored_value(state, column)
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
                raise TenantMismatchError(info.name, pk_of(info, state), tenant, found)


_SET_CONFIG = text("SELECT set_config(:name, :value, true)")


@sa_event.listens_for(Session, "after_begin")
def _set_tenant_setting(session: Session, _transaction: Any, connection: Any) -> None:
    """For ``tenant_setting``: name the tenant to PostgreSQL at the start of each transaction.

    ``is_local=true`` makes the setting end with the transaction, so a pooled
    connection never carries it into the next unit of work (a session-level SET would).
    """
    uow = current_unit_of_work(session)
    if uow is None or uow.tenant_setting is None:
        return
    if connection.dialect.name != "postgresql":
        raise UnitOfWorkError(
            f"UnitOfWork(tenant_setting={uow.tenant_setting!r}) needs PostgreSQL, "
            f"not {connection.dialect.name}"
        )
    tenant = session_tenant(session)
    connection.execute(_SET_CONFIG, {"name": uow.tenant_setting, "value": tenant})
