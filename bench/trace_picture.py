"""Draw one trace crossing the outbox, from spans exported in a real run, as a PNG timeline.

The spans come from the end-to-end test (``tests/observability/test_end_to_end_trace.py``),
which keeps them when asked::

    export ALCHEMIUM_TRACE_PICTURE=docs/observability-trace.jsonl
    .venv/bin/python -m pytest tests/observability/test_end_to_end_trace.py -k postgresql
    .venv/bin/python -m bench.trace_picture $ALCHEMIUM_TRACE_PICTURE docs/observability-trace.png

Two panels with their own time axes: the application process (the request, its
commit, the outbox write, the after-commit dispatch) and, later, the relay process
(its claim, in a trace of its own, and the publish, back in the request's trace).
Each bar names its parent; the dashed arrow is the publish span's link to the claim.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["draw", "main"]

COLORS = {"SERVER": "#4c72b0", "CLIENT": "#55a868", "CONSUMER": "#dd8452", "PRODUCER": "#c44e52"}


def _tree(spans: list[dict[str, Any]], root: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
    """``root`` and its descendants, depth first in start order, with their depth."""
    children: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        if span["parent_id"]:
            children.setdefault(span["parent_id"], []).append(span)
    out: list[tuple[dict[str, Any], int]] = []

    def walk(span: dict[str, Any], depth: int) -> None:
        out.append((span, depth))
        for child in sorted(children.get(span["span_id"], []), key=lambda s: s["start"]):
            walk(child, depth + 1)

    walk(root, 0)
    return out


def draw(spans: list[dict[str, Any]], path: Path) -> None:
    """Draw the trace of the first SERVER span in ``spans`` (and linked spans) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = min((s for s in spans if s["kind"] == "SERVER"), key=lambda s: s["start"])
    rows = _tree([s for s in spans if s["trace_id"] == root["trace_id"]], root)
    linked = {link for s, _ in rows for link in s["links"]}
    rows += [(s, 0) for s in spans if s["span_id"] in linked]
    services = list(dict.fromkeys(s["service"] for s, _ in rows))
    fig, axes = plt.subplots(
        1, len(services), figsize=(13, 0.5 * len(rows) + 1.6), sharey=True, squeeze=False
    )
    y_of = {s["span_id"]: len(rows) - 1 - i for i, (s, _) in enumerate(rows)}
    names = {s["span_id"]: s["name"] for s, _ in rows}
    first = {svc: min(s["start"] for s, _ in rows if s["service"] == svc) for svc in services}
    for ax, service in zip(axes[0], services, strict=True):
        mine = [(s, d) for s, d in rows if s["service"] == service]
        start = min(s["start"] for s, _ in mine)
        end = max(s["end"] for s, _ in mine)
        width_ms = (end - start) / 1e6
        for span, _depth in mine:
            left, width = (span["start"] - start) / 1e6, (span["end"] - span["start"]) / 1e6
            y = y_of[span["span_id"]]
            ax.barh(y, max(width, width_ms / 300), left=left, height=0.6,
                    color=COLORS.get(span["kind"], "#8c8c8c"),
                    edgecolor="black" if span["status"] == "ERROR" else "none")  # fmt: skip
            label = f"{span['name']}  [{span['kind'].lower()}]"
            parent = names.get(span["parent_id"] or "")
            label += f"  parent: {parent}" if parent else "  (root)"
            ax.text(left + width + width_ms / 100, y, label, va="center", fontsize=8)
        ax.set_xlim(-width_ms * 0.02, width_ms * 1.9)
        ax.set_xlabel(f"ms since the first span of {service}")
        later = (start - first[services[0]]) / 1e9
        ax.set_title(service + (f" ({later:.1f} s later)" if later > 0 else ""), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    starts = {s["span_id"]: (s["start"] - first[s["service"]]) / 1e6 for s, _ in rows}
    for span, _ in rows:  # links: publish -> claim
        for target in span["links"]:
            if target in y_of:
                ax = axes[0][services.index(span["service"])]
                arrow = {"arrowstyle": "->", "linestyle": "--", "color": "gray"}
                ax.annotate("link", xy=(starts[target], y_of[target] + 0.3),
                            xytext=(starts[span["span_id"]], y_of[span["span_id"]] - 0.3),
                            fontsize=7, color="gray", arrowprops=arrow)  # fmt: skip
    axes[0][0].set_yticks([])
    fig.suptitle(
        f"one trace across the outbox (trace id {root['trace_id'][:12]}…; "
        "the claim is the relay's own trace, linked from the publish)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.trace_picture SPANS.jsonl OUT.png``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.trace_picture SPANS.jsonl OUT.png", file=sys.stderr)
        return 2
    spans = [json.loads(line) for line in Path(args[0]).read_text().splitlines() if line]
    draw(spans, Path(args[1]))
    print(f"wrote {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
