"""Personal data in change events and audit rows: which columns are sensitive, and how hidden.

A model declares its sensitive columns in ``__alchemium__`` or on the column::

    class User(Base):
        __alchemium__ = {"sensitive": ["email", "phone"], "sensitive_mode": "hash"}
        email: Mapped[str] = mapped_column(String(200))
        phone: Mapped[str] = mapped_column(String(40), info={"sensitive": True})

``sensitive_mode`` decides what every change event of the model (created, updated
diffs, deleted, ...) and so every audit row and outbox payload carries instead of the
value:

- ``"redact"`` (default): the text ``"[redacted]"``;
- ``"hash"``: ``"hmac-sha256:<hex>"`` of the value's JSON form under the key set with
  :func:`set_sensitive_hash_key`: equal values give equal hashes (consumers can
  compare, join, count), nobody without the key can test a guess;
- ``"encrypt"``: an erasable token, encrypted with the *subject's* key
  (crypto-shredding, :mod:`alchemium.events.erasure`, ``alchemium[crypto]``).

A ``None`` value stays ``None``. Redacting and hashing happen when the change is
recorded (at flush): the value never enters an event. The hidden values are never
in alchemium's log records or error messages either.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alchemium.encoding import plain_json
from alchemium.errors import EventConfigurationError
from alchemium.modelinfo import ModelInfo

__all__ = [
    "ERASED",
    "MODES",
    "REDACTED",
    "SensitiveFields",
    "encrypting_fields",
    "register_encrypting",
    "sensitive_fields",
    "set_sensitive_hash_key",
]

REDACTED = "[redacted]"
ERASED = "[erased]"  # what readers show for a value whose subject was erased
MODES = ("redact", "hash", "encrypt")
HASH_PREFIX = "hmac-sha256:"

_hash_key: list[bytes] = []
_encrypting: dict[str, SensitiveFields] = {}  # entity name -> its fields, mode "encrypt"


@dataclass(frozen=True, slots=True)
class SensitiveFields:
    """The sensitive columns of ``model`` and how their values are hidden (``mode``)."""

    model: str
    fields: frozenset[str]
    mode: str

    def hide(self, key: str, value: Any) -> Any:
        """What an event carries for ``value`` of column ``key`` (redact / hash modes).

        Values of other columns, ``None`` and, in ``encrypt`` mode, every value are
        returned as they are (encryption happens at commit, with the subject's key).
        """
        if value is None or key not in self.fields or self.mode == "encrypt":
            return value
        if self.mode == "redact":
            return REDACTED
        if not _hash_key:
            raise EventConfigurationError(
                f"{self.model}.{key} is sensitive with sensitive_mode 'hash', but no hash key "
                "is set: call alchemium.events.set_sensitive_hash_key(secret) at startup",
                model=self.model,
                field=key,
            )
        text = json.dumps(plain_json(value), sort_keys=True, separators=(",", ":"))
        digest = hmac.new(_hash_key[0], text.encode(), hashlib.sha256).hexdigest()
        return HASH_PREFIX + digest


def set_sensitive_hash_key(key: bytes | None) -> None:
    """Set (or, with None, forget) the secret of ``sensitive_mode = "hash"``.

    Keep it stable: a new key gives new hashes, which no longer match the old ones.
    """
    if key is not None and (not isinstance(key, bytes) or len(key) < 16):
        raise EventConfigurationError("the sensitive hash key must be at least 16 bytes")
    _hash_key[:] = [] if key is None else [key]


def sensitive_fields(info: ModelInfo) -> SensitiveFields | None:
    """The sensitive columns ``info.model`` declares, checked; None if it declares none.

    Raises EventConfigurationError naming the model for an ``__alchemium__`` that is
    not a mapping, a ``sensitive`` entry that is not a column, or an unknown mode.
    """
    options = getattr(info.model, "__alchemium__", None) or {}
    if not isinstance(options, Mapping):
        raise EventConfigurationError(
            f"{info.name}.__alchemium__ must be a dict, got {type(options).__name__}",
            model=info.name,
        )
    declared = options.get("sensitive", ())
    if isinstance(declared, str) or not all(isinstance(n, str) for n in declared):
        raise EventConfigurationError(
            f"{info.name}: __alchemium__['sensitive'] must be a list of column names, "
            f"e.g. [{declared!r}]",
            model=info.name,
        )
    for name in declared:
        if name not in info.columns:
            raise EventConfigurationError(
                f"{info.name}: __alchemium__['sensitive'] names {name!r}, which is not a "
                f"column; columns: {', '.join(sorted(info.columns))}",
                model=info.name,
                field=name,
            )
    flagged = {key for key, column in info.columns.items() if column.info.get("sensitive")}
    fields = frozenset(declared) | flagged
    mode = options.get("sensitive_mode", "redact")
    if mode not in MODES:
        raise EventConfigurationError(
            f"{info.name}: sensitive_mode must be one of {', '.join(MODES)}, got {mode!r}",
            model=info.name,
        )
    return SensitiveFields(info.name, fields, mode) if fields else None


def register_encrypting(entity: str, fields: SensitiveFields | None) -> None:
    """Remember (or forget) that ``entity``'s change events encrypt ``fields`` at commit."""
    if fields is not None and fields.mode == "encrypt":
        _encrypting[entity] = fields
    else:
        _encrypting.pop(entity, None)


def encrypting_fields() -> Mapping[str, SensitiveFields]:
    """Entity name -> the fields its change events encrypt (read by the erasure hook)."""
    return _encrypting
