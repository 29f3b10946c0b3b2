"""What the broker publishers share: importing their client library, naming URLs safely."""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from alchemium.events.publishers.base import PublisherConfigurationError

__all__ = ["import_client", "redact"]


def import_client(module: str, publisher: str, package: str, extra: str) -> Any:
    """Import ``module`` (a broker's client library) or say which extra installs it.

    Publishers call it in ``__init__``, so a missing extra fails when the relay is
    configured, never at the first event.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PublisherConfigurationError(
            f"{publisher} needs {package}: pip install 'alchemium[{extra}]'"
        ) from err


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for error messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))
