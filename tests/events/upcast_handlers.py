"""The "new code" of the upcasting tests, imported by a relay subprocess.

``user_created`` is at schema version 2 here: ``name`` became ``first_name`` and
``last_name``. The subscriber ``upcast_sink`` appends each event it receives as one
JSON line (``schema_version`` and ``payload``) to ``$ALCHEMIUM_SINK.<pid>``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from alchemium.events import DomainEvent, declare_schema_version, on, upcaster

declare_schema_version("user_created", 2)


@upcaster("user_created", from_version=1)
def split_name(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 ``name`` -> v2 ``first_name`` / ``last_name``."""
    first, _, last = payload.pop("name").partition(" ")
    return {**payload, "first_name": first, "last_name": last}


_path = os.environ.get("ALCHEMIUM_SINK")


@on("user_created", name="upcast_sink")
def upcast_sink(event: DomainEvent) -> None:
    """Append what the handler received (version and payload) as a JSON line."""
    line = json.dumps({"version": event.schema_version, "payload": dict(event.payload)})
    with open(f"{_path}.{os.getpid()}", "a", encoding="utf-8") as out:
        out.write(line + "\n")
