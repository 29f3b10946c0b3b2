"""The targets of issue 15, judged on a run's report: one MET / MISSED / n/a verdict each.

Rules that keep the verdicts honest:

- A ratio target is judged on the **median of the per-round paired ratios**
  (alchemium / baseline within the same round), and the line shows their spread
  and how many rounds met the target on their own.
- A target whose workload was selected and applies to the backend, but that has
  no number for alchemium (it failed, is not available, its baseline is missing)
  is MISSED with the reason, never left out.
- ``n/a`` is only for what does not apply (W6 and the relay workloads on SQLite)
  or was not selected in this run; the line says which.
- L1 counts events that never arrived as failures: any missing event, or a load
  generator that fell short of the rate, misses the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BULK",
    "LATENCY_BUDGET_MS",
    "SINGLE_ROW",
    "Verdict",
    "evaluate",
    "evaluate_targets",
    "summary",
]

SINGLE_ROW = ("W1", "W2", "W3", "W4", "W6")
BULK = ("W5", "W7", "W8")
BULK_FLOOR = 0.8  # alchemium / core, no outbox
BULK_OUTBOX_FLOOR = 0.5  # alchemium_outbox / core
O1_SHARE = 0.75  # O1 / W1, alchemium
RELAY_FLOOR = 0.8  # alchemium / raw, same number of workers
RETENTION_FLOOR = 0.9  # drain rate with D1_SIZE delivered rows retained / empty outbox
D1_SIZE = 5_000_000
LATENCY_BUDGET_MS = 50.0
LATENCY_RATES = (50, 1000)  # L1 must be measured at these rates (events/s)
RATE_TOLERANCE = 0.95  # the load generator must reach this share of the offered rate
POSTGRES_ONLY = ("W6", "O2", "D1", "L1", "L2")
TITLES = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}


@dataclass(frozen=True)
class Verdict:
    """One target on one backend: ``status`` is MET, MISSED, n/a (or info: no target)."""

    status: str
    backend: str
    key: str
    text: str

    def line(self) -> str:
        where = f"{TITLES.get(self.backend, self.backend)} " if self.backend else ""
        return f"{self.status:<6} {where}{self.key}: {self.text}"


def _spread(stats: dict[str, Any], goal: Callable[[float], bool], *, share: bool = False) -> str:
    """``1.02x (paired median of 7 rounds, min ..., IQR ..., max ...; 5/7 rounds meet it)``."""

    def show(v: float) -> str:
        return f"{v:.0%}" if share else f"{v:.2f}x"

    values = stats.get("values") or []
    ok = sum(1 for v in values if goal(v))
    if stats.get("n", 0) < 2:
        return f"{show(stats['median'])} (1 round)"
    return (
        f"{show(stats['median'])} (paired median of {stats['n']} rounds, "
        f"min {show(stats['min'])}, IQR {show(stats['q1'])}-{show(stats['q3'])}, "
        f"max {show(stats['max'])}; {ok}/{len(values)} rounds meet it)"
    )


class _Judge:
    """Collects verdicts for one report."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        self.selected = set(report.get("selected") or _keys_in(report))
        self.backends = list(report.get("backends") or report.get("results", {}))
        self.verdicts: list[Verdict] = []

    def add(self, status: str, backend: str, key: str, text: str) -> None:
        self.verdicts.append(Verdict(status, backend, key, text))

    def skipped(self, backend: str, key: str, label: str, target: str) -> bool:
        """Adds the n/a verdict and returns True when ``key`` cannot be judged here."""
        base = key.split()[0].split("x")[0].split("@")[0]
        if base in POSTGRES_ONLY and backend != "postgresql":
            self.add("n/a", backend, label, f"PostgreSQL only ({target})")
            return True
        if base not in self.selected:
            self.add("n/a", backend, label, f"not run in this report ({target})")
            return True
        return False

    def ratio(
        self,
        backend: str,
        key: str,
        label: str,
        impl: str,
        *,
        floor: float | None = None,
        ceiling: float | None = None,
        cpu: bool = False,
        note: str = "",
    ) -> None:
        """A paired-ratio target: ``impl`` / the entry's baseline >= floor (or <= ceiling)."""
        target = f"target >= {floor:.2f}x" if floor is not None else f"target <= {ceiling:.2f}x"
        target += note
        if self.skipped(backend, key, label, target):
            return
        entry = self.report["results"].get(backend, {}).get(key)
        if entry is None:
            self.add("MISSED", backend, label, f"selected but not measured ({target})")
            return
        baseline = entry.get("baseline", "orm")
        stats = (entry.get("cpu_paired") if cpu else entry.get("paired", {})) or {}
        if impl not in stats or not stats[impl].get("n"):
            reason = entry.get("errors", {}).get(impl) or (
                f"no {baseline} baseline in this run"
                if impl in entry.get("median", {})
                else f"{impl} did not run"
            )
            self.add("MISSED", backend, label, f"{impl}: {reason} ({target})")
            return
        s = stats[impl]

        def goal(v: float) -> bool:
            return v >= floor if floor is not None else v <= (ceiling or 0.0)

        what = "client CPU per unit" if cpu else entry["unit"]
        self.add(
            "MET" if goal(s["median"]) else "MISSED",
            backend,
            label,
            f"{impl} {what} {_spread(s, goal)} of {baseline} ({target})",
        )


