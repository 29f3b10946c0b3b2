"""The few statistics the report uses: spreads, paired ratios, latency percentiles.

Every target is judged on **paired** ratios: within one round the implementations
run back to back, so ``alchemium[i] / baseline[i]`` compares measurements taken
seconds apart. On a shared machine the medians of two columns, taken separately,
can drift apart by more than the difference being measured; the median of the
per-round ratios does not, and its spread (min-max, quartiles) says how much
one round can be trusted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["latency_summary", "nearest_rank", "paired", "rotated", "spread"]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, min, max and count of ``values`` (JSON-ready; empty -> n=0)."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return {"median": None, "q1": None, "q3": None, "min": None, "max": None, "n": 0}
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
        "values": list(values),
    }


def paired(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """The spread of ``numerator[i] / denominator[i]`` over the rounds both measured."""
    ratios = [n / d for n, d in zip(numerator, denominator, strict=False) if d]
    return spread(ratios)


def rotated(names: Sequence[str], round_no: int) -> list[str]:
    """``names`` starting at position ``round_no``: no implementation always runs first."""
    if not names:
        return []
    k = round_no % len(names)
    return [*names[k:], *names[:k]]


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of an ascending sequence."""
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def latency_summary(latencies: Sequence[float], expected: int) -> dict[str, Any]:
    """p50 / p95 / p99 / max in milliseconds over ``expected`` events.

    Events that never arrived count as infinitely late (reported as ``None``), so a
    run that loses more than 1% of its events cannot have a finite p99.
    """
    missing = max(0, expected - len(latencies))
    ordered = sorted(latencies) + [math.inf] * missing
    out: dict[str, Any] = {"n": len(latencies), "expected": expected, "missing": missing}
    for label, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)):
        value = nearest_rank(ordered, q) * 1000 if ordered else math.inf
        out[label] = None if math.isinf(value) else value
    return out
