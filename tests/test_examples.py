"""Every ``examples/*.py`` runs as the README says (``python examples/NAME.py``) on SQLite.

New example files are picked up automatically. Each runs in a subprocess from the
repository root with the suite's interpreter and without ``DATABASE_URL``, so it uses
its embedded SQLite default, exactly as on a fresh clone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


def test_there_are_examples() -> None:
    assert any(p.name == "quickstart.py" for p in EXAMPLES)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script.relative_to(ROOT))],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, (
        f"{script.name} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
        f"\n--- stderr\n{result.stderr[-4000:]}"
    )


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
