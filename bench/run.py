"""Run the benchmark: ``python -m bench`` (full) or ``python -m bench --quick``.

Starts a throwaway PostgreSQL (tests/rig.py), a SQLite file and, for L2, a
throwaway Redis; runs every selected workload against every implementation,
interleaved in rotating order (A B C D, B C D A, ...); prints medians and the
paired ratio to each workload's baseline, evaluates the targets, writes
bench/results/<mode>-<stamp>.json and regenerates the results section and the
charts of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import latency, relays
from bench.env import Env, open_env, postgres_url, redis_url, sqlite_path
from bench.impls import IMPLEMENTATIONS, Implementation
from bench.outbox_size import measure_curve
from bench.report import environment, print_tables, write_docs, write_json
from bench.schema import outbox
from bench.stats import paired, rotated, spread
from bench.workloads import (
    FULL,
    QUICK,
    RELAY_KEYS,
    WORKLOADS,
    Sizes,
    Workload,
    warmup_sizes,
    workload,
)

__all__ = ["BACKENDS", "IMPL_ORDER", "KEYS", "main", "make_entry", "parse_count"]

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("postgresql", "sqlite")
IMPL_ORDER = ("raw", "core", "orm", "advanced_alchemy", "alchemium", "alchemium_outbox")
KEYS = (*(w.key for w in WORKLOADS), *RELAY_KEYS)


def parse_count(text: str) -> int:
    """``"5M"`` -> 5000000, ``"100k"`` -> 100000, ``"250"`` -> 250."""
    text = text.strip().lower().replace("_", "")
    for suffix, factor in (("m", 1_000_000), ("k", 1000)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


def _counts(text: str) -> tuple[int, ...]:
    return tuple(parse_count(t) for t in text.split(",") if t.strip())


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few reps, small sizes (~2 min)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="postgresql,sqlite")
    parser.add_argument(
        "--workloads",
        default="all",
        help=f"comma-separated keys: {','.join(KEYS)} (default all)",
    )
    parser.add_argument("--impls", default=",".join(IMPL_ORDER), help="implementations to run")
    parser.add_argument("--reps", type=int, default=None, help="override repetitions")
    parser.add_argument(
        "--outbox-sizes",
        type=_counts,
        default=None,
        help="D1: delivered rows retained, e.g. 0,100k,1M,5M (full default) or 0,100k,1M",
    )
    parser.add_argument(
        "--rates", type=_counts, default=None, help="L1/L2: events per second, e.g. 50,1000"
    )
    parser.add_argument("--relays", type=_counts, default=None, help="O2: relay counts, e.g. 1,4")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--docs",
        type=Path,
        default=ROOT / "docs" / "performance.md",
        help="markdown file whose results section is regenerated",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    return parser.parse_args(argv)


def _median(samples: list[float]) -> float | None:
    return spread(samples)["median"] if samples else None


def _failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def make_entry(
    title: str,
    unit: str,
    baseline: str,
    samples: dict[str, list[float]],
    cpu: dict[str, list[float]] | None = None,
    errors: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A workload's result: samples by implementation (one per round, rounds aligned),
    medians, and the spread of each implementation's per-round ratio to ``baseline``."""
    base = samples.get(baseline)
    entry: dict[str, Any] = {
        "title": title,
        "unit": unit,
        "baseline": baseline,
        "samples": samples,
        "median": {n: _median(s) for n, s in samples.items()},
        "paired": {n: paired(s, base) for n, s in samples.items()} if base else {},
        "errors": errors or {},
    }
    if cpu:
        # The client's CPU per unit: steadier than throughput on a shared machine, and
        # what a library adds on top of SQLAlchemy shows up here first.
        cpu_base = cpu.get(baseline)
        entry.update(
            cpu_samples=cpu,
            cpu_us={n: _median(s) for n, s in cpu.items()},
            cpu_paired={n: paired(s, cpu_base) for n, s in cpu.items()} if cpu_base else {},
        )
    return entry


