"""The load generator of L1/L2: commits outbox rows at a fixed rate, in a process of its own.

``python -m bench.loadgen --dsn ... --kind alchemium --rate 1000 --count 10000 ...``
prints one JSON line: what it sent, the rate it achieved, how late it ran.

Open loop: event ``i`` is due at ``start + i / rate`` whatever happened to the
others, and ``committers`` connections take the next due event in turn, so a
slow commit does not lower the offered rate (it shows up as lateness, reported).
Each event is one statement in autocommit, which is its commit: the rows a unit
of work with the outbox writes for one event (the event, its pending delivery
and the NOTIFY; ``alchemium``) or a hand-written outbox row and its NOTIFY
(``hand``). The payload carries the wall-clock time read just before the
statement is sent (``t``); the receiving side measures from it. It runs in its
own process because the generator is not what is measured: the relay's
process must not share its event loop with a thousand commits a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

__all__ = ["main"]


def _statement(kind: str, events: str, deliveries: str) -> str:
    if kind == "alchemium":
        return (
            f"WITH e AS (INSERT INTO {events} (id, name, aggregate_type, aggregate_id, "
            "payload, metadata, occurred_at) VALUES ($1, 'write_created', 'write', $2, "
            "$3::jsonb, '{}'::jsonb, now()) RETURNING id, aggregate_type, aggregate_id), "
            f"d AS (INSERT INTO {deliveries} (event_id, destination, aggregate_type, "
            "aggregate_id, status, attempts, next_attempt_at) SELECT id, $4, aggregate_type, "
            "aggregate_id, 'pending', 0, now() FROM e RETURNING 1) "
            "SELECT pg_notify($5, '') FROM d"
        )
    return (
        "WITH b AS (INSERT INTO bench_outbox (event_id, name, payload, status, created_at) "
        "VALUES ($1, 'write_created', $2::json, 'pending', now()) RETURNING 1) "
        "SELECT pg_notify($3, '') FROM b"
    )


def _arguments(args: argparse.Namespace, name: str, payload: str) -> tuple[Any, ...]:
    if args.kind == "alchemium":
        return (uuid.uuid4(), name, payload, args.destination, args.channel)
    return (uuid.uuid4(), payload, args.channel)


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    """Commit ``warmup + count`` events at ``rate``; returns what happened."""
    import asyncpg

    pool = await asyncpg.create_pool(args.dsn, min_size=args.committers, max_size=args.committers)
    sql = _statement(args.kind, args.events, args.deliveries)
    total = args.warmup + args.count
    pending = iter(range(total))
    late: list[float] = []
    sent: list[float] = []  # when each measured event was sent
    errors = 0
    start = time.monotonic() + 0.05

    async def committer() -> None:
        nonlocal errors
        async with pool.acquire() as conn:
            statement = await conn.prepare(sql)
            for i in pending:  # shared: each committer takes the next due event
                due = start + i / args.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                warm = i < args.warmup
                if not warm:
                    now = time.monotonic()
                    late.append(max(0.0, now - due))
                    sent.append(now)
                name = f"warm-{i}" if warm else f"{args.tag}-{i - args.warmup}"
                payload = json.dumps({"name": name, "t": time.time(), "warm": warm})
                try:
                    await statement.fetchval(*_arguments(args, name, payload))
                except Exception as err:  # a lost event is counted by the receiving side
                    errors += 1
                    print(f"loadgen: commit failed: {err!r}", file=sys.stderr)

    try:
        await asyncio.gather(*(committer() for _ in range(args.committers)))
    finally:
        await pool.close()
    late.sort()
    span = max(sent) - min(sent) if len(sent) > 1 else 0.0
    return {
        "rate": args.rate,
        "sent": args.count,
        # The rate the events really went out at: a generator that falls behind sends later.
        "achieved": (len(sent) - 1) / span if span else float(args.rate),
        "committers": args.committers,
        "errors": errors,
        "late_p99_ms": late[min(len(late) - 1, int(0.99 * len(late)))] * 1000 if late else 0.0,
        "late_max_ms": late[-1] * 1000 if late else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.loadgen``."""
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--dsn", required=True, help="postgresql://... (asyncpg)")
    parser.add_argument("--kind", choices=("alchemium", "hand"), required=True)
    parser.add_argument("--events", default="alchemium_outbox")
    parser.add_argument("--deliveries", default="alchemium_outbox_delivery")
    parser.add_argument("--destination", default="bench.relay")
    parser.add_argument("--channel", default="alchemium_outbox")
    parser.add_argument("--rate", type=float, required=True, help="events per second")
    parser.add_argument("--count", type=int, required=True, help="measured events")
    parser.add_argument("--warmup", type=int, default=0, help="untimed events sent first")
    parser.add_argument("--committers", type=int, default=4, help="connections committing")
    parser.add_argument("--tag", default="l1")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(generate(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