def _keys_in(report: dict[str, Any]) -> set[str]:
    keys = {k.split("x")[0] for res in report.get("results", {}).values() for k in res}
    keys |= {k.split("@")[0] for lat in report.get("latency", {}).values() for k in lat}
    return keys


def _single_rows(judge: _Judge, backend: str) -> None:
    for key in SINGLE_ROW:
        judge.ratio(backend, key, key, "alchemium", floor=1.0)
        judge.ratio(backend, key, f"{key} cpu", "alchemium", ceiling=1.0, cpu=True)


def _bulk(judge: _Judge, backend: str) -> None:
    for key in BULK:
        proposed = "" if key == "W5" else ", proposed"
        judge.ratio(backend, key, key, "alchemium", floor=BULK_FLOOR, note=proposed)
        judge.ratio(
            backend,
            key,
            f"{key} outbox",
            "alchemium_outbox",
            floor=BULK_OUTBOX_FLOOR,
            note=proposed,
        )


def _o1(judge: _Judge, backend: str) -> None:
    target = f"target: keeps >= {O1_SHARE:.0%} of W1"
    if judge.skipped(backend, "O1", "O1", target):
        return
    entry = judge.report["results"].get(backend, {}).get("O1")
    share = (entry or {}).get("share", {})
    if "alchemium" not in share or not share["alchemium"].get("n"):
        reason = (entry or {}).get("errors", {}).get("alchemium", "not measured")
        judge.add("MISSED", backend, "O1", f"alchemium: {reason} ({target})")
        return
    s = share["alchemium"]

    def goal(v: float) -> bool:
        return v >= O1_SHARE

    others = ", ".join(
        f"hand-written {n} outbox keeps {share[n]['median']:.0%}"
        for n in ("orm", "raw")
        if n in share and share[n].get("n")
    )
    judge.add(
        "MET" if goal(s["median"]) else "MISSED",
        backend,
        "O1",
        f"alchemium keeps {_spread(s, goal, share=True)} of its W1 throughput (O1/W1 measured "
        f"back to back); {others or 'no hand-written outbox measured'} ({target})",
    )


def _o2(judge: _Judge, backend: str) -> None:
    results = judge.report["results"].get(backend, {})
    counts = sorted(
        {int(k[3:]) for k in results if k.startswith("O2x")}
        | set(judge.report.get("sizes", {}).get("o2_relays") or (1,))
    )
    for n in counts:
        label = f"O2x{n}"
        judge.ratio(
            backend, label, label, "alchemium", floor=RELAY_FLOOR, note=f", raw loop with {n}"
        )
    four = results.get(f"O2x{max(counts)}", {}).get("median", {})
    one = results.get("O2x1", {}).get("median", {})
    if max(counts) > 1 and one.get("alchemium") and four.get("alchemium"):
        judge.add(
            "info",
            backend,
            "O2",
            f"{max(counts)} relays vs 1: alchemium {four['alchemium'] / one['alchemium']:.2f}x"
            + (
                f", raw loop {four['raw'] / one['raw']:.2f}x"
                if one.get("raw") and four.get("raw")
                else ""
            ),
        )