class Runner:
    """Runs the selected workloads on one backend and collects samples."""

    def __init__(
        self,
        env: Env,
        sizes: Sizes,
        impls: list[str],
        selected: set[str],
        redis: str | None = None,
    ) -> None:
        self.env = env
        self.sizes = sizes
        self.selected = selected
        self.redis = redis
        classes = IMPLEMENTATIONS[env.backend]
        self.impls: dict[str, Implementation] = {n: classes[n](env) for n in impls}
        self.results: dict[str, Any] = {}
        self.latency: dict[str, Any] = {}
        self._seq = 0

    def _tag(self, impl: str) -> str:
        self._seq += 1
        return f"{impl}-{self._seq}"

    def _say(self, key: str, text: str) -> None:
        print(f"  {self.env.backend:<10} {key:<5} {text}", flush=True)

    async def _measure(
        self, work: Workload, impl: Implementation, sizes: Sizes
    ) -> tuple[float, float]:
        """Units per second, and this process's CPU time per unit in microseconds."""
        if work.prepare is not None:
            await work.prepare(self.env, sizes)
        gc.collect()
        cpu = time.process_time()
        started = time.perf_counter()
        units = await work.body(impl, self.env, sizes, self._tag(impl.name))
        elapsed = time.perf_counter() - started
        return units / elapsed, (time.process_time() - cpu) / units * 1e6

    async def crud(self, work: Workload) -> None:
        """Every repetition runs each implementation once (rotating order); paired ratios."""
        started = time.perf_counter()
        names = [n for n, i in self.impls.items() if hasattr(i, work.method)]
        ref = workload(work.reference) if work.reference else None
        samples: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        ref_samples: dict[str, list[float]] = {n: [] for n in names}
        errors: dict[str, str] = {}
        warm = warmup_sizes(self.sizes)
        for r in range(-1, self.sizes.reps):  # round -1: untimed warm-up
            for name in rotated(names, max(r, 0)):
                if name in errors:
                    continue
                impl = self.impls[name]
                sizes = warm if r < 0 else self.sizes
                try:
                    if ref is not None:
                        ref_rate, _ = await self._measure(ref, impl, sizes)
                    rate, cpu_us = await self._measure(work, impl, sizes)
                except Exception as err:
                    errors[name] = _failure(err)
                    self._say(work.key, f"{name} FAILED: {errors[name]}")
                    traceback.print_exc(limit=3)
                    continue
                if r >= 0:
                    samples[name].append(rate)
                    cpu[name].append(cpu_us)
                    if ref is not None:
                        ref_samples[name].append(ref_rate)
        for name in errors:
            for table in (samples, cpu, ref_samples):
                table.pop(name, None)
        extra: dict[str, Any] = {}
        if ref is not None:
            extra = {
                "reference": ref.key,
                "reference_samples": ref_samples,
                "share": {n: paired(samples[n], ref_samples[n]) for n in samples},
            }
        self._store(work.key, work.title, work.unit, work.baseline, samples, cpu, errors, extra)
        self.results[work.key]["duration_s"] = round(time.perf_counter() - started, 1)

    async def drains(self, relays_n: int) -> None:
        """O2 with ``relays_n`` drainers each: raw, orm and alchemium on the same rows."""
        started = time.perf_counter()
        names = [n for n in relays.DRAINERS if n in self.impls]
        count = self.sizes.o2_events
        samples: dict[str, list[float]] = {n: [] for n in names}
        errors: dict[str, str] = {}
        if not relays.RELAY_AVAILABLE and "alchemium" in self.impls:
            errors["alchemium"] = "alchemium.events.relay is not available"
        for r in range(-1, self.sizes.o2_reps):  # round -1: untimed warm-up
            for name in rotated(names, max(r, 0)):
                if name in errors:
                    continue
                events = min(count, 2000) if r < 0 else count
                await relays.seed_pending(self.env, outbox, events)
                gc.collect()
                try:
                    drainer = relays.DRAINERS[name]
                    rate = await relays.drain(self.env, outbox, drainer, relays_n, events)
                except Exception as err:
                    errors[name] = _failure(err)
                    self._say(f"O2x{relays_n}", f"{name} FAILED: {errors[name]}")
                    continue
                if r >= 0:
                    samples[name].append(rate)
        for name in errors:
            samples.pop(name, None)
        title = f"relay drain of {count:,} pending events, {relays_n} relay(s)"
        key = f"O2x{relays_n}"
        self._store(key, title, "events/s", "raw", samples, None, errors, {"relays": relays_n})
        self.results[key]["duration_s"] = round(time.perf_counter() - started, 1)

    async def outbox_size(self) -> None:
        """D1: drain rate against delivered rows retained (bench/outbox_size.py)."""
        started = time.perf_counter()
        try:
            if not relays.RELAY_AVAILABLE:
                raise RuntimeError("alchemium.events.relay is not available")
            result = await measure_curve(
                self.env, self.sizes, list(self.impls), lambda text: self._say("D1", text)
            )
        except Exception as err:
            self._say("D1", f"FAILED: {_failure(err)}")
            traceback.print_exc(limit=3)
            result = {"title": "relay drain vs delivered rows retained", "error": _failure(err)}
        result["duration_s"] = round(time.perf_counter() - started, 1)
        self.results["D1"] = result

    async def latencies(self, key: str) -> None:
        """L1 or L2 at every configured rate; each implementation in turn."""
        names = [n for n in ("orm", "alchemium") if n in self.impls]
        for rate in self.sizes.latency_rates:
            entry: dict[str, Any] = {}
            for name in names:
                if name not in latency.SINKS[key]:
                    if name == "alchemium":
                        entry[name] = {"error": "alchemium.events.relay is not available"}
                    continue
                try:
                    entry[name] = await latency.measure(
                        self.env,
                        key,
                        name,
                        rate,
                        self.sizes.latency_seconds,
                        self.sizes.latency_warmup,
                        self.redis,
                    )
                except Exception as err:
                    entry[name] = {"error": _failure(err)}
                    self._say(key, f"{name} at {rate}/s FAILED: {_failure(err)}")
                    continue
                got = entry[name]
                p99 = "lost events" if got["p99"] is None else f"{got['p99']:.1f} ms"
                self._say(
                    key,
                    f"{name} at {rate:,}/s (achieved {got['achieved']:,.0f}/s): "
                    f"p50 {got['p50'] or float('nan'):.1f} ms, p99 {p99}, "
                    f"missing {got['missing']}",
                )
            self.latency[f"{key}@{rate}"] = entry

    def _store(
        self,
        key: str,
        title: str,
        unit: str,
        baseline: str,
        samples: dict[str, list[float]],
        cpu: dict[str, list[float]] | None,
        errors: dict[str, str],
        extra: dict[str, Any],
    ) -> None:
        entry = make_entry(title, unit, baseline, samples, cpu, errors)
        entry.update(extra)
        self.results[key] = entry
        shown = ", ".join(
            f"{n} {m:,.0f}"
            + (f" ({entry['paired'][n]['median']:.2f}x)" if n in entry["paired"] else "")
            for n, m in entry["median"].items()
            if m is not None
        )
        self._say(key, shown or "nothing measured")

    async def run(self) -> None:
        for work in WORKLOADS:
            if work.key in self.selected and self.env.backend in work.backends:
                await self.crud(work)
        if not self.env.is_pg:
            return
        if "O2" in self.selected:
            for n in self.sizes.o2_relays:
                await self.drains(n)
        if "D1" in self.selected:
            await self.outbox_size()
        for key in ("L1", "L2"):
            if key in self.selected:
                await self.latencies(key)


