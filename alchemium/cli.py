"""The ``alchemium`` command line: run an outbox relay, inspect and maintain the outbox.

::

    alchemium relay --url URL --import myapp.handlers [--publisher inprocess|URL]
    alchemium relay --url URL --import myapp.handlers --once     # drain what is due, then exit
    alchemium relay --url URL --import myapp.handlers --metrics-port 9464   # /metrics, /health
    alchemium relay --health --metrics-port 9464 [--max-lag 5m]  # probe a running relay
    alchemium outbox status  --url URL [--json]
    alchemium outbox requeue --url URL [--id N ...] [--destination NAME] [--event-type T]
                             [--error TEXT] [--min-age 1h] [--limit N] [--include-abandoned]
                             [--dry-run]
    alchemium outbox replay  --url URL --destination NAME --since 2026-11-01 [--until ...]
                             [--event-type T ...] [--aggregate TYPE[:ID]] [--import MODULE]
                             [--batch-size N] [--pause 0.5s] [--max-waiting ROWS]
    alchemium outbox purge   --url URL --older-than 7d
    alchemium outbox partitions --url URL --partition-by day [--ahead 3] [--drop-older-than 30d]
    alchemium dashboard      --url URL [--port 8000] [--actions]  # binds 127.0.0.1

``--url`` defaults to ``$ALCHEMIUM_DATABASE_URL``; ``python -m alchemium`` is the
same program. Exit codes: 0 success, 1 unexpected failure, 2 wrong usage (bad
arguments, an unknown or synchronous URL scheme, a module that cannot be
imported, a publisher whose extra is not installed or that its broker says is
misconfigured: a missing stream, topic or queue), 3 the database cannot be
reached, does not exist (a SQLite file is never created) or has no outbox
tables, or a broker cannot be reached or refuses the credentials, 4 ``relay --health``:
the relay answered unhealthy, 5 ``relay --health``: no relay answered, 130
interrupted, 141 the reader of stdout went away (``| head -1``).
Usage errors are one line on stderr, never a traceback. The relay stops cleanly
on SIGTERM and SIGINT, finishing the batch in flight.

Why this module is long (about 1,000 lines): every command's argument parsing, help
text and exit codes are the command line's contract, kept in one place; the work
itself is the outbox's and the relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import MetaData, exc, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from alchemium import __version__
from alchemium.errors import EventConfigurationError, OutboxError
from alchemium.events.outbox import Outbox, OutboxStatus, default_outbox
from alchemium.events.outbox_partitions import PARTITIONS_AHEAD
from alchemium.events.outbox_schema import PARTITION_PERIODS
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
EXIT_UNHEALTHY, EXIT_NO_RELAY = 4, 5  # relay --health
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


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {value!r}")
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
            "--partition-by",
            choices=PARTITION_PERIODS,
            default=None,
            help="PostgreSQL: the period of a partitioned outbox, as given to enable_outbox "
            "(default: not partitioned)",
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
    _monitoring_arguments(relay)

    outbox = commands.add_parser("outbox", help="inspect and maintain the outbox")
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser(
        "status",
        help="pending / claimed / dead / abandoned / delivered, lag and overdue per destination",
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
    _requeue_filters(requeue)
    _replay_parser(actions, common)
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
    partitions = actions.add_parser(
        "partitions",
        help="a partitioned outbox (PostgreSQL): make the coming periods, drop old ones, list",
    )
    common(partitions)
    partitions.add_argument(
        "--ahead",
        type=_non_negative_int,
        default=PARTITIONS_AHEAD,
        metavar="PERIODS",
        help=f"make the partitions of this many periods after now ({PARTITIONS_AHEAD})",
    )
    partitions.add_argument(
        "--drop-older-than",
        type=parse_duration,
        default=None,
        metavar="AGE",
        help="drop the periods that ended this long ago and hold nothing undelivered; "
        f"{_DURATION} (drop nothing)",
    )
    _dashboard_parser(commands, common)
    return parser


def _requeue_filters(requeue: argparse.ArgumentParser) -> None:
    """The filters of ``outbox requeue`` beyond --id and --destination (docs/lifecycle.md)."""
    requeue.add_argument(
        "--event-type", default=None, metavar="NAME", help="only events of this name or pattern"
    )
    requeue.add_argument(
        "--error",
        dest="error_contains",
        default=None,
        metavar="TEXT",
        help="only rows whose last error contains TEXT (ignoring case)",
    )
    requeue.add_argument(
        "--min-age",
        type=parse_duration,
        default=None,
        metavar="AGE",
        help=f"only rows dead for at least AGE; {_DURATION}",
    )
    requeue.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="ROWS",
        help="at most ROWS, oldest first",
    )
    requeue.add_argument(
        "--include-abandoned",
        action="store_true",
        help="also requeue rows a destination's policy abandoned (left alone by default)",
    )
    requeue.add_argument(
        "--dry-run", action="store_true", help="count the rows that would move; change nothing"
    )


def _moment(value: str) -> dt.datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise), or a duration ago."""
    try:
        seconds = parse_duration(value)
    except argparse.ArgumentTypeError:
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid time {value!r} (examples: 2026-11-01, 2026-11-01T12:00:00+01:00, 7d)"
            ) from None
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)


