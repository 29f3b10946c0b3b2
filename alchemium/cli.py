"""The ``alchemium`` command line: run an outbox relay, inspect and maintain the outbox.

::

    alchemium relay --url URL --import myapp.handlers [--publisher inprocess|URL]
    alchemium relay --url URL --import myapp.handlers --once     # drain what is due, then exit
    alchemium outbox status  --url URL [--json]
    alchemium outbox requeue --url URL [--id N ...] [--destination NAME]
    alchemium outbox purge   --url URL --older-than 7d

``--url`` defaults to ``$ALCHEMIUM_DATABASE_URL``; ``python -m alchemium`` is the
same program. Exit codes: 0 success, 1 unexpected failure, 2 wrong usage (bad
arguments, an unknown or synchronous URL scheme, a module that cannot be
imported, a publisher whose extra is not installed or that its broker says is
misconfigured: a missing stream, topic or queue), 3 the database cannot be
reached, does not exist (a SQLite file is never created) or has no outbox
tables, or a broker cannot be reached or refuses the credentials, 130
interrupted, 141 the reader of stdout went away (``| head -1``).
Usage errors are one line on stderr, never a traceback. The relay stops cleanly
on SIGTERM and SIGINT, finishing the batch in flight.

Why this module is long (about 560 lines): every command's argument parsing, help
text and exit codes are the command line's contract, kept in one place; the work
itself is the outbox's and the relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

from sqlalchemy import MetaData, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from alchemium import __version__
from alchemium.errors import OutboxError
from alchemium.events.outbox import Outbox, OutboxStatus, default_outbox
from alchemium.events.publishers import (
    InProcessPublisher,
    Publisher,
    PublisherUnavailableError,
    destinations_of,
)
from alchemium.events.publishers.urls import publisher_from_url
from alchemium.events.relay import OutboxRelay
from alchemium.events.subscribers import MAIN_MODULE_HINT, is_main_module_name

__all__ = ["main", "parse_duration"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DATABASE = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE, as a shell reports

URL_VARIABLE = "ALCHEMIUM_DATABASE_URL"

logger = logging.getLogger("alchemium.cli")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = "seconds, or a duration such as 30s, 15m, 12h, 7d"
# The async driver of each database the outbox supports, and the drivers accepted as async.
_ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
_ACCEPTED_DRIVERS = {"sqlite": {"aiosqlite"}, "postgresql": {"asyncpg", "psycopg", "psycopg_async"}}


class CommandError(Exception):
    """A failure with a message for the user and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``alchemium relay: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_duration(value: str) -> float:
    """Parse ``90``, ``30s``, ``15m``, ``12h``, ``7d`` or ``2w`` into seconds (0 allowed)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", value)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {value!r} (examples: 30s, 15m, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _positive_duration(value: str) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {value!r}")
    return seconds


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value!r}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alchemium", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"alchemium {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            default=os.environ.get(URL_VARIABLE) or None,
            help=f"SQLAlchemy async database URL, e.g. postgresql+asyncpg://user@host/db or "
            f"sqlite+aiosqlite:///app.db (default: ${URL_VARIABLE})",
        )
        p.add_argument("--table", default="alchemium_outbox", help="outbox table name")
        p.add_argument("--schema", default=None, help="schema of the outbox tables")
        p.add_argument(
            "--shape",
            choices=("alchemium", "debezium"),
            default="alchemium",
            help="column names of the events table, as given to enable_outbox (alchemium)",
        )
        p.add_argument(
            "--import",
            dest="imports",
            action="append",
            default=[],
            metavar="MODULE",
            help="import MODULE first (registers handlers / destinations); repeatable",
        )

    relay = commands.add_parser(
        "relay", help="run an outbox relay until SIGTERM/SIGINT (or one pass with --once)"
    )
    common(relay)
    relay.add_argument(
        "--publisher",
        action="append",
        default=[],
        metavar="PUBLISHER",
        help="inprocess (default) or a broker URL: redis://, amqp://, nats://, kafka://, "
        "pubsub://PROJECT/TOPIC, sqs://, sns://ARN, https:// (webhook); options as query "
        "parameters (docs/relay.md); repeatable",
    )
    relay.add_argument(
        "--destination", default=None, metavar="NAME", help="destination name of a broker publisher"
    )
    relay.add_argument(
        "--batch-size",
        type=_positive_int,
        default=100,
        metavar="ROWS",
        help="rows claimed per round (100)",
    )
    relay.add_argument(
        "--lease",
        type=_positive_duration,
        default=30.0,
        metavar="DURATION",
        help=f"how long a claim keeps rows from other relays, renewed every lease/3; {_DURATION} "
        "(30s)",
    )
    relay.add_argument(
        "--poll-interval",
        type=_positive_duration,
        default=1.0,
        metavar="DURATION",
        help=f"wait between polls when idle; {_DURATION} (1s)",
    )
    relay.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=10,
        metavar="ATTEMPTS",
        help="delivery attempts before a row is dead (10)",
    )
    relay.add_argument(
        "--backoff-base",
        type=_positive_duration,
        default=1.0,
        metavar="DURATION",
        help=f"first retry delay, doubled per attempt with jitter; {_DURATION} (1s)",
    )
    relay.add_argument(
        "--backoff-cap",
        type=_positive_duration,
        default=300.0,
        metavar="DURATION",
        help=f"longest retry delay; {_DURATION} (5m)",
    )
    relay.add_argument(
        "--publish-timeout",
        type=_positive_duration,
        default=60.0,
        metavar="DURATION",
        help=f"how long one publish may take before it counts as failed; {_DURATION} (60s)",
    )
    relay.add_argument(
        "--ordered",
        action="store_true",
        help="deliver each aggregate's events in order (a failing one holds back later ones)",
    )
    relay.add_argument(
        "--no-listen", action="store_true", help="poll only, no LISTEN/NOTIFY (e.g. PgBouncer)"
    )
    relay.add_argument(
        "--retention",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help=f"purge events older than this once all delivered, while idle; {_DURATION} (keep all)",
    )
    relay.add_argument(
        "--stranded-after",
        type=_positive_duration,
        default=None,
        metavar="DURATION",
        help="warn about destinations this relay does not serve whose rows are overdue by "
        f"more than this; {_DURATION} (max(60s, 5 poll intervals))",
    )
    relay.add_argument(
        "--relay-id",
        default=None,
        metavar="NAME",
        help="name recorded in claimed_by (host:pid:random)",
    )
    relay.add_argument(
        "--once",
        action="store_true",
        help="one pass: deliver what is due now, report the counts and exit (for cron)",
    )

    outbox = commands.add_parser("outbox", help="inspect and maintain the outbox")
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser(
        "status", help="pending / claimed / dead / delivered, lag and overdue per destination"
    )
    common(status)
    status.add_argument(
        "--json", action="store_true", help="print one JSON document (totals, destinations, dead)"
    )
    requeue = actions.add_parser("requeue", help="put dead deliveries back to pending")
    common(requeue)
    requeue.add_argument(
        "--id",
        dest="ids",
        type=_positive_int,
        metavar="ID",
        action="append",
        default=None,
        help="delivery row id to requeue (default: every dead row); repeatable",
    )
    requeue.add_argument(
        "--destination", default=None, metavar="NAME", help="only rows of this destination"
    )
    purge = actions.add_parser(
        "purge", help="delete events older than an age whose deliveries are all delivered"
    )
    common(purge)
    purge.add_argument(
        "--older-than",
        type=parse_duration,
        required=True,
        metavar="AGE",
        help=f"age of the delivered rows to delete; {_DURATION}",
    )
    purge.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1000,
        metavar="ROWS",
        help="rows deleted per statement (1000)",
    )
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


def _database_url(raw: str) -> URL:
    """The parsed URL; a synchronous driver of a supported database is a usage error."""
    try:
        url = make_url(raw)
    except exc.ArgumentError as err:
        raise CommandError(f"invalid database URL {raw!r}: {err}", EXIT_USAGE) from err
    backend, _, driver = url.drivername.partition("+")
    backend = "postgresql" if backend == "postgres" else backend
    if backend in _ASYNC_DRIVERS and driver not in _ACCEPTED_DRIVERS[backend]:
        fixed = url.set(drivername=f"{backend}+{_ASYNC_DRIVERS[backend]}")
        raise CommandError(
            f"{url.render_as_string(hide_password=True)!r} has no async driver; "
            f"use {fixed.render_as_string(hide_password=True)}",
            EXIT_USAGE,
        )
    return url


def _missing_sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL if it does not exist (connecting would create it)."""
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    if database.startswith("file:") or url.query.get("uri"):
        return None  # a SQLite URI: its mode= decides, let SQLite check it
    path = Path(database)
    return None if path.exists() else path


