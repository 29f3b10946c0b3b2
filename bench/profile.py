"""Profile one workload of one implementation: ``python -m bench.profile W1 alchemium``.

Runs the workload ``--n`` times under cProfile (after a warm-up) on a fresh
database and prints the top functions by cumulative and by own time. Use it to
see where an implementation spends the time that separates it from ``orm``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
from dataclasses import replace

from bench import relays
from bench.env import open_env, postgres_url, sqlite_path
from bench.impls import IMPLEMENTATIONS
from bench.schema import outbox
from bench.workloads import FULL, WORKLOADS

__all__ = ["main"]


async def _profile(args: argparse.Namespace, url: str) -> pstats.Stats:
    sizes = replace(
        FULL,
        seed=2000,
        w1=args.n,
        reads=args.n,
        w3=args.n,
        o1=args.n,
        w6_per_task=max(1, args.n // 32),
        bulk_rows=args.n,
    )
    profiler = cProfile.Profile()
    async with open_env(args.backend, url, seed=sizes.seed) as env:
        if args.workload.startswith("O2"):
            count, n = args.n, int(args.workload[3:] or 1)
            drainer = relays.DRAINERS[args.impl]
            await relays.seed_pending(env, outbox, count)
            await relays.drain(env, outbox, drainer, n, count)  # warm-up
            await relays.seed_pending(env, outbox, count)
            profiler.enable()
            await relays.drain(env, outbox, drainer, n, count)
            profiler.disable()
        else:
            workload = next(w for w in WORKLOADS if w.key == args.workload)
            impl = IMPLEMENTATIONS[args.backend][args.impl](env)
            warm = replace(sizes, w1=20, reads=20, w3=20, o1=20, bulk_rows=1000)
            for run_sizes, tag in ((warm, "warm"), (sizes, "profiled")):
                if workload.prepare is not None:  # untimed, like the runner's
                    await workload.prepare(env, run_sizes)
                if tag == "profiled":
                    profiler.enable()
                await workload.body(impl, env, run_sizes, tag)
            profiler.disable()
    return pstats.Stats(profiler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.profile``."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("workload", help="W1..W8, O1, O2x1, O2x4")
    parser.add_argument(
        "impl", help="raw, core, orm, advanced_alchemy, alchemium, alchemium_outbox"
    )
    parser.add_argument("--backend", default="postgresql", choices=("postgresql", "sqlite"))
    parser.add_argument(
        "--n", type=int, default=2000, help="operations (W5/W7/W8: rows; O2: events)"
    )
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--dump", help="also write the raw profile here (for snakeviz etc.)")
    args = parser.parse_args(argv)
    with postgres_url() if args.backend == "postgresql" else sqlite_path() as url:
        stats = asyncio.run(_profile(args, url))
    if args.dump:
        stats.dump_stats(args.dump)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
