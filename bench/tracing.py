"""What tracing costs: W1 and O1 of alchemium with and without OpenTelemetry, in one run.

``python -m bench.tracing`` (``--quick`` for a smoke run). Three modes, interleaved in
a rotating order within every repetition:

- ``off``: ``alchemium.telemetry.disable()``, what a process without
  ``opentelemetry-api`` runs (each instrumented point is one attribute check);
- ``api``: the API installed, no SDK configured (the state of any app that has the
  API only because a dependency needs it);
- ``sdk``: an SDK tracer provider with a batch span processor whose exporter drops
  every batch: spans are created, recorded and queued, and exported nowhere.

For each repetition the ratio of ``api`` and ``sdk`` to ``off`` (throughput and client
CPU per operation) is taken on samples measured back to back, then the medians of
those paired ratios and their spread (min..max) are reported: on a shared machine
that is steadier than ratios of medians. Writes bench/results/tracing-<stamp>.json and
the section between the ``bench:tracing`` markers of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from alchemium import telemetry
from bench.env import open_env
from bench.impls import IMPLEMENTATIONS
from bench.report import environment
from bench.run import _database
from bench.workloads import FULL, QUICK, WORKLOADS, Sizes

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
MODES = ("off", "api", "sdk")
KEYS = ("W1", "O1")
START = "<!-- bench:tracing:start -->"
END = "<!-- bench:tracing:end -->"


class DropExporter(SpanExporter):
    """Accepts every batch and keeps nothing: tracing on, exporting nowhere."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _mode(name: str, provider: TracerProvider) -> None:
    telemetry.uninstrument()
    telemetry.enable()
    if name == "off":
        telemetry.disable()
    elif name == "sdk":
        telemetry.instrument(tracer_provider=provider)


async def _backend(backend: str, url: str, sizes: Sizes) -> dict[str, Any]:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    results: dict[str, Any] = {}
    async with open_env(backend, url, seed=sizes.seed) as env:
        impl = IMPLEMENTATIONS[backend]["alchemium"](env)
        for key in KEYS:
            workload = next(w for w in WORKLOADS if w.key == key)
            rates: dict[str, list[float]] = {m: [] for m in MODES}
            cpu: dict[str, list[float]] = {m: [] for m in MODES}
            for mode in MODES:  # warm-up, untimed
                _mode(mode, provider)
                await workload.body(impl, env, replace(sizes, w1=20, o1=20), f"warm-{mode}")
            for rep in range(sizes.reps):
                order = MODES[rep % 3 :] + MODES[: rep % 3]
                for mode in order:
                    _mode(mode, provider)
                    gc.collect()
                    started, cpu0 = time.perf_counter(), time.process_time()
                    units = await workload.body(impl, env, sizes, f"{key}-{mode}-{rep}")
                    elapsed = time.perf_counter() - started
                    rates[mode].append(units / elapsed)
                    cpu[mode].append((time.process_time() - cpu0) / units * 1e6)
            results[key] = {"title": workload.title, "rates": rates, "cpu_us": cpu}
            print(f"  {backend:<10} {key}: " + _summary(results[key]), flush=True)
        await impl.close()
    _mode("api", provider)
    provider.shutdown()
    return results


def micro(provider: TracerProvider, n: int = 20_000) -> dict[str, float]:
    """CPU microseconds per call of the instrumented points alone (no database), medians of 5.

    Steadier than whole operations on a loaded machine: what each mode adds to one
    unit of work, before the SDK's own work (``sdk span``) is counted.
    """
    attributes = {"db.system.name": "postgresql", "db.operation.name": "COMMIT"}
    raw = provider.get_tracer("bench")
    metadata: dict[str, Any] = {}

    def off() -> None:
        for _ in range(n):
            if telemetry.enabled:
                raise AssertionError("telemetry is disabled")

    def api() -> None:  # the commit span check and the context capture of a unit of work
        for _ in range(n):
            if telemetry.enabled and telemetry.tracer() is None:
                telemetry.add_trace_context(metadata)

    def sdk_raw() -> None:
        for _ in range(n):
            with raw.start_as_current_span("COMMIT", attributes=attributes):
                pass

    def sdk() -> None:
        for _ in range(n):
            with telemetry.span("COMMIT", "client", attributes):
                pass

    costs: dict[str, float] = {}
    for name, mode, loop in (
        ("off: one check", "off", off),
        ("api: commit check + context capture", "api", api),
        ("sdk: one span, OpenTelemetry SDK directly", "sdk", sdk_raw),
        ("sdk: one span through alchemium.telemetry", "sdk", sdk),
    ):
        _mode(mode, provider)
        samples = []
        for _ in range(5):
            started = time.process_time()
            loop()
            samples.append((time.process_time() - started) / n * 1e6)
        costs[name] = statistics.median(samples)
    _mode("api", provider)
    return costs