def _engine(raw: str) -> AsyncEngine:
    url = _database_url(raw)
    missing = _missing_sqlite_file(url)
    if missing is not None:
        raise CommandError(
            f"SQLite database {str(missing)!r} does not exist (alchemium never creates it; "
            "check --url)",
            EXIT_DATABASE,
        )
    try:
        return create_async_engine(url, pool_pre_ping=True)
    except (exc.ArgumentError, exc.NoSuchModuleError) as err:
        raise CommandError(f"invalid database URL {raw!r}: {err}", EXIT_USAGE) from err
    except exc.InvalidRequestError as err:  # a synchronous driver of another database
        raise CommandError(f"database URL {raw!r}: {err}", EXIT_USAGE) from err
    except ImportError as err:
        raise CommandError(f"the driver for {raw!r} is not installed: {err}", EXIT_USAGE) from err


def _outbox(args: argparse.Namespace) -> Outbox:
    box = default_outbox()
    if box is not None and box.events.name == args.table and box.events.schema == args.schema:
        return box
    return Outbox(MetaData(), table_name=args.table, schema=args.schema, shape=args.shape)


async def _check_database(engine: AsyncEngine, outbox: Outbox) -> None:
    safe_url = engine.url.render_as_string(hide_password=True)
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
    except (OSError, exc.DBAPIError) as err:
        raise CommandError(
            f"cannot connect to {safe_url}: {err.__class__.__name__}: {err}", EXIT_DATABASE
        ) from err
    try:
        async with engine.connect() as conn:
            await outbox.undelivered(conn, ["-"])
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
        try:
            if spec == "inprocess":
                publishers.append(InProcessPublisher())
            else:  # a broker URL (alchemium/events/publishers/urls.py); checked at start
                publishers.append(publisher_from_url(spec, name=args.destination))
        except OutboxError as err:  # unknown scheme or option, missing extra or secret
            raise CommandError(str(err), EXIT_USAGE) from err
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
        backoff_cap=args.backoff_cap,
        ordered=args.ordered,
        listen=not args.no_listen,
        relay_id=args.relay_id,
        publish_timeout=args.publish_timeout,
        retention=args.retention,
        stranded_after=args.stranded_after,
        outbox=outbox,
    )
    destinations = [d for p in publishers for d in destinations_of(p)]
    if not destinations:
        logger.warning("no destinations: no subscriber is registered (did --import run?)")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    try:
        try:  # connect and check each publisher now: bad configuration fails in one line
            await relay.start()
        except PublisherUnavailableError as err:
            raise CommandError(str(err), EXIT_DATABASE) from err
        except OutboxError as err:
            raise CommandError(str(err), EXIT_USAGE) from err
        if args.once:
            try:
                await relay.drain()
            except (OSError, exc.DBAPIError) as err:
                raise CommandError(
                    f"database error during the pass: {err.__class__.__name__}: {err}",
                    EXIT_DATABASE,
                ) from err
        else:
            await relay.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for publisher in publishers:
            close = getattr(publisher, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    logger.warning("could not close publisher %r", publisher, exc_info=True)
    stats = relay.stats
    print(
        f"relay {'pass done' if args.once else 'stopped'}: delivered={stats.delivered} "
        f"retried={stats.retried} dead={stats.dead} lost_leases={stats.lost_leases}",
        file=sys.stderr,
    )
    return EXIT_OK


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


async def _status(args: argparse.Namespace, engine: AsyncEngine, outbox: Outbox) -> None:
    async with engine.connect() as conn:
        per = await outbox.destination_status(conn)
        dead = await outbox.dead(conn, limit=20)
    total = OutboxStatus.total(per)
    if args.json:
        document = {
            "totals": asdict(total),
            "destinations": [asdict(s) for s in per],
            "dead": [{**row, "event_id": str(row["event_id"])} for row in dead],
        }
        print(json.dumps(document, indent=2))
        return
    print(f"pending:   {total.pending}")
    print(f"claimed:   {total.claimed}")
    print(f"dead:      {total.dead}")
    print(f"delivered: {total.delivered}")
    print(f"lag:       {_seconds(total.oldest_pending_age)}")
    if per:
        width = max(len("destination"), *(len(s.destination) for s in per))
        print()
        print(
            f"{'destination':<{width}}  {'pending':>8} {'claimed':>8} {'dead':>6} "
            f"{'delivered':>10} {'lag':>9} {'overdue':>9}"
        )
        for s in per:
            print(
                f"{s.destination:<{width}}  {s.pending:>8} {s.claimed:>8} {s.dead:>6} "
                f"{s.delivered:>10} {_seconds(s.oldest_pending_age):>9} {_seconds(s.overdue):>9}"
            )
    for s in per:
        if is_main_module_name(s.destination) and (s.pending or s.claimed or s.dead):
            print(f"note: {s.destination!r} is a handler name from a script; {MAIN_MODULE_HINT}")
    for row in dead:
        print(
            f"  dead #{row['id']} event {row['event_id']} ({row['name']}) -> "
            f"{row['destination']} after {row['attempts']} attempt(s): {row['last_error']}"
        )


async def _outbox_command(args: argparse.Namespace, engine: AsyncEngine, outbox: Outbox) -> int:
    if args.action == "status":
        await _status(args, engine, outbox)
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
        print(f"purged {total} delivered row(s) of events older than {args.older_than:g}s")
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


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.url is None:
            parser.error(f"--url is required (or set {URL_VARIABLE})")
    except SystemExit as stop:  # usage errors, --help, --version
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
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
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except Exception as err:
        logger.exception("unexpected failure")
        print(f"alchemium: error: {err.__class__.__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alchemium`` script; returns the exit code."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
    except BrokenPipeError:
        # `alchemium outbox status | head -1`: the Python docs' SIGPIPE recipe. Point
        # stdout at devnull so the flush at exit does not fail (and print) again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
