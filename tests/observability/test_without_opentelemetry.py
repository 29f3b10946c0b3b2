"""Without ``opentelemetry-api`` everything works, and trace context still crosses the outbox.

This environment has the API (FastAPI depends on it), so the check runs in a
subprocess where ``import opentelemetry`` fails (``tests/observability/without_api.py``).
"""

from __future__ import annotations

from pathlib import Path

from tests.events.relay_support import run_cli


def test_units_of_work_dispatch_and_relay_run_without_the_api(tmp_path: Path) -> None:
    done = run_cli(str(tmp_path / "app.db"), module="tests.observability.without_api")
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
