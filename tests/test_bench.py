"""The benchmark harness still runs: ``--quick`` on SQLite, two workloads, no timing asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("advanced_alchemy", reason="the bench extra is not installed")

from bench.run import main


def test_quick_run_on_sqlite_writes_results_and_docs(tmp_path: Path) -> None:
    docs = tmp_path / "performance.md"
    code = main(
        [
            "--quick",
            "--backends",
            "sqlite",
            "--workloads",
            "W1,W3",
            "--out",
            str(tmp_path / "results"),
            "--docs",
            str(docs),
        ]
    )

    assert code == 0
    report = json.loads((tmp_path / "results" / "latest-quick.json").read_text())
    measured = report["results"]["sqlite"]
    assert set(measured) == {"W1", "W3"}
    for entry in measured.values():
        assert set(entry["median"]) == {"raw", "orm", "advanced_alchemy", "alchemium"}
        assert all(len(s) == 2 for s in entry["samples"].values())
        assert entry["ratio_to_orm"]["orm"] == pytest.approx(1.0)
    text = docs.read_text()
    assert "| W1 " in text
    assert (tmp_path / "performance.png").stat().st_size > 0


def test_unknown_workload_is_refused(tmp_path: Path) -> None:
    assert main(["--quick", "--workloads", "W9", "--no-docs", "--out", str(tmp_path)]) == 2
