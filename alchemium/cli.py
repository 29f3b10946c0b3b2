"""The ``alchemium`` command line: run an outbox relay, inspect and maintain the outbox.

::

    alchemium relay --url URL --import myapp.handlers [--publisher inprocess|redis://...|amqp://...]
    alchemium outbox status  --url URL
    alchemium outbox requeue --url URL [--id N ...] [--destination NAME]
    alchemium outbox purge   --url URL --older-than 7d

Exit codes: 0 success, 1 unexpected failure, 2 wrong usage (bad arguments, an
unknown URL scheme, a module that cannot be imported), 3 the database cannot be
reached or has no outbox tables. The relay stops cleanly on SIGTERM and SIGINT,
finishing the batch in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence

from sqlalchemy import MetaData, exc, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from alchemium.events.outbox import Outbox, default_outbox
from alchemium.events.publishers import InProcessPublisher, Publisher, destinations_of
from alchemium.events.relay import OutboxRelay

__all__ = ["main", "parse_duration"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DATABASE = 0, 1, 2, 3

logger = logging.getLogger("alchemium.cli")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class CommandError(Exception):
    """A failure with a message for the user and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def parse_duration(value: str) -> float:
    """Parse ``90``, ``30s``, ``15m``, ``12h``, ``7d`` or ``2w`` into seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", value)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {value!r} (examples: 30s, 15m, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alchemium", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", required=True, help="SQLAlchemy async database URL")
        p.add_argument("--table", default="alchemium_outbox", help="outbox table name")
        p.add_argument("--schema", default=None, help="schema of the outbox tables")
        p.add_argument(
            "--import",
            dest="imports",
            action="append",
            default=[],
            metavar="MODULE",
            help="import MODULE first (registers handlers / destinations); repeatable",
        )

    relay = commands.add_parser("relay", help="run an outbox relay until SIGTERM/SIGINT")
    common(relay)
    relay.add_argument(
        "--publisher",
        action="append",
        default=[],
        help="inprocess (default), redis://..., or amqp://...; repeatable",
    )
    relay.add_argument("--destination", default=None, help="destination name of a broker")
    relay.add_argument("--batch-size", type=int, default=100)
    relay.add_argument("--lease", type=parse_duration, default=30.0)
    relay.add_argument("--poll-interval", type=parse_duration, default=1.0)
    relay.add_argument("--max-attempts", type=int, default=10)
    relay.add_argument("--backoff-base", type=parse_duration, default=1.0)
    relay.add_argument("--ordered", action="store_true", help="per-aggregate ordering")
    relay.add_argument("--no-listen", action="store_true", help="poll only (e.g. PgBouncer)")
    relay.add_argument("--retention", type=parse_duration, default=None)
    relay.add_argument("--relay-id", default=None)

    outbox = commands.add_parser("outbox", help="inspect and maintain the outbox")
    actions = outbox.add_subparsers(dest="action", required=True)
    common(actions.add_parser("status", help="pending / claimed / dead counts and the lag"))
    requeue = actions.add_parser("requeue", help="put dead deliveries back to pending")
    common(requeue)
    requeue.add_argument("--id", dest="ids", type=int, action="append", default=None)
    requeue.add_argument("--destination", default=None)
    purge = actions.add_parser("purge", help="delete delivered rows older than an age")
    common(purge)
    purge.add_argument("--older-than", type=parse_duration, required=True, metavar="AGE")
    purge.add_argument("--batch-size", type=int, default=1000)
    return parser


def _import_modules(modules: Sequence[str]) -> None:
    # Like uvicorn and celery: modules of the current directory are importable.
    if modules and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise CommandError(f"cannot import module {module!r}: {err}", EXIT_USAGE) from err


def _engine(url: str) -> AsyncEngine:
    try:
        return create_async_engine(url, pool_pre_ping=True)
    except (exc.ArgumentError, exc.NoSuchModuleError) as err:
        raise CommandError(f"invalid database URL {url!r}: {err}", EXIT_USAGE) from err
    except ImportError as err:
        raise CommandError(f"the driver for {url!r} is not installed: {err}", EXIT_USAGE) from err


def _outbox(args: argparse.Namespace) -> Outbox:
    box = default_outbox()
    if box is not None and box.events.name == args.table and box.events.schema == args.schema:
        return box
    return Outbox(MetaData(), table_name=args.table, schema=args.schema)


async def _check_database(engine: AsyncEngine, outbox: Outbox) -> None:
    safe_url = engine.url.render_as_string(hide_password=True)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (OSError, exc.DBAPIError) as err:
        raise CommandError(
            f"cannot connect to {safe_url}: {err.__class__.__name__}: {err}", EXIT_DATABASE
        ) from err
    try:
        async with engine.connect() as conn:
            await outbox.status(conn, destinations=["-"])
    except exc.DBAPIError as err:
        raise CommandError(
            f"no outbox tables {outbox.events.fullname!r} in {safe_url} "
            "(create them with create_outbox_tables or your migrations)",
            EXIT_DATABASE,
        ) from err


def _publishers(args: argparse.Namespace) -> list[Publisher]:
    specs = args.publisher or ["inprocess"]
    publishers: list[Publisher] = []
    for spec in specs:
        if spec == "inprocess":
            publishers.append(InProcessPublisher())
        elif spec.startswith(("redis://", "rediss://", "unix://")):
            from alchemium.events.publishers.redis import RedisStreamPublisher

            publishers.append(RedisStreamPublisher(spec, name=args.destination or "redis"))
        elif spec.startswith(("amqp://", "amqps://")):
            from alchemium.events.publishers.rabbitmq import RabbitMQPublisher

            publishers.append(RabbitMQPublisher(spec, name=args.destination or "rabbitmq"))
        else:
            raise CommandError(
                f"unknown publisher {spec!r} (use inprocess, redis://... or amqp://...)",
                EXIT_USAGE,
            )
    return publishers


async def _relay(
    args: argparse.Namespace, engine: AsyncEngine, outbox: Outbox, publishers: list[Publisher]
) -> int:
    relay = OutboxRelay(
        async_sessionmaker(engine, expire_on_commit=False),
        publishers,
        batch_size=args.batch_size,
        lease=args.lease,
        poll_interval=args.poll_interval,
        max_attempts=args.max_attempts,
        backoff_base=args.backoff_base,
        ordered=args.ordered,
        listen=not args.no_listen,
        relay_id=args.relay_id,
        retention=args.retention,
        outbox=outbox,
    )
    destinations = [d for p in publishers for d in destinations_of(p)]
    if not destinations:
        logger.warning("no destinations: no subscriber is registered (did --import run?)")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    try:
        await relay.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for publisher in publishers:
            close = getattr(publisher, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
    print(
        f"relay stopped: delivered={relay.stats.delivered} retried={relay.stats.retried} "
        f"dead={relay.stats.dead}",
        file=sys.stderr,
    )
    return EXIT_OK


async def _outbox_command(args: argparse.Namespace, engine: AsyncEngine, outbox: Outbox) -> int:
    if args.action == "status":
        async with engine.connect() as conn:
            status = await outbox.status(conn)
            dead = await outbox.dead(conn, limit=20)
        lag = "-" if status.oldest_pending_age is None else f"{status.oldest_pending_age:.1f}s"
        print(f"pending:   {status.pending}")
        print(f"claimed:   {status.claimed}")
        print(f"dead:      {status.dead}")
        print(f"delivered: {status.delivered}")
        print(f"lag:       {lag}")
        for row in dead:
            print(
                f"  dead #{row['id']} event {row['event_id']} ({row['name']}) -> "
                f"{row['destination']} after {row['attempts']} attempt(s): {row['last_error']}"
            )
    elif args.action == "requeue":
        async with engine.begin() as conn:
            count = await outbox.requeue(conn, ids=args.ids, destination=args.destination)
        print(f"requeued {count} dead deliver{'y' if count == 1 else 'ies'}")
    else:
        total = 0
        while True:
            async with engine.begin() as conn:
                removed = await outbox.purge(
                    conn, older_than=args.older_than, batch_size=args.batch_size
                )
            total += removed
            if removed == 0:
                break
        print(f"purged {total} delivered row(s) older than {args.older_than:g}s")
    return EXIT_OK


async def _main(args: argparse.Namespace) -> int:
    _import_modules(args.imports)
    publishers = _publishers(args) if args.command == "relay" else []
    engine = _engine(args.url)
    try:
        outbox = _outbox(args)
        await _check_database(engine, outbox)
        if args.command == "relay":
            return await _relay(args, engine, outbox, publishers)
        return await _outbox_command(args, engine, outbox)
    finally:
        await engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alchemium`` script; returns the exit code."""
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.command == "relay":
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_main(args))
    except CommandError as err:
        print(f"alchemium: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        logger.exception("unexpected failure")
        print(f"alchemium: error: {err.__class__.__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
