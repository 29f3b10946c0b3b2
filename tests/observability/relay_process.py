"""A running ``alchemium relay --metrics-port`` subprocess and its scrapes, for these tests."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.events.relay_support import REPO, eventually, run_cli, stop_process
from tests.rig import free_port

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text into {(name, labels): value}; fails on a line it cannot read."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match is not None, f"not a Prometheus sample: {line!r}"
        labels = frozenset(LABEL.findall(match.group(3) or ""))
        samples[(match.group(1), labels)] = float(match.group(4))
    return samples


@dataclass
class Metrics:
    """One scrape."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))


@dataclass
class RunningRelay:
    """A relay subprocess serving /metrics and /health on ``port``."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    async def scrape(self) -> Metrics:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return Metrics(parse_metrics(response.text))

    async def health(self, *args: str) -> tuple[int, str, str]:
        """``alchemium relay --health --metrics-port PORT ARGS``: exit code, stdout, stderr."""
        done = await asyncio.to_thread(
            run_cli, "relay", "--health", "--metrics-port", str(self.port), *args, timeout=30
        )
        return done.returncode, done.stdout, done.stderr


@asynccontextmanager
async def running_relay(
    db_url: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[RunningRelay]:
    """Start ``alchemium relay`` with the handlers of this package and wait for its port."""
    port = free_port()
    log = tmp_path / f"relay-{port}.log"
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OBS_SINK": str(tmp_path / "sink"),
        "OBS_RELEASE": str(tmp_path / "release"),
        **(env or {}),
    }
    command: Sequence[str] = [
        sys.executable,
        "-m",
        "alchemium",
        "relay",
        "--url",
        db_url,
        "--import",
        "tests.observability.handlers",
        "--metrics-port",
        str(port),
        *args,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=environment, stdout=out, stderr=out)
    relay = RunningRelay(proc, port, log)

    async def answers() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            await relay.scrape()
        except httpx.TransportError:
            return False
        return True

    try:
        await eventually(answers, 60, interval=0.2)
        yield relay
    finally:
        stop_process(proc)
