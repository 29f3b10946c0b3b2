"""The documentation: ``mkdocs build --strict`` passes and every runnable block runs.

A code block is runnable when the line before its ```` ```python ```` fence is
``<!-- runnable -->``. Each such block is a complete program (its own imports, an
in-memory SQLite database or a temporary file) and runs in its own interpreter, so
blocks cannot lean on each other or on state left behind by the test suite. It runs
twice in the same directory, as a reader trying it again would.

Other tests check what the pages state without a runnable block: the unit of work
options they list, the pytest set-up of testing.md, the FastAPI misuse fastapi.md
warns about, and that the package builds without deprecation warnings.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from alchemium import UnitOfWork
from tests.rig import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = "<!-- runnable -->"
BLOCK = re.compile(r"^<!-- runnable -->\n```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def runnable_blocks() -> list[tuple[str, str]]:
    """``(page:line, code)`` for every runnable block in docs/."""
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{page.relative_to(DOCS)}:{line}", match.group(1)))
    return blocks


BLOCKS = runnable_blocks()


def test_every_runnable_marker_is_followed_by_a_python_block() -> None:
    markers = sum(p.read_text(encoding="utf-8").count(MARKER) for p in DOCS.rglob("*.md"))
    assert markers == len(BLOCKS), "a <!-- runnable --> marker is not right before ```python"
    assert len(BLOCKS) >= 5


def run_block(code: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """Run one block as ``python block.py`` in ``directory``, as a reader would."""
    script = directory / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", str(script)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_runnable_block_runs_twice_in_one_directory(where: str, code: str, tmp_path: Path) -> None:
    """A reader runs an example again: files left by the first run must not break the second."""
    for attempt in ("first", "second"):
        result = run_block(code, tmp_path)
        assert result.returncode == 0, (
            f"{where} failed on its {attempt} run in {tmp_path}:\n{result.stdout}\n{result.stderr}"
        )


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    command = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    result = subprocess.run(
        [*command, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "api" / "index.html").exists()


def fenced_blocks(page: str, language: str) -> list[str]:
    """The bodies of the ```` ```language ```` blocks of ``docs/page``, in page order."""
    text_ = (DOCS / page).read_text(encoding="utf-8")
    pattern = re.compile(rf"^```{language}\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    return pattern.findall(text_)


def page_section(page: str, heading: str) -> str:
    """The text of ``docs/page`` from ``## heading`` to the next ``## `` heading."""
    text_ = (DOCS / page).read_text(encoding="utf-8")
    start = text_.index(f"\n## {heading}\n")
    end = text_.find("\n## ", start + 1)
    return text_[start : end if end != -1 else None]


def test_transactions_page_lists_every_unit_of_work_option() -> None:
    options = [
        name
        for name, parameter in inspect.signature(UnitOfWork).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    section = page_section("transactions.md", "Options")
    assert "tenant_setting" in options
    for name in options:
        assert f"{name}=" in section, f"the signature on transactions.md lacks {name}="
        assert f"\n- `{name}` —" in section, f"transactions.md has no bullet for `{name}`"


def test_alembic_page_says_to_install_alembic_which_alchemium_does_not_require() -> None:
    requirements = importlib.metadata.requires("alchemium") or []
    runtime = [r for r in requirements if "extra ==" not in r]
    assert not [r for r in runtime if r.lower().startswith("alembic")]
    assert "pip install alembic" in fenced_blocks("alembic.md", "bash")[0].splitlines()


@pytest.fixture(params=["sqlite", "postgresql"])
async def testing_page_database(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[str | None]:
    """None (the page's default, in-memory SQLite) or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    name = f"docs_testing_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(server.url("postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield server.url(name)
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


def test_testing_page_pytest_setup_runs_its_example(
    testing_page_database: str | None, tmp_path: Path
) -> None:
    """The pyproject snippet and the test module of testing.md, as a project of their own.

    On PostgreSQL the session-scoped engine only works because the page's loop scopes
    put fixtures and tests on one event loop; without ``asyncio_mode = "auto"`` the
    async tests do not run at all.
    """
    (config,) = [b for b in fenced_blocks("testing.md", "toml") if "asyncio_mode" in b]
    (module,) = [b for b in fenced_blocks("testing.md", "python") if b.startswith("# test_")]
    (tmp_path / "pyproject.toml").write_text(config, encoding="utf-8")
    (tmp_path / "test_signup.py").write_text(module, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONPATH"] = str(ROOT)
    if testing_page_database is not None:
        env["DATABASE_URL"] = testing_page_database
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout, result.stdout[-4000:]


def test_fastapi_page_wrong_form_fails_when_the_route_is_defined() -> None:
    """fastapi.md: ``Depends(request_unit_of_work(...))`` raises at ``@app.post``."""
    pytest.importorskip("fastapi")
    from fastapi import Depends, FastAPI

    from alchemium.integrations.fastapi import request_unit_of_work

    session_factory = async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))
    app = FastAPI()
    wrong = Depends(request_unit_of_work(session_factory))
    with pytest.raises(TypeError, match="is not a callable object"):

        @app.post("/users")
        async def create_user(uow: UnitOfWork = wrong) -> None:
            pass

    async def create_member(uow: UnitOfWork) -> None:
        pass

    # Set at runtime: this module's annotations are strings FastAPI resolves in its globals.
    create_member.__annotations__["uow"] = Annotated[UnitOfWork, wrong]
    with pytest.raises(TypeError, match="is not a callable object"):
        app.post("/members")(create_member)


def test_package_builds_without_deprecation_warnings(tmp_path: Path) -> None:
    """pyproject.toml: SPDX ``license = "MIT"`` on a setuptools that knows it (PEP 639).

    The table form (``license = { text = "MIT" }``) makes setuptools >= 77 print a
    ``SetuptoolsDeprecationWarning`` on every build and install.
    """
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    deprecations = [line for line in output.splitlines() if "deprecat" in line.lower()]
    assert deprecations == [], "\n".join(deprecations)
    (wheel,) = tmp_path.glob("alchemium-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        headers = archive.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: MIT" in headers