def _replay_parser(actions: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    replay = actions.add_parser(
        "replay", help="deliver retained events to a destination again (rate-limited, idempotent)"
    )
    common(replay)
    replay.add_argument(
        "--destination",
        required=True,
        metavar="NAME",
        help="subscriber or broker destination (known from --import, or give --event-type)",
    )
    replay.add_argument(
        "--since",
        type=_moment,
        required=True,
        metavar="TIME",
        help="events that occurred at or after TIME: 2026-11-01, an ISO time, or an age (7d)",
    )
    replay.add_argument(
        "--until", type=_moment, default=None, metavar="TIME", help="and before TIME (now)"
    )
    replay.add_argument(
        "--event-type",
        dest="event_types",
        action="append",
        default=None,
        metavar="NAME",
        help="only events of this name or pattern (user_*); repeatable",
    )
    replay.add_argument(
        "--aggregate",
        default=None,
        metavar="TYPE[:ID]",
        help="only events of this aggregate type (and id), e.g. user or user:42",
    )
    replay.add_argument(
        "--batch-size",
        type=_positive_int,
        default=500,
        metavar="EVENTS",
        help="events per transaction (500)",
    )
    replay.add_argument(
        "--pause",
        type=parse_duration,
        default=0.5,
        metavar="DURATION",
        help=f"wait between batches, to leave room for live traffic; {_DURATION} (0.5s)",
    )
    replay.add_argument(
        "--max-waiting",
        type=_positive_int,
        default=None,
        metavar="ROWS",
        help="before each batch, wait until fewer replayed deliveries than ROWS are undelivered",
    )


async def _replay(args: argparse.Namespace, engine: AsyncEngine, outbox: Outbox) -> None:
    aggregate_type, _, aggregate_id = (args.aggregate or "").partition(":")
    try:
        report = await outbox.replay(
            async_sessionmaker(engine, expire_on_commit=False),
            args.destination,
            since=args.since,
            until=args.until,
            event_types=args.event_types,
            aggregate_type=aggregate_type or None,
            aggregate_id=aggregate_id or None,
            batch_size=args.batch_size,
            pause=args.pause,
            max_waiting=args.max_waiting,
        )
    except (OutboxError, EventConfigurationError) as err:
        raise CommandError(str(err), EXIT_USAGE) from err
    print(
        f"replay to {report.destination}: {report.matched} event(s) matched, "
        f"{report.scheduled} scheduled ({report.created} new, {report.redelivered} "
        f"redelivered), {report.skipped} skipped (already pending, dead or abandoned), "
        f"{report.batches} batch(es)"
    )


async def _requeue(args: argparse.Namespace, engine: AsyncEngine, outbox: Outbox) -> None:
    async with engine.begin() as conn:
        try:
            count = await outbox.requeue_matching(
                conn,
                ids=args.ids,
                destination=args.destination,
                event_type=args.event_type,
                error_contains=args.error_contains,
                min_age=args.min_age,
                limit=args.limit,
                include_abandoned=args.include_abandoned,
                dry_run=args.dry_run,
            )
        except EventConfigurationError as err:
            raise CommandError(str(err), EXIT_USAGE) from err
    rows = f"deliver{'y' if count == 1 else 'ies'}"
    kind = "dead or abandoned" if args.include_abandoned else "dead"
    if args.dry_run:
        print(f"would requeue {count} {kind} {rows} (dry run: nothing changed)")
    else:
        print(f"requeued {count} {kind} {rows}")


def _monitoring_arguments(relay: argparse.ArgumentParser) -> None:
    """``--metrics-port`` and ``--health`` (with its thresholds) of ``alchemium relay``."""
    relay.add_argument(
        "--metrics-port",
        type=_positive_int,
        default=None,
        metavar="PORT",
        help="serve /metrics (Prometheus text) and /health (JSON) on this port",
    )
    relay.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the metrics port (127.0.0.1; 0.0.0.0 to be scraped from outside)",
    )
    relay.add_argument(
        "--health",
        action="store_true",
        help="ask the relay serving --metrics-port whether it is healthy and exit: 0 healthy, "
        "4 unhealthy, 5 no relay answered (a Kubernetes exec probe)",
    )
    relay.add_argument(
        "--max-lag",
        type=_positive_duration,
        default=None,
        metavar="DURATION",
        help=f"with --health: unhealthy if a served destination lags more; {_DURATION}",
    )
    relay.add_argument(
        "--max-stall",
        type=_positive_duration,
        default=None,
        metavar="DURATION",
        help="with --health: unhealthy if a round makes no progress for longer; "
        f"{_DURATION} (publish timeout + 2 leases)",
    )
    relay.add_argument(
        "--max-listen-down",
        type=_positive_duration,
        default=None,
        metavar="DURATION",
        help=f"with --health: unhealthy if LISTEN is down for longer; {_DURATION} (60s)",
    )


