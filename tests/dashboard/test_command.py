"""``alchemium dashboard`` as a real subprocess, and the package data the pages need.

The command keeps the CLI's contract (usage errors: exit 2, one line), binds
127.0.0.1 unless told otherwise, serves the pages and stops on SIGTERM with exit 0.
The templates and static files ship in the wheel, so an installed dashboard works
offline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events.outbox import Outbox
from tests.dashboard.conftest import TOKEN, seed
from tests.events.relay_support import REPO, stop_process
from tests.events.test_cli import assert_usage_error, cli
from tests.rig import free_port, wait_port

Factory = async_sessionmaker[AsyncSession]

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


def start_dashboard(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "alchemium", "dashboard", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@sqlite_only
async def test_dashboard_command_serves_on_loopback_and_stops_on_sigterm(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str, tmp_path: Path
) -> None:
    await seed(session_factory, outbox, dead=1, pending=2)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    proc = start_dashboard(
        "--url", db_url, "--port", str(port), "--actions", "--token-file", str(token_file)
    )
    try:
        await asyncio.to_thread(wait_port, port, 60)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            overview = await c.get("/api/overview", headers={"Authorization": f"Bearer {TOKEN}"})
            anonymous = await c.get("/api/overview")
            requeued = await c.post(
                "/api/dead/requeue",
                json={"selection": {}, "expected": 1},
                headers={"Authorization": f"Bearer {TOKEN}", "X-Alchemium-Actor": "cron"},
            )
            actions = await c.get("/api/actions", headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        code = await asyncio.to_thread(stop_process, proc)
    _, err = proc.communicate()
    assert overview.json()["totals"]["pending"] == 2
    assert anonymous.status_code == 401
    assert requeued.json()["rows"] == 1
    assert actions.json()["items"][0]["actor"] == "cron"  # the command created the table
    assert code == 0, err
    assert f"alchemium dashboard on http://127.0.0.1:{port}/ (actions enabled)" in err


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["--actions"], ["--actions needs --token-file or $ALCHEMIUM_DASHBOARD_TOKEN"]),
        (["--port", "70000"], ["argument --port", "'70000'"]),
        (["--token-file", "/nonexistent/token"], ["cannot read --token-file"]),
        (["--refresh", "soon"], ["argument --refresh", "invalid duration"]),
    ],
    ids=["actions-without-token", "port", "token-file", "refresh"],
)
@sqlite_only
async def test_dashboard_usage_errors_are_one_line(
    arguments: list[str], fragments: list[str], engine: AsyncEngine, db_url: str
) -> None:
    code, _, err = await cli("dashboard", "--url", db_url, *arguments)
    assert_usage_error(code, err, *fragments)


@sqlite_only
async def test_dashboard_without_its_extra_says_which_extra(
    engine: AsyncEngine, db_url: str
) -> None:
    without = "import sys; sys.modules['starlette'] = None; import runpy; "
    without += "runpy.run_module('alchemium', run_name='__main__')"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", without, "dashboard", "--url", db_url],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert_usage_error(done.returncode, done.stderr, "pip install 'alchemium[dashboard]'")


def test_wheel_ships_the_templates_and_static_files(tmp_path: Path) -> None:
    """Every page template and asset is package data: the wheel holds them all."""
    shipped = {
        f"alchemium/dashboard/{p.relative_to(REPO / 'alchemium' / 'dashboard')}"
        for folder in ("templates", "static")
        for p in (REPO / "alchemium" / "dashboard" / folder).iterdir()
    }
    assert "alchemium/dashboard/templates/overview.html" in shipped
    assert "alchemium/dashboard/static/dashboard.js" in shipped
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (wheel,) = tmp_path.glob("alchemium-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert shipped <= names, sorted(shipped - names)


def test_pages_reference_no_outside_asset() -> None:
    """No CDN: every src/href of the templates is the app's own (the pages work offline)."""
    templates = (REPO / "alchemium" / "dashboard" / "templates").glob("*.html")
    text = "\n".join(p.read_text(encoding="utf-8") for p in templates)
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text
    assert "//cdn" not in text