def _d1(judge: _Judge, backend: str) -> None:
    target = f"target >= {RETENTION_FLOOR:.2f}x the empty outbox with 5M delivered rows"
    if judge.skipped(backend, "D1", "D1", target):
        return
    entry = judge.report["results"].get(backend, {}).get("D1")
    if entry is None or "error" in entry:
        reason = (entry or {}).get("error", "not measured")
        judge.add("MISSED", backend, "D1", f"{reason} ({target})")
        return
    points = {p["size"]: p for p in entry.get("points", [])}
    curve = ", ".join(
        f"{p['label']} {p['paired']['alchemium']['median']:.2f}x"
        for p in entry.get("points", [])
        if p["paired"].get("alchemium", {}).get("n")
    )
    at = points.get(D1_SIZE)
    if at is None:
        largest = max(points, default=0)
        judge.add(
            "n/a",
            backend,
            "D1",
            f"the 5M point was not run (largest: {largest:,}; curve: {curve or 'none'}; "
            f"run --outbox-sizes 0,100k,1M,5M) ({target})",
        )
        return
    s = at["paired"].get("alchemium", {})
    if not s.get("n"):
        judge.add("MISSED", backend, "D1", f"alchemium did not drain ({target})")
        return

    def goal(v: float) -> bool:
        return v >= RETENTION_FLOOR

    judge.add(
        "MET" if goal(s["median"]) else "MISSED",
        backend,
        "D1",
        f"alchemium drains {_spread(s, goal)} as fast with 5M delivered rows as with none "
        f"(curve: {curve}) ({target})",
    )


def _latency_line(got: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "inf" if v is None else f"{v:.1f}"

    return (
        f"p50 {ms(got['p50'])} / p95 {ms(got['p95'])} / p99 {ms(got['p99'])} ms, "
        f"{got['missing']} of {got['expected']} missing, achieved {got['achieved']:,.0f}/s"
    )


def _latency(judge: _Judge, backend: str) -> None:
    found = judge.report.get("latency", {}).get(backend, {})
    rates = sorted(
        {float(k.split("@")[1]) for k in found if k.startswith("L1@")} | set(LATENCY_RATES)
    )
    for rate in rates:
        label = f"L1@{rate:g}/s"
        target = f"target p99 < {LATENCY_BUDGET_MS:.0f} ms commit-to-handler, none lost"
        if judge.skipped(backend, "L1", label, target):
            continue
        got = found.get(f"L1@{rate:g}", {}).get("alchemium")
        if got is None or "error" in got:
            reason = (got or {}).get("error", "not measured at this rate")
            judge.add("MISSED" if rate in LATENCY_RATES else "n/a", backend, label, reason)
            continue
        reached = got["achieved"] >= RATE_TOLERANCE * rate
        ok = reached and got["missing"] == 0 and (got["p99"] or 1e9) < LATENCY_BUDGET_MS
        why = "" if reached else f"; the load generator fell short of {rate:g}/s"
        hand = found.get(f"L1@{rate:g}", {}).get("orm")
        vs = f"; hand-written: {_latency_line(hand)}" if hand and "error" not in hand else ""
        judge.add(
            "MET" if ok else "MISSED",
            backend,
            label,
            f"alchemium {_latency_line(got)}{why}{vs} ({target})",
        )
    for key, entry in sorted(found.items()):
        if key.startswith("L2@") and "alchemium" in entry:
            got = entry["alchemium"]
            text = got["error"] if "error" in got else _latency_line(got)
            judge.add("info", backend, f"{key}/s", f"commit to Redis stream consumer: {text}")
    if (
        "L2" in judge.selected
        and backend == "postgresql"
        and not any(k.startswith("L2@") for k in found)
    ):
        judge.add("info", backend, "L2", "selected but not measured")


def evaluate(report: dict[str, Any]) -> list[Verdict]:
    """Every target of issue 15 for every backend of ``report``."""
    judge = _Judge(report)
    for backend in judge.backends:
        _single_rows(judge, backend)
        _bulk(judge, backend)
        _o1(judge, backend)
        _o2(judge, backend)
        _d1(judge, backend)
        _latency(judge, backend)
    return judge.verdicts


def summary(verdicts: list[Verdict]) -> str:
    """``"targets: 12 MET, 4 MISSED, 6 n/a"``."""
    counts = {s: sum(1 for v in verdicts if v.status == s) for s in ("MET", "MISSED", "n/a")}
    return "targets: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def evaluate_targets(report: dict[str, Any]) -> list[str]:
    """One line per target: MET / MISSED / n/a with the numbers, then the summary."""
    verdicts = evaluate(report)
    return [*(v.line() for v in verdicts), summary(verdicts)]
