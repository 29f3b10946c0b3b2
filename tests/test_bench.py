"""The benchmark harness runs and reports honestly; no timing is asserted.

Two short runs (SQLite: single-row, bulk and outbox workloads; PostgreSQL: the
relay, outbox-size and latency workloads at tiny sizes) check that the harness
measures and writes its report; the rest checks the verdicts of
``bench/targets.py`` on synthetic results.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("advanced_alchemy", reason="the bench extra is not installed")

from bench.run import main, make_entry, parse_count
from bench.stats import latency_summary, paired, rotated
from bench.targets import Verdict, evaluate, evaluate_targets

IMPLS = {"raw", "core", "orm", "advanced_alchemy", "alchemium", "alchemium_outbox"}


def test_quick_run_on_sqlite_writes_results_and_docs(tmp_path: Path) -> None:
    docs = tmp_path / "performance.md"
    code = main(
        [
            "--quick",
            "--backends",
            "sqlite",
            "--workloads",
            "W1,W7,O1",
            "--out",
            str(tmp_path / "results"),
            "--docs",
            str(docs),
        ]
    )

    assert code == 0
    report = json.loads((tmp_path / "results" / "latest-quick.json").read_text())
    measured = report["results"]["sqlite"]
    assert set(measured) == {"W1", "W7", "O1"}
    assert set(measured["W1"]["median"]) == {"raw", "orm", "advanced_alchemy", "alchemium"}
    assert set(measured["W7"]["median"]) == {"raw", "core", "orm", "alchemium", "alchemium_outbox"}
    for entry in measured.values():
        assert entry["errors"] == {}
        assert all(len(s) == 2 for s in entry["samples"].values())
        baseline = entry["baseline"]
        assert entry["paired"][baseline]["median"] == pytest.approx(1.0)
        assert entry["paired"]["alchemium"]["n"] == 2
    assert measured["W7"]["baseline"] == "core"
    assert measured["O1"]["share"]["alchemium"]["n"] == 2  # O1 / W1, paired per round
    text = docs.read_text()
    assert "| W7 " in text
    assert "n/a    SQLite W6: PostgreSQL only" in text
    assert (tmp_path / "performance.png").stat().st_size > 0


@pytest.mark.skipif(
    os.environ.get("ALCHEMIUM_TEST_POSTGRES_URL") is not None,
    reason="the bench resets the schema of the server it is given",
)
def test_quick_relay_workloads_on_postgresql_report_every_event(tmp_path: Path) -> None:
    pytest.importorskip("redis", reason="L2 needs redis-py (the redis extra)")
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.skip("redis-server is not installed")
    code = main(
        [
            "--quick",
            "--reps",
            "1",
            "--backends",
            "postgresql",
            "--workloads",
            "O2,D1,L1,L2",
            "--relays",
            "1",
            "--outbox-sizes",
            "0,2k",
            "--rates",
            "100",
            "--out",
            str(tmp_path / "results"),
            "--docs",
            str(tmp_path / "performance.md"),
        ]
    )

    assert code == 0
    report = json.loads((tmp_path / "results" / "latest-quick.json").read_text())
    measured = report["results"]["postgresql"]
    assert set(measured["O2x1"]["median"]) == {"raw", "orm", "alchemium"}
    assert [p["size"] for p in measured["D1"]["points"]] == [2000]
    assert measured["D1"]["points"][0]["paired"]["alchemium"]["n"] == 1
    latency = report["latency"]["postgresql"]
    for key, impls in (("L1@100", {"orm", "alchemium"}), ("L2@100", {"alchemium"})):
        assert set(latency[key]) == impls
        for got in latency[key].values():
            assert "error" not in got
            assert got["missing"] == 0
            assert got["n"] == got["expected"] == 100
    assert (tmp_path / "performance-outbox-size.png").stat().st_size > 0


def test_unknown_workload_is_refused(tmp_path: Path) -> None:
    assert main(["--quick", "--workloads", "W9", "--no-docs", "--out", str(tmp_path)]) == 2


def test_counts_accept_k_and_m_suffixes() -> None:
    assert [parse_count(t) for t in ("0", "100k", "1M", "5m", "2_500")] == [
        0,
        100_000,
        1_000_000,
        5_000_000,
        2500,
    ]


def test_every_implementation_starts_a_round_in_turn() -> None:
    assert [rotated(["a", "b", "c"], r)[0] for r in range(4)] == ["a", "b", "c", "a"]


# -- verdicts on synthetic reports ------------------------------------------------------------


def _report(
    results: dict[str, dict[str, Any]],
    *,
    selected: set[str],
    latency: dict[str, Any] | None = None,
    backends: tuple[str, ...] = ("postgresql", "sqlite"),
) -> dict[str, Any]:
    return {
        "selected": sorted(selected),
        "backends": list(backends),
        "sizes": {"o2_relays": [1, 4]},
        "results": {b: results.get(b, {}) for b in backends},
        "latency": latency or {},
    }


def _crud(
    alchemium: list[float], orm: list[float], *, errors: dict[str, str] | None = None
) -> dict[str, Any]:
    samples = {"orm": orm, "alchemium": alchemium}
    cpu = {"orm": [100.0] * len(orm), "alchemium": [99.0] * len(alchemium)}
    if errors:
        samples.pop("alchemium")
        cpu.pop("alchemium")
    return make_entry("t", "ops/s", "orm", samples, cpu, errors)


def _verdict(report: dict[str, Any], backend: str, key: str) -> Verdict:
    return next(v for v in evaluate(report) if v.backend == backend and v.key == key)


def test_targets_are_judged_on_paired_ratios_not_on_separate_medians() -> None:
    # Separate medians: 180 / 200 = 0.90x. Round by round alchemium was ahead twice.
    entry = _crud(alchemium=[110.0, 180.0, 220.0], orm=[100.0, 300.0, 200.0])
    report = _report({"postgresql": {"W1": entry}}, selected={"W1"})

    verdict = _verdict(report, "postgresql", "W1")

    assert verdict.status == "MET"
    assert "1.10x" in verdict.text
    assert "2/3 rounds meet it" in verdict.text
    assert "min 0.60x" in verdict.text


def test_client_cpu_is_a_target_of_its_own() -> None:
    entry = _crud(alchemium=[100.0, 100.0], orm=[100.0, 100.0])
    entry = make_entry(
        "t",
        "ops/s",
        "orm",
        entry["samples"],
        {"orm": [100.0, 100.0], "alchemium": [103.0, 104.0]},
    )
    report = _report({"sqlite": {"W4": entry}}, selected={"W4"}, backends=("sqlite",))

    assert _verdict(report, "sqlite", "W4").status == "MET"
    assert _verdict(report, "sqlite", "W4 cpu").status == "MISSED"


def test_w6_is_never_claimed_on_sqlite() -> None:
    entry = _crud(alchemium=[200.0, 200.0], orm=[100.0, 100.0])
    report = _report({"postgresql": {"W6": entry}, "sqlite": {"W6": entry}}, selected={"W6"})

    assert _verdict(report, "postgresql", "W6").status == "MET"
    assert _verdict(report, "sqlite", "W6").status == "n/a"
    assert "PostgreSQL only" in _verdict(report, "sqlite", "W6").text


def test_a_workload_alchemium_failed_is_missed_with_the_reason() -> None:
    entry = _crud([], [100.0, 100.0], errors={"alchemium": "RuntimeError: boom"})
    report = _report({"postgresql": {"W2": entry}}, selected={"W2"}, backends=("postgresql",))

    verdict = _verdict(report, "postgresql", "W2")

    assert verdict.status == "MISSED"
    assert "RuntimeError: boom" in verdict.text


def test_a_selected_workload_without_results_is_missed_and_an_unselected_one_is_na() -> None:
    report = _report({}, selected={"W3"}, backends=("postgresql",))

    assert _verdict(report, "postgresql", "W3").status == "MISSED"
    assert _verdict(report, "postgresql", "W2").status == "n/a"
    assert "not run" in _verdict(report, "postgresql", "W2").text


def test_bulk_workloads_are_judged_against_core_with_and_without_the_outbox() -> None:
    samples = {
        "core": [1000.0, 1000.0],
        "orm": [300.0, 300.0],
        "alchemium": [850.0, 820.0],
        "alchemium_outbox": [400.0, 440.0],
    }
    entry = make_entry("bulk", "rows/s", "core", samples)
    report = _report({"sqlite": {"W5": entry}}, selected={"W5"}, backends=("sqlite",))

    assert _verdict(report, "sqlite", "W5").status == "MET"
    outbox = _verdict(report, "sqlite", "W5 outbox")
    assert outbox.status == "MISSED"
    assert "0.42x" in outbox.text
    assert "of core" in outbox.text


def test_o1_share_is_paired_with_w1_of_the_same_round() -> None:
    entry = _crud(alchemium=[80.0, 70.0], orm=[60.0, 60.0])
    entry["share"] = {
        "alchemium": paired([80.0, 70.0], [100.0, 100.0]),
        "orm": paired([60.0, 60.0], [120.0, 120.0]),
    }
    report = _report({"postgresql": {"O1": entry}}, selected={"O1"}, backends=("postgresql",))

    verdict = _verdict(report, "postgresql", "O1")

    assert verdict.status == "MET"
    assert "keeps 75%" in verdict.text
    assert "hand-written orm outbox keeps 50%" in verdict.text


def test_each_relay_count_is_compared_with_the_raw_loop_of_the_same_count() -> None:
    results = {
        "O2x1": make_entry("d", "events/s", "raw", {"raw": [100.0], "alchemium": [85.0]}),
        "O2x4": make_entry("d", "events/s", "raw", {"raw": [300.0], "alchemium": [200.0]}),
    }
    report = _report({"postgresql": results}, selected={"O2"}, backends=("postgresql",))

    assert _verdict(report, "postgresql", "O2x1").status == "MET"
    assert _verdict(report, "postgresql", "O2x4").status == "MISSED"


def _d1(sizes: dict[int, list[float]]) -> dict[str, Any]:
    points = []
    for size, rates in sizes.items():
        points.append(
            {
                "size": size,
                "label": f"{size:,}",
                "median": {"alchemium": rates[0]},
                "paired": {"alchemium": paired(rates, [100.0] * len(rates))},
            }
        )
    return {"points": points, "empty": {"median": {"alchemium": 100.0}}}


def test_outbox_size_target_needs_the_5m_point() -> None:
    without = _report(
        {"postgresql": {"D1": _d1({1_000_000: [95.0, 96.0]})}},
        selected={"D1"},
        backends=("postgresql",),
    )
    with_5m = _report(
        {"postgresql": {"D1": _d1({1_000_000: [95.0], 5_000_000: [91.0, 88.0, 93.0]})}},
        selected={"D1"},
        backends=("postgresql",),
    )

    assert _verdict(without, "postgresql", "D1").status == "n/a"
    assert "5M point was not run" in _verdict(without, "postgresql", "D1").text
    assert _verdict(with_5m, "postgresql", "D1").status == "MET"


def _latency(missing: int = 0, p99: float = 10.0, achieved: float = 1000.0) -> dict[str, Any]:
    return {
        "p50": 2.0,
        "p95": 5.0,
        "p99": p99,
        "max": 20.0,
        "n": 1000 - missing,
        "expected": 1000,
        "missing": missing,
        "achieved": achieved,
        "duplicates": 0,
    }


@pytest.mark.parametrize(
    ("got", "status"),
    [
        (_latency(), "MET"),
        (_latency(missing=3), "MISSED"),  # lost events fail it even with a low p99
        (_latency(p99=60.0), "MISSED"),
        (_latency(achieved=700.0), "MISSED"),  # the load never reached 1,000/s
    ],
)
def test_l1_at_1000_per_second(got: dict[str, Any], status: str) -> None:
    latency = {"postgresql": {"L1@50": {"alchemium": _latency()}, "L1@1000": {"alchemium": got}}}
    report = _report({}, selected={"L1"}, latency=latency, backends=("postgresql",))

    assert _verdict(report, "postgresql", "L1@1000/s").status == status
    assert _verdict(report, "postgresql", "L1@50/s").status == "MET"


def test_l1_not_measured_at_1000_per_second_is_missed() -> None:
    latency = {"postgresql": {"L1@50": {"alchemium": _latency()}}}
    report = _report({}, selected={"L1"}, latency=latency, backends=("postgresql",))

    assert _verdict(report, "postgresql", "L1@1000/s").status == "MISSED"


def test_missing_events_count_as_infinitely_late() -> None:
    summary = latency_summary([0.001] * 97, expected=100)

    assert summary["missing"] == 3
    assert summary["p50"] == pytest.approx(1.0)
    assert summary["p99"] is None
    assert latency_summary([0.001] * 100, expected=100)["p99"] == pytest.approx(1.0)


def test_summary_line_counts_every_verdict() -> None:
    report = _report({}, selected=set(), backends=("sqlite",))

    lines = evaluate_targets(report)

    assert lines[-1].startswith("targets: 0 MET, 0 MISSED, ")
    assert all(line.startswith("n/a") for line in lines[:-1])


def test_partition_comparison_removes_and_drains_every_row() -> None:
    """P1 (python -m bench.partitions) at a tiny size: it runs and checks its own counts."""
    import asyncio

    from bench.env import postgres_url
    from bench.partitions import measure

    lines: list[str] = []
    with postgres_url() as url:
        result = asyncio.run(measure(url, 2000, 1, lines.append))
    assert result["rows"] == 2000
    assert result["removal_ratio"]["n"] == 1
    assert result["drain"]["partitioned"]["median"] > 0
    assert len(lines) == 4  # removal with a drain, and a drain alone; each outbox, one round
