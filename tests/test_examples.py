"""Every ``examples/*.py`` runs as the README says (``python examples/NAME.py``) on SQLite.

New example files are picked up automatically. Each runs in a subprocess from the
repository root with the suite's interpreter and without ``DATABASE_URL``, so it uses
its embedded SQLite default, exactly as on a fresh clone. ``typed_quickstart.py`` is
also checked with ``mypy --strict``, as the note after the README's quick start says.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` from the repository root, as on a fresh clone."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_there_are_examples() -> None:
    assert any(p.name == "quickstart.py" for p in EXAMPLES)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path) -> None:
    result = run_python(str(script.relative_to(ROOT)))
    assert result.returncode == 0, (
        f"{script.name} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
        f"\n--- stderr\n{result.stderr[-4000:]}"
    )


REFUSING_PUBLISHER = """
import runpy

from alchemium.events import InProcessPublisher


async def refuse(self, event, destination):
    raise ConnectionError("the relay's publisher is down")


InProcessPublisher.publish = refuse
runpy.run_path("examples/relay.py", run_name="__main__")
"""


def test_relay_example_fails_when_it_delivers_less_than_it_should() -> None:
    """With the relay's publisher refusing everything, examples/relay.py exits 1."""
    result = run_python("-c", REFUSING_PUBLISHER)
    assert result.returncode == 1, result.stdout + result.stderr
    # Only the after-commit dispatch delivered: the three welcome mails.
    assert "FAILED: 3 of 6 deliveries made" in result.stdout, result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_fastapi_example_serves_with_one_uvicorn_command(tmp_path: Path) -> None:
    port = free_port()
    env = {**clean_env(), "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'api.db'}"}
    command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app.app:app", "--port", str(port)]
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/users", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, "uvicorn exited early"
                assert time.monotonic() < deadline, "uvicorn did not start within 30s"
                time.sleep(0.2)
        created = httpx.post(f"{base}/users", json={"name": "Zoe"}, headers={"X-User": "ops"})
        assert created.status_code == 201
        assert httpx.get(f"{base}/users").json()["total"] == 1
        assert httpx.get(f"{base}/welcome-emails").json()[0]["actor"] == "ops"
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it handled.
    assert server.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output


TYPED_QUICKSTART = ROOT / "examples" / "typed_quickstart.py"
HONEST_LOOKUP = "found_user = await UserRepository.get_one("
ANNOTATED_LOOKUP = "found_user: User = await UserRepository.get_one("


@pytest.fixture(scope="module")
def mypy_on_the_typed_quickstart() -> dict[str, str]:
    """mypy --strict on the example and on a copy annotated as the quick start suggests.

    Returns each file's error lines (one mypy run for both, from the repository root so
    its configuration applies).
    """
    source = TYPED_QUICKSTART.read_text(encoding="utf-8")
    assert source.count(HONEST_LOOKUP) == 1
    # A stable path and a cache of its own: mypy's incremental cache, finding this content
    # cached under another path (an earlier run's temporary one), reports that old path.
    checkout = hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]
    annotated = (
        Path(tempfile.gettempdir()) / f"alchemium-mypy-{checkout}" / "annotated_quickstart.py"
    )
    annotated.parent.mkdir(exist_ok=True)
    annotated.write_text(source.replace(HONEST_LOOKUP, ANNOTATED_LOOKUP), encoding="utf-8")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--strict"),
            *("--cache-dir", str(annotated.parent / ".mypy_cache")),
            *(str(TYPED_QUICKSTART), str(annotated)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert "error:" in result.stdout or result.returncode == 0, result.stdout + result.stderr
    errors: dict[Path, list[str]] = {TYPED_QUICKSTART: [], annotated: []}
    for line in result.stdout.splitlines():
        if ": error:" in line:  # "path:line: error: ...", path as mypy prints it
            errors[(ROOT / line.split(":", 1)[0]).resolve()].append(line)
    return {"typed": "\n".join(errors[TYPED_QUICKSTART]), "annotated": "\n".join(errors[annotated])}


def test_typed_quickstart_passes_mypy_strict(mypy_on_the_typed_quickstart: dict[str, str]) -> None:
    assert mypy_on_the_typed_quickstart["typed"] == ""


def test_annotating_get_one_as_the_model_fails_mypy_strict(
    mypy_on_the_typed_quickstart: dict[str, str],
) -> None:
    """Why the README's note exists: ``get_one`` returns ``User | None``."""
    errors = mypy_on_the_typed_quickstart["annotated"]
    assert '"User | None"' in errors, errors
    assert "[assignment]" in errors, errors
