"""The tracing benchmark and the trace picture still run (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("advanced_alchemy", reason="the bench extra is not installed")

from bench import trace_picture
from bench.tracing import main

SPANS = Path(__file__).resolve().parents[1] / "docs" / "observability-trace.jsonl"


def test_quick_tracing_run_on_sqlite_writes_paired_ratios_and_docs(tmp_path: Path) -> None:
    docs = tmp_path / "performance.md"
    docs.write_text("# Performance\n")
    code = main(["--quick", "--backends", "sqlite", "--out", str(tmp_path), "--docs", str(docs)])
    assert code == 0

    (result,) = tmp_path.glob("tracing-quick-*.json")
    report = json.loads(result.read_text())
    for key in ("W1", "O1"):
        entry = report["results"]["sqlite"][key]
        assert {m: len(s) for m, s in entry["rates"].items()} == {"off": 3, "api": 3, "sdk": 3}
    assert "| sqlite | O1 |" in docs.read_text()


def test_the_trace_picture_is_drawn_from_exported_spans(tmp_path: Path) -> None:
    out = tmp_path / "trace.png"
    assert trace_picture.main([str(SPANS), str(out)]) == 0
    assert out.stat().st_size > 10_000