async def _health(args: argparse.Namespace) -> int:
    """``alchemium relay --health``: one line on stdout (healthy) or stderr, and the exit code."""
    from alchemium.events.monitoring import probe_relay

    if args.metrics_port is None:
        raise CommandError("--health needs --metrics-port (the port the relay serves)", EXIT_USAGE)
    host = "127.0.0.1" if args.metrics_host in ("0.0.0.0", "::") else args.metrics_host
    try:
        health = await probe_relay(
            args.metrics_port,
            host,
            max_lag=args.max_lag,
            max_stall=args.max_stall,
            max_listen_down=args.max_listen_down,
        )
    except ConnectionError as err:
        raise CommandError(str(err), EXIT_NO_RELAY) from err
    if health.healthy:
        print(f"relay {health.relay_id} healthy")
        return EXIT_OK
    for problem in health.problems:
        print(f"alchemium: unhealthy: relay {health.relay_id}: {problem}", file=sys.stderr)
    return EXIT_UNHEALTHY


async def _start_monitoring(
    args: argparse.Namespace, relay: OutboxRelay
) -> tuple[asyncio.Server | None, asyncio.Task[None] | None]:
    """The ``--metrics-port`` server, and the OpenTelemetry gauges' refresh if an SDK is set."""
    from alchemium.events.metrics import OutboxGauges
    from alchemium.events.monitoring import monitoring_app, serve_monitoring

    gauges = OutboxGauges(relay.session_factory, relay.outbox)
    refresh = None
    if gauges.observe():
        refresh = asyncio.create_task(gauges.refresh_forever(relay.lag_interval))
    server = None
    if args.metrics_port is not None:
        try:
            server = await serve_monitoring(
                monitoring_app(relay, gauges), args.metrics_host, args.metrics_port
            )
        except OSError as err:
            if refresh is not None:
                refresh.cancel()
            raise CommandError(
                f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {err}",
                EXIT_USAGE,
            ) from err
        logger.info("relay metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)
    return server, refresh


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
    return Outbox(
        MetaData(),
        table_name=args.table,
        schema=args.schema,
        shape=args.shape,
        partition_by=args.partition_by,
    )


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
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            partitioned = await conn.scalar(
                text("SELECT count(*) FROM pg_partitioned_table WHERE partrelid = to_regclass(:t)"),
                {"t": outbox.events.fullname},
            )
        if bool(partitioned) != (outbox.partition_by is not None):
            raise CommandError(
                f"the outbox table {outbox.events.fullname!r} is "
                + (
                    "partitioned: pass --partition-by day|week|month as given to enable_outbox"
                    if partitioned
                    else "not partitioned: leave out --partition-by"
                ),
                EXIT_USAGE,
            )


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
    server, refresh = await _start_monitoring(args, relay)
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
        if server is not None:
            server.close()
        if refresh is not None:
            refresh.cancel()
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
        f"retried={stats.retried} dead={stats.dead} abandoned={stats.abandoned} "
        f"lost_leases={stats.lost_leases}",
        file=sys.stderr,
    )
    return EXIT_OK


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


