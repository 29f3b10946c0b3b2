"""Turning a run into output: the console tables, the JSON file, the docs section and charts.

Which targets are met is decided in bench/targets.py; this module only shows it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.targets import evaluate_targets

__all__ = ["environment", "evaluate_targets", "print_tables", "write_docs", "write_json"]

IMPLS = ("raw", "core", "orm", "advanced_alchemy", "alchemium", "alchemium_outbox")
CLIP = 1.6  # y-axis limit of the ratio chart
START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"
BACKEND_TITLES = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}
CHART = "performance.png"
SIZE_CHART = "performance-outbox-size.png"
COLORS = {
    "raw": "#9e9e9e",
    "core": "#8172b3",
    "orm": "#4c72b0",
    "advanced_alchemy": "#dd8452",
    "alchemium": "#55a868",
    "alchemium_outbox": "#a6d49f",
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """Machine, load and library versions (database versions are added by the runner)."""
    return {
        "machine": f"{os.cpu_count()} cores, {_cpu_model()}, {platform.system()} "
        f"{platform.release()}",
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "versions": {
            dist: _version(dist)
            for dist in (
                "alchemium",
                "SQLAlchemy",
                "advanced-alchemy",
                "asyncpg",
                "aiosqlite",
                "greenlet",
                "redis",
            )
        },
    }


def write_json(report: dict[str, Any], out: Path) -> Path:
    """Write ``report`` to ``out/<mode>-<timestamp>.json`` and ``out/latest-<mode>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"{report['mode']}-{stamp}.json"
    text = json.dumps(report, indent=2, default=str)
    path.write_text(text)
    (out / f"latest-{report['mode']}.json").write_text(text)
    return path


# -- cells ------------------------------------------------------------------------------------


def _ratio(stats: dict[str, Any] | None, digits: int = 2) -> str:
    """``1.02x [0.95-1.08]``: paired median and min-max over the rounds."""
    if not stats or not stats.get("n"):
        return ""
    if stats["n"] < 2:
        return f"{stats['median']:.{digits}f}x"
    return f"{stats['median']:.{digits}f}x [{stats['min']:.{digits}f}-{stats['max']:.{digits}f}]"


def _cell(entry: dict[str, Any], impl: str) -> str:
    if impl in entry.get("errors", {}):
        return "failed"
    median = entry.get("median", {}).get(impl)
    if median is None:
        return "—"
    ratio = _ratio(entry.get("paired", {}).get(impl))
    return f"{median:,.0f} ({ratio})" if ratio else f"{median:,.0f}"


def _cpu_cell(entry: dict[str, Any], impl: str) -> str:
    us = entry.get("cpu_us", {}).get(impl)
    if us is None:
        return "—"
    ratio = _ratio(entry.get("cpu_paired", {}).get(impl), 3)
    return f"{us:,.1f} ({ratio})" if ratio else f"{us:,.1f}"


def _throughput(report: dict[str, Any], backend: str) -> list[tuple[str, dict[str, Any]]]:
    return [(k, e) for k, e in report["results"].get(backend, {}).items() if "median" in e]


def _ms(value: float | None) -> str:
    return "lost" if value is None else f"{value:.1f}"


def _latency_rows(report: dict[str, Any], backend: str) -> list[list[str]]:
    rows = []
    for key, entry in report.get("latency", {}).get(backend, {}).items():
        for impl, got in entry.items():
            if "error" in got:
                rows.append([key, impl, "failed: " + got["error"], "", "", "", "", "", ""])
                continue
            rows.append(
                [
                    key,
                    impl,
                    f"{got['achieved']:,.0f}",
                    _ms(got["p50"]),
                    _ms(got["p95"]),
                    _ms(got["p99"]),
                    _ms(got["max"]),
                    f"{got['missing']} / {got['expected']}",
                    str(got["duplicates"]),
                ]
            )
    return rows


LATENCY_HEADER = [
    "run",
    "impl",
    "achieved/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "missing",
    "dup",
]


def _d1_rows(entry: dict[str, Any]) -> list[list[str]]:
    names = list(entry.get("empty", {}).get("median", {}))
    rows = [["0", *(f"{entry['empty']['median'][n] or math.nan:,.0f}" for n in names)]]
    for point in entry.get("points", []):
        cells = []
        for n in names:
            median = point["median"].get(n)
            cells.append(
                "—" if median is None else f"{median:,.0f} ({_ratio(point['paired'].get(n))})"
            )
        rows.append([point["label"], *cells])
    return [["delivered rows", *names], *rows]


