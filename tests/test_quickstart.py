"""The README quick start (examples/quickstart.py) runs as written on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.rig import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.py"
SEED = ROOT / "examples" / "quickstart"


def run_quickstart(database_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, str(QUICKSTART)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'quickstart.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    url = server.url("postgres")
    # Other tests leave their tables (with foreign keys to "users") in this database.
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        await conn.execute(text("CREATE SCHEMA public"))
    await engine.dispose()
    return url


async def test_quickstart_runs_verbatim(database_url: str, tmp_path: Path) -> None:
    result = run_quickstart(database_url, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "Created user with id: 1" in lines
    assert "Found user: Alice" in lines
    assert lines[-1] == "quick start finished: created, found, updated and deleted Alice"
    # the demo echoes its SQL: the update and the delete really reached the database
    log = result.stdout + result.stderr
    assert "UPDATE users SET position" in log
    assert "DELETE FROM users" in log


async def test_quickstart_can_run_twice(database_url: str, tmp_path: Path) -> None:
    """It recreates its tables, so a second run on the same database starts from id 1."""
    assert run_quickstart(database_url, tmp_path).returncode == 0
    again = run_quickstart(database_url, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Created user with id: 1" in again.stdout.splitlines()


def code_lines(code: str) -> list[str]:
    """Lines that carry code: trailing blanks, tabs and the files' step headers aside."""
    lines = [line.rstrip().replace("\t", "    ") for line in code.splitlines()]
    return [line for line in lines if line and not line.startswith("# Step")]


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_the_quick_start_shown_is_the_one_that_runs(page: str) -> None:
    """Steps 1-4 on the page are examples/quickstart/, which the tests above run.

    Notes may follow the quick start; its own code stays the seed's, verbatim except
    for step 1's DATABASE_URL line (the runnable copy reads it from the environment).
    """
    text = (ROOT / page).read_text(encoding="utf-8")
    steps = text[text.index("### Step 1") : text.index("### Step 4")]
    steps += text[text.index("### Step 4") :].split("\n### ", 1)[0].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", steps, re.MULTILINE | re.DOTALL)
    step1, step2, create_tables, step3, step4 = blocks
    assert "Base.metadata.create_all" in create_tables

    def unlike_the_url(lines: list[str]) -> list[str]:
        return [line for line in lines if not line.startswith(("DATABASE_URL =", "import os"))]

    database = code_lines((SEED / "database.py").read_text(encoding="utf-8"))
    assert unlike_the_url(code_lines(step1)) == unlike_the_url(database)
    models = code_lines((SEED / "models.py").read_text(encoding="utf-8"))
    assert code_lines(step2) + code_lines(step3) == models
    assert code_lines(step4) == code_lines((SEED / "main.py").read_text(encoding="utf-8"))
