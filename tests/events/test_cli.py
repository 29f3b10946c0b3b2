"""The ``alchemium`` command line, run as a real subprocess: its documented contract.

Usage errors exit 2 with one line on stderr and no traceback; a database that cannot
be used exits 3 (and a SQLite file is never created); output into a pipe whose
reader went away ends quietly.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import alchemium
from alchemium.cli import parse_duration
from alchemium.events import OutboxRelay
from alchemium.events.outbox import Outbox, database_now
from tests.events.relay_support import (
    LONG_AGO,
    REPO,
    Sink,
    by_status,
    delivery_rows,
    insert_events,
    run_cli,
    sink_lines,
)
from tests.rig import free_port

Factory = async_sessionmaker[AsyncSession]

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


def test_durations_parse() -> None:
    assert [parse_duration(v) for v in ("90", "30s", "15m", "12h", "7d")] == [
        90,
        30,
        900,
        43200,
        604800,
    ]


async def cli(*args: str, **options: Any) -> tuple[int, str, str]:
    done = await asyncio.to_thread(run_cli, *args, **options)
    return done.returncode, done.stdout, done.stderr


async def run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command line other than ``python -m alchemium`` (a wrapper, a shell pipeline)."""
    return await asyncio.to_thread(
        subprocess.run,
        argv,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_usage_error(code: int, err: str, *fragments: str) -> None:
    """Exit 2, one line on stderr naming what was wrong, no traceback."""
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


@sqlite_only
async def test_status_requeue_and_purge(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str
) -> None:
    events = await insert_events(session_factory, outbox, 4)
    relay = OutboxRelay(
        session_factory, Sink(fail=lambda e: e.id == events[0].id), max_attempts=1, listen=False
    )
    assert await relay.run_once() == 3

    code, out, err = await cli("outbox", "status", "--url", db_url)
    assert code == 0, err
    assert "pending:   0" in out
    assert "dead:      1" in out
    assert "delivered: 3" in out
    assert str(events[0].id) in out
    assert "sink refused" in out

    code, out, err = await cli("outbox", "requeue", "--url", db_url)
    assert (code, out.strip()) == (0, "requeued 1 dead delivery"), err
    assert await by_status(engine, outbox) == {"pending": 1, "delivered": 3}

    code, out, _ = await cli("outbox", "purge", "--url", db_url, "--older-than", "7d")
    assert (code, out.split()[:2]) == (0, ["purged", "0"])
    async with session_factory() as session:
        await session.execute(update(outbox.deliveries).values(delivered_at=LONG_AGO))
        await session.execute(update(outbox.events).values(occurred_at=LONG_AGO))
        await session.commit()
    code, out, _ = await cli("outbox", "purge", "--url", db_url, "--older-than", "7d")
    assert (code, out.split()[:2]) == (0, ["purged", "3"])
    assert await by_status(engine, outbox) == {"pending": 1}  # the requeued row stays


@sqlite_only
async def test_relay_with_a_module_that_does_not_exist_exits_2(
    engine: AsyncEngine, db_url: str
) -> None:
    code, _, err = await cli("relay", "--url", db_url, "--import", "myapp.nope")
    assert code == 2
    assert "cannot import module 'myapp.nope'" in err


async def test_wrong_urls_give_clear_errors(tmp_path: Path) -> None:
    code, _, err = await cli("outbox", "status", "--url", "nosuchdb://x/y")
    assert code == 2
    assert "invalid database URL" in err

    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"
    code, _, err = await cli("outbox", "status", "--url", url)
    assert code == 3
    assert "cannot connect to" in err


async def test_status_without_outbox_tables_says_so(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "e.db").close()  # an empty database
    code, _, err = await cli("outbox", "status", "--url", f"sqlite+aiosqlite:///{tmp_path}/e.db")
    assert code == 3
    assert "no outbox tables" in err


async def test_unknown_publisher_exits_2(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/e.db"
    code, _, err = await cli("relay", "--url", url, "--publisher", "pigeon://x")
    assert code == 2
    assert "unknown publisher 'pigeon://x'" in err


# -- usage errors: exit 2, one line, no traceback ----------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        ["relay", "--batch-size", "0"],
        ["relay", "--max-attempts", "-1"],
        ["relay", "--batch-size", "ten"],
        ["relay", "--lease", "0"],
        ["relay", "--poll-interval", "0s"],
        ["outbox", "purge", "--older-than", "7d", "--batch-size", "0"],
    ],
    ids=lambda a: " ".join(a),
)
async def test_a_number_that_is_not_positive_is_a_usage_error(
    arguments: list[str], tmp_path: Path
) -> None:
    code, _, err = await cli(*arguments, "--url", f"sqlite+aiosqlite:///{tmp_path}/e.db")
    assert_usage_error(code, err, f"argument {arguments[-2]}", repr(arguments[-1]))