async def _partitions(args: argparse.Namespace, engine: AsyncEngine, outbox: Outbox) -> None:
    if outbox.partition_by is None:
        raise CommandError(
            "outbox partitions: the outbox is not partitioned (--partition-by)", EXIT_USAGE
        )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session:
        made = await outbox.ensure_partitions(session, ahead=args.ahead)
        await session.commit()
    for part in made:
        print(f"made {part.events} and {part.deliveries} ({part.start:%Y-%m-%d %H:%M}Z ..)")
    if args.drop_older_than is not None:
        async with sessions() as session:
            report = await outbox.drop_partitions(session, older_than=args.drop_older_than)
        for part in report.dropped:
            print(f"dropped the period {part.start:%Y-%m-%d}")
        for part, undelivered in report.kept:
            print(f"kept the period {part.start:%Y-%m-%d}: {undelivered} undelivered row(s)")
    async with sessions() as session:
        periods = await outbox.partitions(session)
    print(f"{len(periods)} period(s) of a {outbox.partition_by}:")
    for part in periods:
        pending = " (detach pending)" if part.detach_pending else ""
        print(f"  {part.start:%Y-%m-%d %H:%M}Z .. {part.end:%Y-%m-%d %H:%M}Z{pending}")


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
    print(f"abandoned: {total.abandoned}")
    print(f"delivered: {total.delivered}")
    print(f"lag:       {_seconds(total.oldest_pending_age)}")
    if per:
        width = max(len("destination"), *(len(s.destination) for s in per))
        print()
        print(
            f"{'destination':<{width}}  {'pending':>8} {'claimed':>8} {'dead':>6} "
            f"{'abandoned':>9} {'delivered':>10} {'lag':>9} {'overdue':>9}"
        )
        for s in per:
            print(
                f"{s.destination:<{width}}  {s.pending:>8} {s.claimed:>8} {s.dead:>6} "
                f"{s.abandoned:>9} {s.delivered:>10} {_seconds(s.oldest_pending_age):>9} "
                f"{_seconds(s.overdue):>9}"
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
        await _requeue(args, engine, outbox)
    elif args.action == "replay":
        await _replay(args, engine, outbox)
    elif args.action == "partitions":
        await _partitions(args, engine, outbox)
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
    if args.command == "relay" and args.health:
        return await _health(args)
    _import_modules(args.imports)
    publishers = _publishers(args) if args.command == "relay" else []
    engine = _engine(args.url)
    try:
        outbox = _outbox(args)
        await _check_database(engine, outbox)
        if args.command == "relay":
            return await _relay(args, engine, outbox, publishers)
        if args.command == "dashboard":
            return await _dashboard(args, engine, outbox)
        return await _outbox_command(args, engine, outbox)
    finally:
        await engine.dispose()


# -- alchemium dashboard -----------------------------------------------------------------------

TOKEN_VARIABLE = "ALCHEMIUM_DASHBOARD_TOKEN"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {value!r}")
    return number


def _dashboard_parser(
    commands: argparse._SubParsersAction[Any],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    dashboard = commands.add_parser(
        "dashboard", help="serve the operations dashboard (read-only unless --actions)"
    )
    common(dashboard)
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)"
    )
    dashboard.add_argument("--port", type=_port, default=8000, help="port to bind (8000)")
    dashboard.add_argument(
        "--actions",
        action="store_true",
        help="allow requeue and discard (needs a token; creates the action log table)",
    )
    dashboard.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help=f"file holding the access token (default: ${TOKEN_VARIABLE}); every page needs it",
    )
    dashboard.add_argument(
        "--show-payloads",
        action="store_true",
        help="show event payloads and audited changes (they may hold personal data)",
    )
    dashboard.add_argument(
        "--audit-table",
        default="alchemium_audit_log",
        metavar="NAME",
        help="audit log table for the audit page, if it exists (alchemium_audit_log)",
    )
    dashboard.add_argument(
        "--refresh",
        type=parse_duration,
        default=5.0,
        metavar="DURATION",
        help=f"reload interval of the live pages, 0 for never; {_DURATION} (5s)",
    )


