"""``python -m bench.dashboard`` still runs (a small outbox; the 1,000,000-row figures are in
docs/dashboard.md). Nothing about time is asserted."""

from __future__ import annotations

import pytest

from bench.dashboard import measure

postgres_only = pytest.mark.parametrize("backend", ["postgresql"])


@postgres_only
async def test_bench_fills_an_outbox_and_times_every_measure(db_url: str) -> None:
    results = await measure(db_url, rows=2_000, repeat=1)
    assert set(results) == {
        "overview page (GET /)",
        "overview JSON (GET /api/overview)",
        "counts (estimated delivered)",
        "throughput chart (60 minutes)",
        "exact counts (full scan, not used)",
    }
    assert all(ms > 0 for ms in results.values())
