"""examples/events.py runs with no setup and shows what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_events_example_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "events.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=120,
    ).stdout
    assert "welcome mail to Alice (user id 1)" in out
    assert "position 'Dev' -> 'Lead'" in out
    assert "user_created  -> send_welcome              delivered" in out
    assert "Bob" not in out.split("4. the outbox")[1]
    history = out.split("audit history")[1].splitlines()[1:]
    assert "updated  by hr-bot" in history[0]
    assert "created  by admin" in history[1]
