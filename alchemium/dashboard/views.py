"""The JSON shapes of the dashboard's API, built from what the outbox administration returns.

The HTML pages render these same documents, so a page and its ``/api/...`` twin always
show the same thing. Times are ISO 8601 in UTC; durations are seconds. Payloads (and
audited changes) are ``null`` with ``payload_hidden: true`` unless the dashboard was
created with ``show_payloads=True``. These shapes are the API's contract
(docs/dashboard.md): fields may be added, never renamed or removed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from alchemium.events.audit import AuditEntry
from alchemium.events.outbox_actions import OutboxAction
from alchemium.events.outbox_admin import (
    BlockedAggregate,
    OutboxOverview,
    OutboxStatus,
    RelayLease,
    Throughput,
)

__all__ = [
    "action_view",
    "audit_view",
    "blocked_view",
    "dead_letter_view",
    "event_view",
    "iso",
    "overview_view",
    "relays_view",
    "throughput_view",
]

Document = dict[str, Any]

EXACT = "all counts are exact"
ESTIMATED = (
    "pending, claimed and dead are exact (partial indexes over undelivered rows); "
    "delivered is an estimate from PostgreSQL's statistics (pg_class.reltuples, pg_stats), "
    "refreshed by ANALYZE and autovacuum"
)


def iso(value: dt.datetime | None) -> str | None:
    """``value`` in UTC, ISO 8601 (``None`` stays ``None``)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat()


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return iso(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def overview_view(overview: OutboxOverview) -> Document:
    destinations = [
        {**asdict(s), "delivered_exact": overview.delivered_exact} for s in overview.destinations
    ]
    return {
        "now": iso(overview.now),
        "delivered_exact": overview.delivered_exact,
        "counting": _counting(overview),
        "completion": overview.completion,
        "delivered_kept": overview.delivered_kept,
        "totals": asdict(OutboxStatus.total(overview.destinations)),
        "destinations": destinations,
    }


def _counting(overview: OutboxOverview) -> str:
    counting = EXACT if overview.delivered_exact else ESTIMATED
    if overview.completion == "archive":
        return f"{counting}; delivered rows are those of the archive table (completion=archive)"
    if overview.completion == "delete":
        return f"{counting}; delivered rows are deleted at delivery (completion=delete): none kept"
    return counting


def throughput_view(throughput: Throughput) -> Document:
    return {
        "now": iso(throughput.now),
        "recorded": throughput.recorded,
        "minutes": [{"start": iso(start), "delivered": n} for start, n in throughput.minutes],
        "total": sum(n for _, n in throughput.minutes),
    }


def _payload(payload: Any, show: bool, key: str = "payload") -> Document:
    return {key: payload if show else None, f"{key}_hidden": not show}


def dead_letter_view(row: Mapping[str, Any], show_payloads: bool) -> Document:
    return {
        "id": row["id"],
        "destination": row["destination"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "aggregate_type": row["aggregate_type"],
        "aggregate_id": row["aggregate_id"],
        "event_id": str(row["event_id"]),
        "event_name": row["name"],
        "occurred_at": iso(row["occurred_at"]),
        "metadata": row["metadata"],
        **_payload(row["payload"], show_payloads),
    }


def event_view(
    event: Mapping[str, Any], deliveries: Sequence[Mapping[str, Any]], show_payloads: bool
) -> Document:
    return {
        "event": {
            "id": str(event["id"]),
            "sequence": event["sequence"],
            "name": event["name"],
            "aggregate_type": event["aggregate_type"],
            "aggregate_id": event["aggregate_id"],
            "occurred_at": iso(event["occurred_at"]),
            "metadata": event["metadata"],
            **_payload(event["payload"], show_payloads),
        },
        "deliveries": [
            {
                "id": d["id"],
                "destination": d["destination"],
                "status": d["status"],
                "attempts": d["attempts"],
                "next_attempt_at": iso(d["next_attempt_at"]),
                "claimed_by": d["claimed_by"],
                "claimed_until": iso(d["claimed_until"]),
                "claim_token": _plain(d["claim_token"]),
                "last_error": d["last_error"],
                "delivered_at": iso(d["delivered_at"]),
                "archived": d.get("archived", False),
            }
            for d in deliveries
        ],
    }


def relays_view(leases: Sequence[RelayLease], now: dt.datetime | None) -> Document:
    return {
        "now": iso(now),
        "relays": [{k: _plain(v) for k, v in asdict(lease).items()} for lease in leases],
    }


def blocked_view(item: BlockedAggregate) -> Document:
    return {k: _plain(v) for k, v in asdict(item).items()}


def audit_view(entry: AuditEntry, show_payloads: bool) -> Document:
    return {
        "id": entry.id,
        "event_id": str(entry.event_id),
        "entity": entry.entity,
        "entity_id": entry.entity_id,
        "action": entry.action,
        "actor": entry.actor,
        "tenant": entry.tenant,
        "occurred_at": iso(entry.occurred_at),
        **_payload(dict(entry.changes), show_payloads, "changes"),
    }


def action_view(action: OutboxAction) -> Document:
    return {k: _plain(v) for k, v in asdict(action).items()}