# -- console ----------------------------------------------------------------------------------


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    if not rows:
        return
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    print(f"\n{title}")
    for row in [header, *rows]:
        print(
            "  ".join(
                cell.rjust(w) if c else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def _impls(report: dict[str, Any]) -> list[str]:
    return [i for i in IMPLS if i in (report.get("impls") or IMPLS)]


def print_tables(report: dict[str, Any]) -> None:
    """Medians with the paired ratio to each baseline, CPU, D1, latency, then the targets."""
    impls = _impls(report)
    for backend in report["results"]:
        title = BACKEND_TITLES.get(backend, backend)
        rows = [
            [k, e["unit"], e["baseline"], *(_cell(e, i) for i in impls)]
            for k, e in _throughput(report, backend)
        ]
        _print_table(
            f"{title}: median, (paired median ratio to baseline [min-max])",
            ["", "unit", "vs", *impls],
            rows,
        )
        cpu = [
            [k, e["baseline"], *(_cpu_cell(e, i) for i in impls)]
            for k, e in _throughput(report, backend)
            if "cpu_us" in e
        ]
        _print_table(f"{title}: client CPU per unit (us, paired ratio)", ["", "vs", *impls], cpu)
        d1 = report["results"][backend].get("D1")
        if d1 and d1.get("points"):
            table = _d1_rows(d1)
            _print_table(f"{title} D1: {d1['title']} (events/s)", table[0], table[1:])
    for backend in report.get("latency", {}):
        title = BACKEND_TITLES.get(backend, backend)
        _print_table(f"{title}: latency", LATENCY_HEADER, _latency_rows(report, backend))
    print()
    for line in evaluate_targets(report):
        print(line)


# -- charts -----------------------------------------------------------------------------------


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = _impls(report)
    backends = [b for b in report["results"] if _throughput(report, b)]
    if not backends:
        return
    fig, axes = plt.subplots(len(backends), 1, figsize=(11, 3.8 * len(backends)), squeeze=False)
    for ax, backend in zip(axes[:, 0], backends, strict=True):
        entries = _throughput(report, backend)
        width = 0.8 / len(impls)
        for n, impl in enumerate(impls):
            xs, ys, lo, hi = [], [], [], []
            for k, (_key, entry) in enumerate(entries):
                stats = entry.get("paired", {}).get(impl)
                if stats and stats.get("n"):
                    xs.append(k + (n - (len(impls) - 1) / 2) * width)
                    ys.append(stats["median"])
                    lo.append(max(0.0, stats["median"] - stats["min"]))
                    hi.append(max(0.0, stats["max"] - stats["median"]))
            shown = [min(y, CLIP) for y in ys]
            # A clipped bar (raw, several times faster) gets its number printed, no range.
            err = [
                [lo_ if y <= CLIP else 0.0 for lo_, y in zip(lo, ys, strict=True)],
                [h if y <= CLIP else 0.0 for h, y in zip(hi, ys, strict=True)],
            ]
            ax.bar(xs, shown, width, label=impl, color=COLORS[impl], yerr=err, capsize=2)
            for x, y in zip(xs, ys, strict=True):
                if y > CLIP:  # raw is several times faster: print it rather than squash the rest
                    ax.text(x, CLIP, f"{y:.1f}x", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, CLIP * 1.3)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.8, color="black", linewidth=0.6, linestyle="--")
        ax.set_xticks(
            range(len(entries)), [f"{k}\nvs {e['baseline']}" for k, e in entries], fontsize=8
        )
        ax.set_ylabel("throughput / baseline")
        ax.set_title(
            f"{BACKEND_TITLES.get(backend, backend)}: paired median ratio to the baseline "
            "(bars: min-max over rounds)"
        )
        ax.legend(ncol=6, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _size_chart(entry: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = entry["points"]
    labels = ["0", *(p["label"] for p in points)]
    names = list(entry["empty"]["median"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in names:
        ys = [entry["empty"]["median"][name], *(p["median"].get(name) for p in points)]
        left.plot(labels, [y or math.nan for y in ys], marker="o", label=name, color=COLORS[name])
        stats = [p["paired"].get(name) or {} for p in points]
        med = [s.get("median") or math.nan for s in stats]
        err = [
            [max(0.0, m - (s.get("min") or m)) for m, s in zip(med, stats, strict=True)],
            [max(0.0, (s.get("max") or m) - m) for m, s in zip(med, stats, strict=True)],
        ]
        right.errorbar(
            labels[1:], med, yerr=err, marker="o", capsize=3, label=name, color=COLORS[name]
        )
    left.set_title(f"drain rate, {entry['pending']:,} pending, 1 relay")
    left.set_xlabel("delivered rows retained")
    left.set_ylabel("events/s (median)")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.axhline(1.0, color="black", linewidth=0.8)
    right.axhline(0.9, color="black", linewidth=0.6, linestyle="--")
    right.set_title("rate / empty-outbox rate (paired, min-max)")
    right.set_xlabel("delivered rows retained")
    right.set_ylim(0, 1.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- markdown ---------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    numbers = len(header) - text_columns
    lines = ["| " + " | ".join(header) + " |", "|---" * text_columns + "|---:" * numbers + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _markdown(report: dict[str, Any], source: str, size_chart: bool) -> str:
    env = report["environment"]
    load = env.get("load") or ()
    after = env.get("load_after") or ()
    impls = _impls(report)
    lines = [
        START,
        "",
        f"Run: `{report['mode']}` mode, {report['started']}, {report['duration_s']} s "
        f"(raw JSON: `{source}`); workloads {', '.join(report.get('selected', []))}.",
        "",
        f"- Machine: {env['machine']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in load)}, at end {', '.join(f'{x:.2f}' for x in after)}.",
        f"- Python {env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- Sizes: {', '.join(f'{k}={v}' for k, v in report['sizes'].items())}.",
        "",
        "Cells: median throughput (paired median of the per-round ratios to the row's "
        "baseline [min-max over the rounds]).",
        "",
    ]
    for backend in report["results"]:
        title = BACKEND_TITLES.get(backend, backend)
        entries = _throughput(report, backend)
        if entries:
            lines += [f"### {title}: throughput", ""]
            lines += _md_table(
                ["workload", "unit", "vs", *(f"`{i}`" for i in impls)],
                [
                    [f"{k} {e['title']}", e["unit"], f"`{e['baseline']}`"]
                    + [_cell(e, i) for i in impls]
                    for k, e in entries
                ],
                text_columns=3,
            )
        cpu = [(k, e) for k, e in entries if "cpu_us" in e]
        if cpu:
            lines += [
                f"### {title}: client CPU per unit (µs, median; paired ratio to the baseline)",
                "",
            ]
            lines += _md_table(
                ["workload", "vs", *(f"`{i}`" for i in impls)],
                [[k, f"`{e['baseline']}`", *(_cpu_cell(e, i) for i in impls)] for k, e in cpu],
                text_columns=2,
            )
        d1 = report["results"][backend].get("D1")
        if d1 and d1.get("points"):
            table = _d1_rows(d1)
            lines += [f"### {title}: D1, {d1['title']} (events/s; paired ratio to empty)", ""]
            lines += _md_table(table[0], table[1:])
            if size_chart:
                lines += [f"![drain rate against outbox size]({SIZE_CHART})", ""]
    for backend in report.get("latency", {}):
        title = BACKEND_TITLES.get(backend, backend)
        lines += [f"### {title}: latency from commit (L1: to the handler; L2: to Redis)", ""]
        lines += _md_table(LATENCY_HEADER, _latency_rows(report, backend), text_columns=2)
    lines += ["### Targets", ""]
    lines += [f"- {line}" for line in evaluate_targets(report)]
    lines += ["", f"![paired ratio to the baseline]({CHART})", "", END]
    return "\n".join(lines)


TEMPLATE = """# Performance

{section}
"""


def write_docs(report: dict[str, Any], docs: Path, source: Path) -> Path:
    """Regenerate the results section of ``docs`` (between the markers) and its charts."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    _chart(report, docs.parent / CHART)
    d1 = report["results"].get("postgresql", {}).get("D1")
    size_chart = bool(d1 and d1.get("points"))
    if size_chart:
        assert d1 is not None
        _size_chart(d1, docs.parent / SIZE_CHART)
    try:
        shown_source = source.resolve().relative_to(docs.resolve().parent.parent)
    except ValueError:
        shown_source = source
    section = _markdown(report, str(shown_source), size_chart)
    if docs.exists() and START in docs.read_text():
        text = docs.read_text()
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
        docs.write_text(head + section + tail)
    else:
        docs.write_text(TEMPLATE.format(section=section))
    return docs