@contextlib.contextmanager
def _database(backend: str) -> Iterator[str]:
    with postgres_url() if backend == "postgresql" else sqlite_path() as url:
        yield url


async def _run_backend(
    backend: str, url: str, sizes: Sizes, impls: list[str], selected: set[str], redis: str | None
) -> tuple[dict[str, Any], dict[str, Any], str]:
    async with open_env(backend, url, seed=sizes.seed) as env:
        version = await _server_version(env)
        runner = Runner(env, sizes, impls, selected, redis)
        try:
            await runner.run()
        finally:
            for impl in runner.impls.values():
                await impl.close()
        return runner.results, runner.latency, version


async def _server_version(env: Env) -> str:
    from sqlalchemy import text

    async with env.engine.connect() as conn:
        query = "SELECT version()" if env.is_pg else "SELECT sqlite_version()"
        return str((await conn.execute(text(query))).scalar_one())


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    if args.reps is not None:
        sizes = replace(
            sizes,
            reps=args.reps,
            o2_reps=min(sizes.o2_reps, args.reps),
            d1_reps=min(sizes.d1_reps, args.reps),
        )
    if args.outbox_sizes is not None:
        sizes = replace(sizes, d1_sizes=args.outbox_sizes)
    if args.rates is not None:
        sizes = replace(sizes, latency_rates=args.rates)
    if args.relays is not None:
        sizes = replace(sizes, o2_relays=args.relays)
    return sizes


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench``; returns the exit code."""
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = _sizes(args)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    wanted = {k.strip() for k in args.workloads.split(",") if k.strip()}
    selected = set(KEYS) if wanted == {"all"} else wanted
    unknown = (selected - set(KEYS)) | ({*backends} - {*BACKENDS})
    if unknown:
        print(f"unknown workload/backend: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    impls = [n for n in IMPL_ORDER if n in args.impls.split(",")]
    started = time.time()
    env_info = environment()
    print(f"alchemium benchmark ({'quick' if args.quick else 'full'}), {env_info['machine']}")
    results: dict[str, Any] = {}
    latencies: dict[str, Any] = {}
    for backend in backends:
        needs_redis = backend == "postgresql" and "L2" in selected
        with _database(backend) as url, redis_url() if needs_redis else _none() as redis:
            res, lat, version = asyncio.run(
                _run_backend(backend, url, sizes, impls, selected, redis)
            )
        results[backend] = res
        if lat:
            latencies[backend] = lat
        env_info["versions"][backend] = version
    env_info["load_after"] = environment()["load"]
    report = {
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "selected": sorted(selected),
        "backends": backends,
        "impls": impls,
        "sizes": sizes.__dict__,
        "environment": env_info,
        "results": results,
        "latency": latencies,
    }
    path = write_json(report, args.out)
    print_tables(report)
    print(f"\nresults: {path} ({report['duration_s']:.0f} s)")
    if not args.no_docs:
        print(f"docs:    {write_docs(report, args.docs, path)}")
    return 0


@contextlib.contextmanager
def _none() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    sys.exit(main())
