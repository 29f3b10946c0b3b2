"""The test rig itself: the processes it starts run this checkout; missing servers fail in CI.

``scripts/mutations.py`` runs tests on mutated copies of the repository, with
``PYTHONPATH`` pointing at the copy: every process a test starts (relays, crash
writers, examples) must import the copy, not the installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import alchemium
from tests.events.relay_support import REPO, subprocess_env

WHERE = "import alchemium; print(alchemium.__file__)"


def imported_from(env: dict[str, str]) -> Path:
    """The alchemium a new Python process started with ``env`` imports."""
    done = subprocess.run(
        [sys.executable, "-c", WHERE], env=env, capture_output=True, text=True, check=True
    )
    return Path(done.stdout.strip()).resolve()


def test_the_suite_and_the_processes_it_starts_import_this_checkout() -> None:
    assert Path(alchemium.__file__).resolve().is_relative_to(REPO)
    assert imported_from(subprocess_env()).is_relative_to(REPO)  # relays, crash writers
    assert imported_from(dict(os.environ)).is_relative_to(REPO)  # examples


NEEDS_REDIS = """
from tests.conftest import skip_without_server


def test_needs_redis():
    skip_without_server("Redis", "redis-server is not installed")
"""

DROPS_AN_EXCEPTION = """
import asyncio
import gc


async def test_passes_but_drops_an_exception():
    future = asyncio.get_running_loop().create_future()
    future.set_exception(ConnectionError("unexpected connection_lost() call"))
    del future
    gc.collect()
"""


@pytest.fixture(scope="module")
def run_under_ci(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str]:
    """Both files above run with this suite's conftest as a plugin and ``CI`` set.

    Returns the exit code and the output (one pytest process for both: each costs seconds).
    """
    here = tmp_path_factory.mktemp("hooks")
    (here / "test_needs.py").write_text(NEEDS_REDIS)
    (here / "test_drops.py").write_text(DROPS_AN_EXCEPTION)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"),
            *("-c", str(REPO / "pyproject.toml"), "--rootdir", str(here), "-ra", str(here)),
        ],
        cwd=REPO,
        env={**subprocess_env(), "CI": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_under_ci_a_missing_rig_server_fails_the_test_with_its_reason(
    run_under_ci: tuple[int, str],
) -> None:
    code, output = run_under_ci
    assert code == pytest.ExitCode.TESTS_FAILED, output
    assert "test_needs.py::test_needs_redis - CI is set" in output, output
    assert "Redis: redis-server is not installed" in output, output


def test_an_asyncio_exception_nobody_retrieved_fails_the_run(
    run_under_ci: tuple[int, str],
) -> None:
    code, output = run_under_ci
    assert code == pytest.ExitCode.TESTS_FAILED, output
    assert "1 passed" in output, output  # the test itself passed: the session fails
    assert "asyncio exceptions never retrieved" in output, output
    assert "Future exception was never retrieved" in output, output
