"""The throughput chart: deliveries per minute as an SVG drawn on the server (no script)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape, quoteattr

__all__ = ["throughput_svg"]

WIDTH, HEIGHT = 720, 180
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 12, 28


def throughput_svg(minutes: Sequence[Mapping[str, Any]]) -> str:
    """An SVG bar chart of ``[{"start": iso, "delivered": n}, ...]``, oldest first.

    Each bar has a ``<title>`` (its minute and count) that browsers show on hover; the
    axis is labelled with the largest count and the first/last minute (UTC).
    """
    count = max(len(minutes), 1)
    peak = max((int(m["delivered"]) for m in minutes), default=0)
    top = max(peak, 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / count
    bars = []
    for i, minute in enumerate(minutes):
        n = int(minute["delivered"])
        h = plot_h * n / top
        x, y = LEFT + i * step, TOP + plot_h - h
        label = f"{_hhmm(minute['start'])} UTC: {n} delivered"
        bars.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{y:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}"><title>{escape(label)}</title></rect>'
        )
    first = _hhmm(minutes[0]["start"]) if minutes else ""
    last = _hhmm(minutes[-1]["start"]) if minutes else ""
    summary = f"Deliveries per minute, {first} to {last} UTC, at most {peak} a minute"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" aria-label={quoteattr(summary)}>'
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" '
        f'y2="{TOP + plot_h}"/>'
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>'
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + 10}" text-anchor="end">{peak}</text>'
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end">0</text>'
        f'<text class="tick" x="{LEFT}" y="{HEIGHT - 8}">{escape(first)}</text>'
        f'<text class="tick" x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" text-anchor="end">'
        f"{escape(last)} (now)</text>" + "".join(bars) + "</svg>"
    )


def _hhmm(iso_time: Any) -> str:
    text = str(iso_time or "")
    return text[11:16] if len(text) >= 16 else text
