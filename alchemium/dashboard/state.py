"""What the dashboard reads and does, independent of HTTP: one document per page, one action.

:class:`Dashboard` holds the engine, the outbox administration, the audit log and the
action log. Each ``*_document`` method checks its input, asks the outbox (all SQL is in
``alchemium.events``) and returns the JSON document of ``alchemium.dashboard.views``;
the HTML pages render the same documents. Every read runs on a connection of its own
and holds no transaction open.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from alchemium.dashboard.errors import UnavailableError, UnknownResourceError
from alchemium.dashboard.params import Page, Params, check_page, parse_event_id
from alchemium.dashboard.views import (
    action_view,
    audit_view,
    blocked_view,
    dead_letter_view,
    event_view,
    iso,
    overview_view,
    relays_view,
    throughput_view,
)
from alchemium.events.audit import AuditLog
from alchemium.events.outbox_actions import OutboxActionLog
from alchemium.events.outbox_admin import DeadSelection, OutboxAdministration
from alchemium.events.outbox_schema import aware, database_now

__all__ = ["Dashboard"]

logger = logging.getLogger("alchemium.dashboard")

Document = dict[str, Any]
ACTIONS = ("requeue", "discard")


class Dashboard:
    """The engine and the tables one dashboard app reads (see :func:`create_app`)."""

    def __init__(
        self,
        engine: AsyncEngine,
        outbox: OutboxAdministration,
        *,
        audit: AuditLog | None,
        action_log: OutboxActionLog,
        show_payloads: bool,
        owns_engine: bool,
        exact_below: int = 100_000,
    ) -> None:
        self.engine = engine
        self.outbox = outbox
        self.audit = audit
        self.action_log = action_log
        self.show_payloads = show_payloads
        self.owns_engine = owns_engine
        self.exact_below = exact_below
        self.channel = str(getattr(outbox, "channel", "alchemium_outbox"))
        self._present: set[str] = set()  # tables seen to exist (a missing one is asked again)

    async def close(self) -> None:
        """Dispose of the engine if the dashboard created it from a URL."""
        if self.owns_engine:
            await self.engine.dispose()

    # -- tables -------------------------------------------------------------------------------

    async def _has_table(self, conn: AsyncConnection, name: str, schema: str | None) -> bool:
        key = f"{schema}.{name}" if schema else name
        if key in self._present:
            return True
        found = await conn.run_sync(lambda sync: inspect(sync).has_table(name, schema=schema))
        if found:
            self._present.add(key)
        return bool(found)

    async def _require_outbox(self, conn: AsyncConnection) -> None:
        archive = [] if self.outbox.archive is None else [self.outbox.archive]
        for table in (self.outbox.events, self.outbox.deliveries, *archive):
            if not await self._has_table(conn, table.name, table.schema):
                raise UnavailableError(
                    f"no outbox table {table.fullname!r} in this database "
                    "(create it with create_outbox_tables(engine) or your migrations)"
                )

    async def audit_available(self) -> bool:
        """Whether the audit page can work: auditing configured and its table there."""
        if self.audit is None:
            return False
        table = self.audit.table
        async with self.engine.connect() as conn:
            return await self._has_table(conn, table.name, table.schema)

    async def _require_action_log(self, conn: AsyncConnection) -> None:
        table = self.action_log.table
        if not await self._has_table(conn, table.name, table.schema):
            raise UnavailableError(
                f"no action log table {table.fullname!r}: operator actions are recorded there "
                "and none is done without it (create it with create_action_table(engine, log), "
                "your migrations, or `alchemium dashboard --actions`)"
            )

    # -- pages --------------------------------------------------------------------------------

    async def overview_document(self, params: Params) -> Document:
        """Counts per destination (see ``OutboxAdministration.overview``) and the throughput."""
        minutes = params.integer("minutes", 60, low=1, high=24 * 60)
        async with self.engine.connect() as conn:
            await self._require_outbox(conn)
            overview = await self.outbox.overview(conn, exact_below=self.exact_below)
            throughput = await self.outbox.throughput(conn, minutes=minutes)
        return {**overview_view(overview), "throughput": throughput_view(throughput)}

    async def throughput_document(self, params: Params) -> Document:
        minutes = params.integer("minutes", 60, low=1, high=24 * 60)
        async with self.engine.connect() as conn:
            await self._require_outbox(conn)
            return throughput_view(await self.outbox.throughput(conn, minutes=minutes))

    async def dead_document(self, params: Params) -> Document:
        """A page of dead letters matching the filter, with the total that matches."""
        selection, page = params.selection(), params.page()
        async with self.engine.connect() as conn:
            await self._require_outbox(conn)
            await self._check_destination(conn, selection.destination)
            total = await self.outbox.count_dead(conn, selection)
            rows = await self.outbox.dead_letters(
                conn, selection, offset=page.offset, limit=page.size
            )
        check_page(page, len(rows), total)
        return {
            "selection": asdict(selection),
            "total": total,
            **_paging(page, len(rows), total),
            "items": [dead_letter_view(r, self.show_payloads) for r in rows],
        }

    async def event_document(self, raw_id: str) -> Document:
        event_id = parse_event_id(raw_id)
        async with self.engine.connect() as conn:
            await self._require_outbox(conn)
            found = await self.outbox.event_with_deliveries(conn, event_id)
        if found is None:
            raise UnknownResourceError(
                f"no event {event_id} in the outbox (never written, or purged)"
            )
        event, deliveries = found
        return {
            **event_view(event, deliveries, self.show_payloads),
            "completion": self.outbox.completion,
        }

    async def blocked_document(self, params: Params) -> Document:
        page = params.page()
        async with self.engine.connect() as conn:
            await self._require_outbox(conn)
            items = await self.outbox.blocked_heads(conn, offset=page.offset, limit=page.size)
        check_page(page, len(items))
        return {**_paging(page, len(items)), "items": [blocked_view(i) for i in items]}

    async def relays_document(self, params: Params) -> Document:
        async with self.engine.connect() as conn:
            await self._require_outbox(conn)
            leases = await self.outbox.leases(conn)
            now = aware((await conn.execute(database_now().select())).scalar_one())
        return relays_view(leases, now)

    async def audit_document(self, params: Params) -> Document:
        if self.audit is None or not await self.audit_available():
            name = "alchemium_audit_log" if self.audit is None else self.audit.table.fullname
            raise UnknownResourceError(
                f"auditing is not enabled: no audit table {name!r} in this database "
                "(see enable_audit(metadata) and create_audit_table)"
            )
        page = params.page()
        entity, entity_id = params.text("entity", max_length=100), params.text("entity_id")
        actor, since, until = params.text("actor"), params.time("since"), params.time("until")
        async with self.engine.connect() as conn:
            entries = await self.audit.browse(
                conn,
                entity=entity,
                entity_id=entity_id,
                actor=actor,
                since=since,
                until=until,
                offset=page.offset,
                limit=page.size,
            )
        check_page(page, len(entries))
        return {
            "filters": {
                "entity": entity,
                "entity_id": entity_id,
                "actor": actor,
                "since": iso(since),
                "until": iso(until),
            },
            **_paging(page, len(entries)),
            "items": [audit_view(e, self.show_payloads) for e in entries],
        }

    async def actions_document(self, params: Params) -> Document:
        page = params.page()
        async with self.engine.connect() as conn:
            table = self.action_log.table
            if not await self._has_table(conn, table.name, table.schema):
                raise UnknownResourceError(
                    f"no action log table {table.fullname!r} in this database: no action was "
                    "ever recorded (actions need it)"
                )
            actions = await self.action_log.recent(conn, offset=page.offset, limit=page.size)
        check_page(page, len(actions))
        return {**_paging(page, len(actions)), "items": [action_view(a) for a in actions]}

    # -- actions ------------------------------------------------------------------------------

    async def act(
        self,
        action: str,
        *,
        actor: str,
        client: str | None,
        ids: Sequence[int] | None = None,
        selection: DeadSelection | None = None,
        expected: int | None = None,
    ) -> Document:
        """Requeue or discard dead deliveries and record who did it, in one transaction.

        Raises ``DeliveryChangedError`` (nothing changed, nothing recorded) when the rows
        are not all still dead, or a selection no longer matches ``expected`` rows.
        """
        async with self.engine.connect() as conn:
            await self._require_outbox(conn)
            await self._require_action_log(conn)
            if selection is not None:
                await self._check_destination(conn, selection.destination)
        async with self.engine.begin() as conn:
            changed = await self.outbox.act_on_dead(
                conn, action, ids=ids, selection=selection, expected=expected
            )
            await self.action_log.record(
                conn,
                actor=actor,
                action=action,
                delivery_ids=changed,
                selection=None if selection is None else asdict(selection),
                client=client,
            )
            if action == "requeue":
                await self.outbox.wake_relays(conn, self.channel)
        logger.info("%s %s %d dead deliveries: %s", actor, action, len(changed), changed[:20])
        return {"action": action, "rows": len(changed), "delivery_ids": changed}

    async def _check_destination(self, conn: AsyncConnection, destination: str | None) -> None:
        if destination is not None and not await self.outbox.destination_exists(conn, destination):
            raise UnknownResourceError(
                f"unknown destination {destination!r}: no delivery row has it"
            )


def _paging(page: Page, rows: int, total: int | None = None) -> Mapping[str, Any]:
    more = page.offset + rows < total if total is not None else rows == page.size
    return {"page": page.number, "per_page": page.size, "has_next": more}
