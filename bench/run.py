"""Run the benchmark: ``python -m bench`` (full) or ``python -m bench --quick``.

Starts a throwaway PostgreSQL (tests/rig.py) and a SQLite file, runs every
workload against every implementation interleaved (A B C D A B C D ...),
prints medians with the ratio to ``orm``, writes bench/results/<stamp>.json and
regenerates the results section and chart of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import relays
from bench.env import Env, open_env, postgres_url, sqlite_path
from bench.impls import IMPLEMENTATIONS, Implementation
from bench.report import environment, print_tables, write_docs, write_json
from bench.workloads import FULL, QUICK, WORKLOADS, Sizes, Workload

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("postgresql", "sqlite")
IMPL_ORDER = ("raw", "orm", "advanced_alchemy", "alchemium")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few reps, small sizes (< 2 min)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="postgresql,sqlite")
    parser.add_argument(
        "--workloads", default="all", help="comma-separated keys: W1..W6,O1,O2,L1 (default all)"
    )
    parser.add_argument("--impls", default=",".join(IMPL_ORDER), help="implementations to run")
    parser.add_argument("--reps", type=int, default=None, help="override repetitions")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--docs",
        type=Path,
        default=ROOT / "docs" / "performance.md",
        help="markdown file whose results section is regenerated",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    return parser.parse_args(argv)


def _median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


class Runner:
    """Runs the selected workloads on one backend and collects samples."""

    def __init__(self, env: Env, sizes: Sizes, impls: list[str], selected: set[str]) -> None:
        self.env = env
        self.sizes = sizes
        self.selected = selected
        classes = IMPLEMENTATIONS[env.backend]
        self.impls: dict[str, Implementation] = {n: classes[n](env) for n in impls}
        self.results: dict[str, Any] = {}
        self.latency: dict[str, Any] = {}
        self._seq = 0

    def _tag(self, impl: str) -> str:
        self._seq += 1
        return f"{impl}-{self._seq}"

    async def _measure(
        self, workload: Workload, impl: Implementation, sizes: Sizes
    ) -> tuple[float, float]:
        """Units per second, and this process's CPU time per unit in microseconds."""
        if workload.truncate:
            await self.env.truncate(*workload.truncate)
        gc.collect()
        cpu = time.process_time()
        started = time.perf_counter()
        units = await workload.body(impl, self.env, sizes, self._tag(impl.name))
        elapsed = time.perf_counter() - started
        return units / elapsed, (time.process_time() - cpu) / units * 1e6

    async def crud(self, workload: Workload) -> None:
        names = [n for n, i in self.impls.items() if hasattr(i, workload.method)]
        samples: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        warm = _warmup(self.sizes)
        for name in names:  # untimed: connections, statement caches, mapper configuration
            await self._measure(workload, self.impls[name], warm)
        for _ in range(self.sizes.reps):
            for name in names:
                rate, cpu_us = await self._measure(workload, self.impls[name], self.sizes)
                samples[name].append(rate)
                cpu[name].append(cpu_us)
        self._store(workload.key, workload.title, workload.unit, samples, cpu)

    async def drain(self, relays_n: int) -> None:
        drainers = {n: d for n, d in relays.DRAINERS.items() if n in self.impls}
        samples: dict[str, list[float]] = {n: [] for n in drainers}
        count = self.sizes.o2_events
        for _ in range(self.sizes.o2_reps):
            for name, drainer in drainers.items():
                await relays.seed_outbox(self.env, count)
                gc.collect()
                samples[name].append(await relays.drain(self.env, drainer, relays_n, count))
        title = f"relay drain of {count:,} pending events, {relays_n} relay(s)"
        self._store(f"O2x{relays_n}", title, "events/s", samples)
        if not relays.RELAY_AVAILABLE:
            self.results[f"O2x{relays_n}"]["note"] = "alchemium.events.relay not available"

    async def latency_run(self) -> None:
        for name, measure in relays.LATENCY.items():
            if name not in self.impls:
                continue
            gc.collect()
            found = await measure(self.env, self.sizes.l1_events, self.sizes.l1_gap)
            if found:
                self.latency[name] = relays.percentiles(found)

    def _store(
        self,
        key: str,
        title: str,
        unit: str,
        samples: dict[str, list[float]],
        cpu: dict[str, list[float]] | None = None,
    ) -> None:
        medians = {n: _median(s) for n, s in samples.items()}
        base = medians.get("orm")
        self.results[key] = {
            "title": title,
            "unit": unit,
            "samples": samples,
            "median": medians,
            "ratio_to_orm": {n: (m / base if base else None) for n, m in medians.items()},
        }
        if cpu:
            # The client's CPU per unit: steadier than throughput on a shared machine, and
            # what a library adds on top of SQLAlchemy shows up here first.
            cpu_medians = {n: _median(s) for n, s in cpu.items()}
            cpu_base = cpu_medians.get("orm")
            self.results[key].update(
                cpu_samples=cpu,
                cpu_us=cpu_medians,
                cpu_ratio_to_orm={
                    n: (m / cpu_base if cpu_base else None) for n, m in cpu_medians.items()
                },
            )
        shown = ", ".join(f"{n} {m:,.0f}" for n, m in medians.items())
        print(f"  {self.env.backend:<10} {key:<5} {shown}", flush=True)

    async def run(self) -> None:
        for workload in WORKLOADS:
            if workload.key in self.selected and self.env.backend in workload.backends:
                await self.crud(workload)
        if self.env.is_pg and "O2" in self.selected:
            for n in (1, 4):
                await self.drain(n)
        if self.env.is_pg and "L1" in self.selected:
            await self.latency_run()