def _dashboard_token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return os.environ.get(TOKEN_VARIABLE) or None
    try:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise CommandError(f"cannot read --token-file: {err}", EXIT_USAGE) from err
    if not token:
        raise CommandError(f"--token-file {args.token_file!r} is empty", EXIT_USAGE)
    return token


async def _dashboard(args: argparse.Namespace, engine: AsyncEngine, outbox: Outbox) -> int:
    try:
        import uvicorn

        from alchemium.dashboard import DashboardConfigurationError, create_app
    except ImportError as err:
        raise CommandError(
            f"the dashboard needs its extra: pip install 'alchemium[dashboard]' ({err})",
            EXIT_USAGE,
        ) from err
    from alchemium.events.audit import AuditLog
    from alchemium.events.outbox_actions import OutboxActionLog, create_action_table

    token = _dashboard_token(args)
    action_log = OutboxActionLog(MetaData(), schema=args.schema)
    try:
        app = create_app(
            engine,
            actions=args.actions,
            token=token,
            show_payloads=args.show_payloads,
            outbox=outbox,
            audit=AuditLog(MetaData(), table_name=args.audit_table, schema=args.schema),
            action_log=action_log,
            refresh=args.refresh,
        )
    except DashboardConfigurationError as err:
        raise CommandError(
            f"{err} (--actions needs --token-file or ${TOKEN_VARIABLE})", EXIT_USAGE
        ) from err
    if args.actions:
        await create_action_table(engine, action_log)
    if args.host not in _LOOPBACK and token is None:
        print(
            f"alchemium: warning: serving on {args.host} without a token: whoever reaches "
            "this port can read the outbox",
            file=sys.stderr,
        )

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # SIGTERM/SIGINT are ours (below): stop serving, exit 0

    server = _Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="off")
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    mode = "actions enabled" if args.actions else "read-only"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"alchemium dashboard on http://{host}:{args.port}/ ({mode})", file=sys.stderr)
    try:
        await server.serve()
    except SystemExit as stop:  # uvicorn exits when it cannot bind (it logged why)
        raise CommandError(f"cannot serve on {host}:{args.port}", EXIT_FAILURE) from stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return EXIT_OK


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.url is None and not getattr(args, "health", False):
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