def paired(entry: dict[str, Any], mode: str, what: str) -> dict[str, float]:
    """Median, min and max over the repetitions of ``mode``'s figure divided by ``off``'s."""
    ratios = [m / o for m, o in zip(entry[what][mode], entry[what]["off"], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _summary(entry: dict[str, Any]) -> str:
    parts = []
    for mode in ("api", "sdk"):
        rate, cpu = paired(entry, mode, "rates"), paired(entry, mode, "cpu_us")
        parts.append(f"{mode}/off throughput {rate['median']:.3f}, CPU {cpu['median']:.3f}")
    return "; ".join(parts)


def _markdown(report: dict[str, Any], source: str) -> str:
    env = report["environment"]
    lines = [
        START,
        "",
        f"Run: `python -m bench.tracing{' --quick' if report['mode'] == 'quick' else ''}`, "
        f"{report['started']}, {report['duration_s']} s, {report['sizes']['reps']} "
        f"repetitions (raw JSON: `{source}`); {env['machine']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in env.get('load') or ())}; "
        f"opentelemetry-sdk {report['otel']}.",
        "",
        "| backend | workload | `off` ops/s | `api` / `off` | `sdk` / `off` | CPU/op `off` (µs) "
        "| CPU `api` / `off` | CPU `sdk` / `off` |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(r: dict[str, float]) -> str:
        return f"{r['median']:.3f} ({r['min']:.2f} to {r['max']:.2f})"

    for backend, results in report["results"].items():
        for key, entry in results.items():
            lines.append(
                f"| {backend} | {key} | {statistics.median(entry['rates']['off']):,.0f} "
                f"| {cell(paired(entry, 'api', 'rates'))} | {cell(paired(entry, 'sdk', 'rates'))} "
                f"| {statistics.median(entry['cpu_us']['off']):,.0f} "
                f"| {cell(paired(entry, 'api', 'cpu_us'))} "
                f"| {cell(paired(entry, 'sdk', 'cpu_us'))} |"
            )
    if report.get("micro"):
        lines += ["", "| instrumented point alone | CPU µs per call |", "|---|---:|"]
        lines += [f"| {name} | {us:.2f} |" for name, us in report["micro"].items()]
    lines += ["", END]
    return "\n".join(lines)


def _write_docs(report: dict[str, Any], docs: Path, source: Path) -> None:
    try:
        shown = source.resolve().relative_to(ROOT)
    except ValueError:
        shown = source
    section = _markdown(report, str(shown))
    text = docs.read_text() if docs.exists() else "# Performance\n"
    if START in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    docs.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.tracing``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repetitions")
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 15)")
    parser.add_argument(
        "--ops", type=int, default=None, help="W1/O1 operations per sample (400/300)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    sizes = replace(QUICK, reps=3) if args.quick else replace(FULL, reps=15)
    if args.reps is not None:
        sizes = replace(sizes, reps=args.reps)
    if args.ops is not None:  # shorter samples, interleaved more finely on a noisy machine
        sizes = replace(sizes, w1=args.ops, o1=args.ops)
    from importlib import metadata

    started = time.time()
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "sizes": sizes.__dict__,
        "environment": environment(),
        "otel": metadata.version("opentelemetry-sdk"),
        "results": {},
    }
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    report["micro"] = micro(provider, 2_000 if args.quick else 20_000)
    provider.shutdown()
    for name, us in report["micro"].items():
        print(f"  {name}: {us:.2f} us")
    print("tracing overhead (paired ratios to off, medians)")
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        with _database(backend) as url:
            report["results"][backend] = asyncio.run(_backend(backend, url, sizes))
    report["duration_s"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tracing-{report['mode']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"results: {path}")
    if not args.no_docs:
        _write_docs(report, args.docs, path)
        print(f"docs:    {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