def _warmup(sizes: Sizes) -> Sizes:
    from dataclasses import replace

    return replace(
        sizes,
        w1=max(5, sizes.w1 // 10),
        reads=max(5, sizes.reads // 10),
        w3=max(5, sizes.w3 // 10),
        w5_rows=max(100, sizes.w5_rows // 10),
        w6_per_task=1,
        o1=max(5, sizes.o1 // 10),
    )


@contextlib.contextmanager
def _database(backend: str) -> Iterator[str]:
    with postgres_url() if backend == "postgresql" else sqlite_path() as url:
        yield url


async def _run_backend(
    backend: str, url: str, sizes: Sizes, impls: list[str], selected: set[str]
) -> tuple[dict[str, Any], dict[str, Any], str]:
    async with open_env(backend, url, seed=sizes.seed) as env:
        version = await _server_version(env)
        runner = Runner(env, sizes, impls, selected)
        await runner.run()
        return runner.results, runner.latency, version


async def _server_version(env: Env) -> str:
    from sqlalchemy import text

    async with env.engine.connect() as conn:
        query = "SELECT version()" if env.is_pg else "SELECT sqlite_version()"
        return str((await conn.execute(text(query))).scalar_one())


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench``; returns the exit code."""
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = QUICK if args.quick else FULL
    if args.reps is not None:
        from dataclasses import replace

        sizes = replace(sizes, reps=args.reps, o2_reps=min(sizes.o2_reps, args.reps))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    keys = {w.key for w in WORKLOADS} | {"O2", "L1"}
    selected = keys if args.workloads == "all" else {k.strip() for k in args.workloads.split(",")}
    unknown = (selected - keys) | ({*backends} - {*BACKENDS})
    if unknown:
        print(f"unknown workload/backend: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    impls = [n for n in IMPL_ORDER if n in args.impls.split(",")]
    started = time.time()
    env_info = environment()
    print(f"alchemium benchmark ({'quick' if args.quick else 'full'}), {env_info['machine']}")
    results: dict[str, Any] = {}
    latency: dict[str, Any] = {}
    for backend in backends:
        with _database(backend) as url:
            res, lat, version = asyncio.run(_run_backend(backend, url, sizes, impls, selected))
        results[backend] = res
        if lat:
            latency[backend] = lat
        env_info["versions"][backend] = version
    env_info["load_after"] = environment()["load"]
    report = {
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "sizes": sizes.__dict__,
        "environment": env_info,
        "results": results,
        "latency": latency,
    }
    path = write_json(report, args.out)
    print_tables(report)
    print(f"\nresults: {path}")
    if not args.no_docs:
        print(f"docs:    {write_docs(report, args.docs, path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