@pytest.mark.parametrize(
    ("url", "fixed"),
    [
        ("sqlite:///x.db", "use sqlite+aiosqlite:///x.db"),
        ("postgresql://app@db/app", "use postgresql+asyncpg://app@db/app"),
        ("postgres://app:secret@db/app", "use postgresql+asyncpg://app:***@db/app"),
    ],
)
async def test_a_url_without_an_async_driver_says_which_url_to_use(url: str, fixed: str) -> None:
    code, _, err = await cli("outbox", "status", "--url", url)
    assert_usage_error(code, err, fixed)
    assert "secret" not in err


@pytest.mark.parametrize(
    ("blocked", "publisher", "extra"),
    [
        ("redis", "redis://127.0.0.1:1/0", "alchemium[redis]"),
        ("aio_pika", "amqp://guest:guest@127.0.0.1:1/", "alchemium[rabbitmq]"),
    ],
)
async def test_a_publisher_whose_extra_is_not_installed_is_a_usage_error(
    blocked: str, publisher: str, extra: str, tmp_path: Path
) -> None:
    # The client library cannot be imported, as when the extra was not installed.
    without = f"import sys; sys.modules[{blocked!r}] = None; import runpy; "
    without += "runpy.run_module('alchemium', run_name='__main__')"
    url = f"sqlite+aiosqlite:///{tmp_path}/e.db"
    done = await run(sys.executable, "-c", without, "relay", "--url", url, "--publisher", publisher)
    assert_usage_error(done.returncode, done.stderr, f"pip install '{extra}'")


async def test_the_url_comes_from_the_environment_unless_given(tmp_path: Path) -> None:
    code, _, err = await cli("outbox", "status", env={"ALCHEMIUM_DATABASE_URL": ""})
    assert_usage_error(code, err, "--url is required (or set ALCHEMIUM_DATABASE_URL)")

    sqlite3.connect(tmp_path / "empty.db").close()
    from_env = {"ALCHEMIUM_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/empty.db"}
    code, _, err = await cli("outbox", "status", env=from_env)
    assert (code, "no outbox tables" in err) == (3, True)  # it used the variable's database

    code, _, err = await cli(
        "outbox", "status", "--url", f"sqlite+aiosqlite:///{tmp_path}/other.db", env=from_env
    )
    assert (code, "other.db" in err) == (3, True)  # --url wins


# -- the database: exit 3, nothing created ---------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        ["outbox", "status"],
        ["outbox", "requeue"],
        ["outbox", "purge", "--older-than", "7d"],
        ["relay", "--once"],
    ],
    ids=lambda a: " ".join(a),
)
async def test_a_sqlite_file_that_does_not_exist_is_not_created(
    arguments: list[str], tmp_path: Path
) -> None:
    missing = tmp_path / "typo.db"
    code, _, err = await cli(*arguments, "--url", f"sqlite+aiosqlite:///{missing}")
    assert code == 3, err
    assert err.strip() == (
        f"alchemium: error: SQLite database '{missing}' does not exist "
        "(alchemium never creates it; check --url)"
    )
    assert not missing.exists()


# -- output -----------------------------------------------------------------------------------


