"""Turning a run into output: the console table, the JSON file, the docs section and chart."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["environment", "evaluate_targets", "print_tables", "write_docs", "write_json"]

IMPLS = ("raw", "orm", "advanced_alchemy", "alchemium")
CRUD = ("W1", "W2", "W3", "W4", "W5", "W6")
CLIP = 1.6  # y-axis limit of the chart (ratio to orm)
START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"
BACKEND_TITLES = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}


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


def _cell(entry: dict[str, Any], impl: str) -> str:
    median = entry["median"].get(impl)
    if median is None:
        return "—"
    ratio = entry["ratio_to_orm"].get(impl)
    return f"{median:,.0f} ({ratio:.2f}x)" if ratio is not None else f"{median:,.0f}"


def _cpu_cell(entry: dict[str, Any], impl: str) -> str:
    us = entry["cpu_us"].get(impl)
    if us is None:
        return "—"
    ratio = entry["cpu_ratio_to_orm"].get(impl)
    return f"{us:,.1f} ({ratio:.3f}x)" if ratio is not None else f"{us:,.1f}"


def _rows(report: dict[str, Any], backend: str) -> list[list[str]]:
    rows = []
    for key, entry in report["results"].get(backend, {}).items():
        rows.append([key, entry["unit"], *(_cell(entry, i) for i in IMPLS)])
    return rows


def _cpu_rows(report: dict[str, Any], backend: str) -> list[tuple[str, dict[str, Any]]]:
    return [(k, e) for k, e in report["results"].get(backend, {}).items() if "cpu_us" in e]


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    print(f"\n{title}")
    for row in [header, *rows]:
        print(
            "  ".join(
                cell.rjust(w) if c else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def print_tables(report: dict[str, Any]) -> None:
    """Medians with the ratio to ``orm``, one table per backend, then latency and targets."""
    for backend in report["results"]:
        title = BACKEND_TITLES.get(backend, backend)
        _print_table(
            f"{title} (median, ratio to orm)", ["", "unit", *IMPLS], _rows(report, backend)
        )
        cpu_rows = [[k, *(_cpu_cell(e, i) for i in IMPLS)] for k, e in _cpu_rows(report, backend)]
        if cpu_rows:
            _print_table(f"{title} client CPU per unit (us, ratio to orm)", ["", *IMPLS], cpu_rows)
    for backend, lat in report.get("latency", {}).items():
        for impl, p in lat.items():
            print(f"L1 {backend} {impl}: p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms (n={p['n']})")
    print()
    for line in evaluate_targets(report):
        print(line)


def evaluate_targets(report: dict[str, Any]) -> list[str]:
    """One line per target of issue 5: MET / MISSED / n/a with the numbers."""
    lines = []
    for backend, res in report["results"].items():
        title = BACKEND_TITLES.get(backend, backend)
        for key in CRUD:
            entry = res.get(key)
            if entry is None or "alchemium" not in entry["median"]:
                continue
            med = entry["median"]
            ratio = entry["ratio_to_orm"].get("alchemium")
            aa = med.get("advanced_alchemy")
            ok = ratio is not None and ratio >= 0.95 and (aa is None or med["alchemium"] > aa)
            vs_aa = f", {med['alchemium'] / aa:.2f}x advanced_alchemy" if aa else ""
            lines.append(
                f"{'MET   ' if ok else 'MISSED'} {title} {key}: alchemium {ratio:.2f}x orm{vs_aa}"
                " (target >= 0.95x orm and ahead of advanced_alchemy)"
            )
        w1, o1 = res.get("W1"), res.get("O1")
        if w1 and o1 and "alchemium" in o1["median"] and "alchemium" in w1["median"]:
            share = o1["median"]["alchemium"] / w1["median"]["alchemium"]
            orm_share = o1["median"].get("orm", 0) / w1["median"].get("orm", 1)
            lines.append(
                f"{'MET   ' if share >= 0.85 else 'MISSED'} {title} O1: alchemium keeps "
                f"{share:.0%} of its W1 throughput with the outbox (target >= 85%; "
                f"hand-written orm outbox keeps {orm_share:.0%})"
            )
        one, four = res.get("O2x1"), res.get("O2x4")
        if one and four:
            if "alchemium" in four["median"]:
                a4, a1 = four["median"]["alchemium"], one["median"]["alchemium"]
                ratio = four["ratio_to_orm"]["alchemium"]
                ok = ratio >= 0.8 and a4 > a1
                lines.append(
                    f"{'MET   ' if ok else 'MISSED'} {title} O2: 4 relays {ratio:.2f}x the "
                    f"hand-written SKIP LOCKED loop, 4 vs 1 relay {a4 / a1:.2f}x "
                    "(target >= 0.8x and > 1x)"
                )
            else:
                lines.append(f"n/a    {title} O2: alchemium.events.relay not available")
    for backend, lat in report.get("latency", {}).items():
        title = BACKEND_TITLES.get(backend, backend)
        if "alchemium" in lat:
            p99 = lat["alchemium"]["p99"]
            lines.append(
                f"{'MET   ' if p99 < 50 else 'MISSED'} {title} L1: alchemium p99 {p99:.1f} ms "
                "commit-to-handler (target < 50 ms)"
            )
    return lines


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = [b for b in report["results"] if report["results"][b]]
    fig, axes = plt.subplots(len(backends), 1, figsize=(10, 3.6 * len(backends)), squeeze=False)
    colors = {
        "raw": "#9e9e9e",
        "orm": "#4c72b0",
        "advanced_alchemy": "#dd8452",
        "alchemium": "#55a868",
    }
    for ax, backend in zip(axes[:, 0], backends, strict=True):
        res = report["results"][backend]
        keys = list(res)
        width = 0.8 / len(IMPLS)
        for n, impl in enumerate(IMPLS):
            xs, ys = [], []
            for k, key in enumerate(keys):
                ratio = res[key]["ratio_to_orm"].get(impl)
                if ratio is not None:
                    xs.append(k + (n - (len(IMPLS) - 1) / 2) * width)
                    ys.append(ratio)
            ax.bar(xs, [min(y, CLIP) for y in ys], width, label=impl, color=colors[impl])
            for x, y in zip(xs, ys, strict=True):
                if y > CLIP:  # raw is several times faster: print it rather than squash the rest
                    ax.text(x, CLIP, f"{y:.1f}x", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, CLIP * 1.3)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.95, color="black", linewidth=0.6, linestyle="--")
        ax.set_xticks(range(len(keys)), keys)
        ax.set_ylabel("throughput / orm")
        ax.set_title(f"{BACKEND_TITLES.get(backend, backend)}: median throughput relative to orm")
        ax.legend(ncol=4, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(report: dict[str, Any], chart: str, source: str) -> str:
    env = report["environment"]
    load = env.get("load") or ()
    after = env.get("load_after") or ()
    lines = [
        START,
        "",
        f"Run: `{report['mode']}` mode, {report['started']}, {report['duration_s']} s "
        f"(raw JSON: `{source}`).",
        "",
        f"- Machine: {env['machine']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in load)}, at end {', '.join(f'{x:.2f}' for x in after)}.",
        f"- Python {env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- Sizes: {', '.join(f'{k}={v}' for k, v in report['sizes'].items())}.",
        "",
    ]
    for backend in report["results"]:
        lines += [
            f"### {BACKEND_TITLES.get(backend, backend)}: median throughput (ratio to `orm`)",
            "",
            "| workload | unit | " + " | ".join(f"`{i}`" for i in IMPLS) + " |",
            "|---|---|" + "---:|" * len(IMPLS),
        ]
        for key, entry in report["results"][backend].items():
            cells = " | ".join(_cell(entry, i) for i in IMPLS)
            lines.append(f"| {key} {entry['title']} | {entry['unit']} | {cells} |")
        lines.append("")
        cpu_rows = _cpu_rows(report, backend)
        if cpu_rows:
            lines += [
                f"### {BACKEND_TITLES.get(backend, backend)}: client CPU per unit "
                "(µs, median, ratio to `orm`)",
                "",
                "The benchmark process's CPU time (`time.process_time`, so the aiosqlite thread "
                "too) per operation or row: what each implementation costs on the client, "
                "steadier than throughput on a shared machine.",
                "",
                "| workload | " + " | ".join(f"`{i}`" for i in IMPLS) + " |",
                "|---|" + "---:|" * len(IMPLS),
            ]
            for key, entry in cpu_rows:
                lines.append(f"| {key} | " + " | ".join(_cpu_cell(entry, i) for i in IMPLS) + " |")
            lines.append("")
    for backend, lat in report.get("latency", {}).items():
        lines += [
            f"### {BACKEND_TITLES.get(backend, backend)}: L1 commit-to-handler latency",
            "",
            "| implementation | p50 (ms) | p99 (ms) | events |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| `{impl}` | {p['p50']:.1f} | {p['p99']:.1f} | {p['n']} |" for impl, p in lat.items()
        ]
        lines.append("")
    lines += ["### Targets", ""]
    lines += [f"- {line}" for line in evaluate_targets(report)]
    lines += ["", f"![median throughput relative to orm]({chart})", "", END]
    return "\n".join(lines)


TEMPLATE = """# Performance

{section}
"""


def write_docs(report: dict[str, Any], docs: Path, source: Path) -> Path:
    """Regenerate the results section of ``docs`` (between the markers) and its chart."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    chart = docs.parent / "performance.png"
    _chart(report, chart)
    try:
        shown_source = source.resolve().relative_to(docs.resolve().parent.parent)
    except ValueError:
        shown_source = source
    section = _markdown(report, chart.name, str(shown_source))
    if docs.exists() and START in docs.read_text():
        text = docs.read_text()
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
        docs.write_text(head + section + tail)
    else:
        docs.write_text(TEMPLATE.format(section=section))
    return docs
