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


def run_with_the_suite_hooks(test_file: Path, *, ci: bool) -> tuple[int, str]:
    """Run ``test_file`` with this suite's conftest as a plugin: (exit code, output)."""
    env = {k: v for k, v in subprocess_env().items() if k != "CI"}
    if ci:
        env["CI"] = "1"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"),
            *("-c", str(REPO / "pyproject.toml"), "--rootdir", str(test_file.parent), "-rs"),
            str(test_file),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("ci", [False, True], ids=["local", "ci"])
def test_a_missing_rig_server_skips_with_its_reason_and_fails_in_ci(
    tmp_path: Path, ci: bool
) -> None:
    (tmp_path / "test_needs.py").write_text(NEEDS_REDIS)
    code, output = run_with_the_suite_hooks(tmp_path / "test_needs.py", ci=ci)
    assert "Redis: redis-server is not installed" in output, output
    if ci:
        assert code == pytest.ExitCode.TESTS_FAILED, output
        assert "1 failed" in output, output
    else:
        assert code == pytest.ExitCode.OK, output
        assert "1 skipped" in output, output


DROPS_AN_EXCEPTION = """
import asyncio
import gc


async def test_passes_but_drops_an_exception():
    future = asyncio.get_running_loop().create_future()
    future.set_exception(ConnectionError("unexpected connection_lost() call"))
    del future
    gc.collect()
"""


def test_an_asyncio_exception_nobody_retrieved_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_drops.py").write_text(DROPS_AN_EXCEPTION)
    code, output = run_with_the_suite_hooks(tmp_path / "test_drops.py", ci=False)
    assert code == pytest.ExitCode.TESTS_FAILED, output
    assert "1 passed" in output, output
    assert "asyncio exceptions never retrieved" in output, output
    assert "Future exception was never retrieved" in output, output