@sqlite_only
async def test_status_piped_into_head_ends_quietly(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str
) -> None:
    # Far more than a pipe holds (64 KiB, 380 KB here): `head` exits while status still writes.
    names = [f"destination-{i:04}" for i in range(5000)]
    await insert_events(session_factory, outbox, 1, destinations=names)
    command = f"set -o pipefail; {sys.executable} -m alchemium outbox status --url '{db_url}'"
    done = await run("bash", "-c", f"{command} | head -1")
    assert done.stdout == "pending:   5000\n"
    assert done.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"
    assert done.returncode == 141  # 128 + SIGPIPE, what a shell reports for `yes | head -1`


@sqlite_only
async def test_status_shows_each_destination_and_json_for_scripts(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str
) -> None:
    await insert_events(session_factory, outbox, 2, destinations=["sink", "__main__.notify"])
    assert await OutboxRelay(session_factory, Sink(), listen=False).run_once() == 2

    code, out, err = await cli("outbox", "status", "--url", db_url)
    assert code == 0, err
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert table["destination"] == [
        "pending",
        "claimed",
        "dead",
        "abandoned",
        "delivered",
        "lag",
        "overdue",
    ]
    assert table["sink"] == ["0", "0", "0", "0", "2", "-", "-"]
    assert table["__main__.notify"][:5] == ["2", "0", "0", "0", "0"]
    assert "note: '__main__.notify' is a handler name from a script; pass name=" in out

    code, out, err = await cli("outbox", "status", "--url", db_url, "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["totals"]["pending"] == 2
    assert document["totals"]["delivered"] == 2
    by_name = {d["destination"]: d for d in document["destinations"]}
    assert set(by_name) == {"sink", "__main__.notify"}
    assert by_name["sink"]["delivered"] == 2
    assert by_name["sink"]["overdue"] is None
    assert by_name["__main__.notify"]["pending"] == 2
    assert by_name["__main__.notify"]["overdue"] >= 0
    assert document["dead"] == []


# -- commands ---------------------------------------------------------------------------------


async def test_relay_once_delivers_what_is_due_and_reports_the_counts(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str, tmp_path: Path
) -> None:
    events = await insert_events(session_factory, outbox, 5)
    [later] = await insert_events(session_factory, outbox, 1)
    d = outbox.deliveries
    async with session_factory() as session:  # a retry that is due in an hour
        await session.execute(
            update(d).where(d.c.event_id == later.id).values(next_attempt_at=database_now(3600))
        )
        await session.commit()

    sink = tmp_path / "sink"
    code, _, err = await cli(
        "relay",
        "--url",
        db_url,
        "--import",
        "tests.events.sink_handlers",
        "--once",
        env={"ALCHEMIUM_SINK": str(sink)},
    )
    assert code == 0, err
    assert err.splitlines()[-1] == (
        "relay pass done: delivered=5 retried=0 dead=0 abandoned=0 lost_leases=0"
    )
    assert sorted(sink_lines(sink)) == sorted(str(e.id) for e in events)
    rows = {r["event_id"]: r["status"] for r in await delivery_rows(engine, outbox)}
    assert rows.pop(later.id) == "pending"
    assert set(rows.values()) == {"delivered"}


async def test_version_from_the_script_and_from_python_dash_m() -> None:
    code, out, _ = await cli("--version")
    assert (code, out) == (0, f"alchemium {alchemium.__version__}\n")
    script = Path(sys.executable).parent / "alchemium"
    if script.exists():  # the console script of this environment
        done = await run(str(script), "--version")
        assert (done.returncode, done.stdout) == (0, out)


def test_every_relay_option_has_help_with_its_unit_and_is_documented() -> None:
    from alchemium.cli import _parser

    [commands] = [a for a in _parser()._actions if a.dest == "command"]
    relay = commands.choices["relay"]  # type: ignore[index]
    docs = (REPO / "docs" / "relay.md").read_text()
    units = {"DURATION": "seconds", "ROWS": "rows", "ATTEMPTS": "attempts"}
    for action in relay._actions:
        if action.dest == "help":
            continue
        option = max(action.option_strings, key=len)
        assert action.help, option
        if action.metavar in units:
            assert units[str(action.metavar)] in action.help, option
        assert f"`{option}" in docs, f"{option} is not documented in docs/relay.md"
