"""JSON forms of values: how event payloads and cursors are encoded, and decoded back.

An event looks the same to an in-process handler right after commit and to a relay
subscriber reading it back from the outbox or a broker, so payloads are converted to
plain JSON types when the event is created (:func:`json_safe`). Every type that
SQLAlchemy and its PostgreSQL and SQLite dialects return has a documented, reversible
JSON form (the table in docs/events.md): bytes become base64, durations ISO 8601,
non-finite floats the strings ``"NaN"``/``"Infinity"``/``"-Infinity"``, addresses and
networks their text, ranges ``{"lower", "upper", "bounds"}`` objects. Applications add
their own types with :func:`register_encoder`.

:func:`decode_value` is the way back, given the column type (or the Python type) the
value came from; JSON alone cannot tell a base64 string from a text. A value no
encoder knows raises EventSerializationError naming the event and the field, inside
the unit of work and before commit; :func:`unencodable_type` lets a model be checked
for such columns when it is configured, long before.

The module is over 500 lines because it owns the JSON forms both ways: they are a
public contract (consumers in other languages decode them), so the encoders, the
decoders and the registry they share stay in one place where a change to one side
is seen next to the other.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import enum
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql.ranges import AbstractMultiRange, AbstractRange
from sqlalchemy.sql import sqltypes
from sqlalchemy.sql.type_api import TypeDecorator, TypeEngine, to_instance

from alchemium.errors import EventConfigurationError, EventDecodeError, EventSerializationError

__all__ = [
    "ADDRESS_TYPES",
    "decode_value",
    "json_safe",
    "plain_json",
    "python_type_of",
    "register_encoder",
    "unencodable_type",
    "unregister_encoder",
]

Encode = Callable[[Any], Any]
Decode = Callable[[Any], Any]
_Convert = Callable[[Any, str, str], Any]  # (value, event, field) -> its JSON form

_PLAIN = frozenset({str, int, bool, type(None)})
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Addresses, interfaces and networks (PostgreSQL INET, CIDR): immutable, sent as text.
ADDRESS_TYPES = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
)


def json_safe(value: Any, *, event: str, field: str) -> Any:
    """``value`` in its JSON form (plain dicts, lists, str, int, float, bool, None).

    Raises EventSerializationError naming ``event`` and ``field`` (a path such as
    ``lines[1].sku``) for a value no built-in or registered encoder knows.
    """
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is float:
        return _float(value, event, field)
    try:
        convert = _converters[kind]
    except KeyError:
        convert = _converters[kind] = _resolve(kind)
    if convert is None:
        raise EventSerializationError(event, field, value)
    return convert(value, event, field)


# -- built-in encodings ------------------------------------------------------------------------


def _float(value: float, _event: str, _field: str) -> Any:
    if math.isfinite(value):
        return float(value)  # a plain float, also for subclasses such as numpy.float64
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _text(value: Any, _event: str, _field: str) -> str:
    return str(value)


def _str(value: str, _event: str, _field: str) -> str:
    return str.__str__(value)  # the plain text of a subclass (e.g. BitString)


def _int(value: int, _event: str, _field: str) -> int:
    return int(value)


def _isoformat(value: dt.date | dt.time, _event: str, _field: str) -> str:
    return value.isoformat()


def _duration(value: dt.timedelta, _event: str, _field: str) -> str:
    """ISO 8601 duration in days, hours, minutes and seconds: ``-P1DT2H3M4.5S``."""
    # Integer microseconds: exact, and abs(timedelta.min) would overflow.
    total = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    sign = "-" if total < 0 else ""
    seconds, micros = divmod(abs(total), 1_000_000)
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    clock = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    if seconds or micros:
        fraction = f".{micros:06d}".rstrip("0") if micros else ""
        clock += f"{seconds}{fraction}S"
    if not clock and not days:
        clock = "0S"
    return f"{sign}P{f'{days}D' if days else ''}{'T' + clock if clock else ''}"


def _base64(value: bytes | bytearray | memoryview, _event: str, _field: str) -> str:
    return base64.b64encode(value).decode("ascii")


def _enum(value: enum.Enum, event: str, field: str) -> Any:
    return json_safe(value.value, event=event, field=field)


def _sequence(value: list[Any] | tuple[Any, ...], event: str, field: str) -> list[Any]:
    return [json_safe(v, event=event, field=f"{field}[{i}]") for i, v in enumerate(value)]


def _set(value: AbstractSet[Any], event: str, field: str) -> list[Any]:
    items = [json_safe(v, event=event, field=f"{field}[]") for v in value]
    try:
        items.sort()
    except TypeError:
        # Mixed or unorderable members: any fixed order will do, sets have none.
        items.sort(key=lambda item: json.dumps(item, sort_keys=True))
    return items


def _mapping(value: Mapping[Any, Any], event: str, field: str) -> dict[str, Any]:
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise EventSerializationError(
                event, f"{field}.{key!r}", key, reason="a JSON object key must be a string"
            )
        out[key] = json_safe(item, event=event, field=f"{field}.{key}" if field else key)
    return out


def _range(value: pg.Range[Any], event: str, field: str) -> dict[str, Any]:
    if value.empty:
        return {"empty": True}
    return {
        "lower": json_safe(value.lower, event=event, field=f"{field}.lower"),
        "upper": json_safe(value.upper, event=event, field=f"{field}.upper"),
        "bounds": value.bounds,
    }


# Looked up along the MRO of a value's type, most specific class first.
_BUILTIN: dict[type, _Convert] = {
    str: _str,
    int: _int,
    float: _float,
    decimal.Decimal: _text,
    uuid.UUID: _text,
    dt.datetime: _isoformat,
    dt.date: _isoformat,
    dt.time: _isoformat,
    dt.timedelta: _duration,
    bytes: _base64,
    bytearray: _base64,
    memoryview: _base64,
    **dict.fromkeys(ADDRESS_TYPES, _text),
    enum.Enum: _enum,
    list: _sequence,
    tuple: _sequence,
    dict: _mapping,
    set: _set,
    frozenset: _set,
    pg.Range: _range,
}


# -- registered encoders -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Codec:
    encode: Encode
    decode: Decode | None


_codecs: dict[type, _Codec] = {}
_converters: dict[type, _Convert | None] = {}  # per exact type, resolved along the MRO


def register_encoder(kind: type, encode: Encode, decode: Decode | None = None) -> None:
    """Encode values of ``kind`` (and its subclasses) with ``encode`` wherever JSON is needed.

    ``encode(value)`` returns something JSON-safe (it is converted further, so it may
    return a datetime or a dict); ``decode(json_value)`` is its inverse, used by
    :func:`decode_value` and ``decode_payload``. Used by change events, custom events
    and keyset cursors. Register before the repositories of models with such columns
    are defined: they are checked then. Types with a built-in JSON form (docs/events.md)
    cannot be re-registered: consumers rely on the documented form; change one column's
    form with ``event_transform`` instead. Registering the same functions again is a
    no-op; other ones raise EventConfigurationError.
    """
    if not isinstance(kind, type) or kind is object:
        raise EventConfigurationError(f"register_encoder needs a class, got {kind!r}")
    if kind in _BUILTIN or kind in _PLAIN:
        raise EventConfigurationError(
            f"{kind.__qualname__} has a built-in JSON form (docs/events.md); use "
            "event_transform on the repository to change how one column is sent"
        )
    if not callable(encode) or (decode is not None and not callable(decode)):
        raise EventConfigurationError(
            f"register_encoder({kind.__qualname__}, ...): encode and decode must be callables"
        )
    codec = _Codec(encode, decode)
    existing = _codecs.get(kind)
    if existing is not None and existing != codec:
        raise EventConfigurationError(
            f"an encoder for {kind.__qualname__} is already registered; "
            "unregister_encoder() it first"
        )
    _codecs[kind] = codec
    _converters.clear()


def unregister_encoder(kind: type) -> None:
    """Forget the encoder registered for ``kind`` (tests, reloads); unknown types raise."""
    if _codecs.pop(kind, None) is None:
        raise EventConfigurationError(f"no encoder is registered for {kind!r}")
    _converters.clear()


def _resolve(kind: type) -> _Convert | None:
    # An Enum with a mixin (StrEnum, IntEnum) is sent as its value, not as its mixin type.
    is_enum = issubclass(kind, enum.Enum)
    for klass in kind.__mro__:
        codec = _codecs.get(klass)
        if codec is not None:
            return _registered(klass, codec)
        if is_enum and klass is not enum.Enum:
            continue
        convert = _BUILTIN.get(klass)
        if convert is not None:
            return convert
    if issubclass(kind, Mapping):
        return _mapping
    if issubclass(kind, AbstractSet):
        return _set
    return None


def _registered(kind: type, codec: _Codec) -> _Convert:
    def convert(value: Any, event: str, field: str) -> Any:
        try:
            encoded = codec.encode(value)
        except Exception as err:
            raise EventSerializationError(
                event,
                field,
                value,
                reason=f"the encoder registered for {kind.__qualname__} raised {err!r}",
            ) from err
        if type(encoded) is type(value):
            raise EventSerializationError(
                event,
                field,
                value,
                reason=f"the encoder registered for {kind.__qualname__} returned the same type",
            )
        return json_safe(encoded, event=event, field=field)

    return convert


def plain_json(value: Any) -> Any:
    """A JSON form with read-only mappings and tuples (an event's payload) as dicts and lists."""
    if isinstance(value, Mapping):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return value


# -- column types ---------------------------------------------------------------------------------


def python_type_of(kind: TypeEngine[Any]) -> type | None:
    """The Python type of values of column type ``kind``, or None when it is unknown.

    A TypeDecorator that does not declare ``python_type`` is taken to return what its
    ``impl`` returns (most normalise a datetime or encrypt a string); declare
    ``python_type`` on one that returns something else. UserDefinedType, PickleType
    and NullType have no known Python type (SQLAlchemy says ``object``, or raises
    NotImplementedError before 2.1).
    """
    kind = _implementation(kind)
    try:
        python: type = kind.python_type
    except NotImplementedError:
        return None
    return None if python is object else python


def _implementation(kind: TypeEngine[Any]) -> TypeEngine[Any]:
    """``kind``, or the implementation of a TypeDecorator with no Python type of its own.

    Not for PickleType: it stores bytes but its values are any object.
    """
    while isinstance(kind, TypeDecorator) and not isinstance(kind, sqltypes.PickleType):
        try:
            declared = kind.python_type
        except NotImplementedError:
            declared = object
        if declared is not object:
            break
        kind = kind.impl_instance
    return kind


def unencodable_type(kind: TypeEngine[Any]) -> type | None:
    """The Python type of ``kind``'s values if no encoder knows it, else None.

    None too when the Python type is unknown (see :func:`python_type_of`): such values
    are encoded by their own type when the event is built.
    """
    kind = _implementation(kind)
    if isinstance(kind, sqltypes.ARRAY):
        return unencodable_type(kind.item_type)
    if isinstance(kind, (AbstractRange, sqltypes.JSON, pg.HSTORE)):
        return None
    python = python_type_of(kind)
    if python is None or python in _PLAIN or python is float:
        return None
    if python not in _converters:
        _converters[python] = _resolve(python)
    return python if _converters[python] is None else None


# -- decoding -------------------------------------------------------------------------------------


def decode_value(kind: TypeEngine[Any] | type, value: Any, *, field: str = "") -> Any:
    """The Python value whose JSON form (as :func:`json_safe` made it) is ``value``.

    ``kind`` is the column type the value came from (``User.__table__.c.avatar.type``,
    ``LargeBinary()``) or a Python type (``bytes``, ``dt.timedelta``, a registered
    type). JSON null is None. A column type whose Python type is unknown (see
    :func:`python_type_of`) gives the JSON value back unchanged, as do JSON and HSTORE
    columns. Raises EventDecodeError (naming ``field`` if given) when ``value`` is not
    the JSON form of ``kind``, with the underlying error as ``__cause__``.
    """
    if value is None:
        return None
    if isinstance(kind, type) and issubclass(kind, TypeEngine):
        kind = to_instance(kind)
    try:
        if isinstance(kind, TypeEngine):
            return _decode_column(kind, value, field)
        return _decode_python(kind, value, field)
    except (
        ValueError,
        TypeError,
        KeyError,
        binascii.Error,
        decimal.InvalidOperation,
        OverflowError,
    ) as err:
        raise EventDecodeError(field, value, _name(kind), reason=str(err)) from err


def _name(kind: TypeEngine[Any] | type) -> str:
    return kind.__qualname__ if isinstance(kind, type) else repr(kind)


# What SQLAlchemy returns for a multirange column (a list subclass since 2.0.26, a list before).
_MULTIRANGE: type[list[Any]] = getattr(pg, "MultiRange", list)

# The Python type of the bounds of each range and multirange column type.
_RANGE_ELEMENTS: dict[type, tuple[type[TypeEngine[Any]], ...]] = {
    int: (pg.INT4RANGE, pg.INT8RANGE, pg.INT4MULTIRANGE, pg.INT8MULTIRANGE),
    decimal.Decimal: (pg.NUMRANGE, pg.NUMMULTIRANGE),
    dt.date: (pg.DATERANGE, pg.DATEMULTIRANGE),
    dt.datetime: (pg.TSRANGE, pg.TSTZRANGE, pg.TSMULTIRANGE, pg.TSTZMULTIRANGE),
}


def _decode_column(kind: TypeEngine[Any], value: Any, field: str) -> Any:
    kind = _implementation(kind)
    if isinstance(kind, sqltypes.ARRAY):
        return _decode_array(kind.item_type, value, field)
    if isinstance(kind, AbstractRange):
        element = next((py for py, cls in _RANGE_ELEMENTS.items() if isinstance(kind, cls)), None)
        if isinstance(kind, AbstractMultiRange):
            return _MULTIRANGE(_decode_range(element, r, field) for r in _json_array(value))
        return _decode_range(element, value, field)
    if isinstance(kind, pg.INET):
        # As asyncpg returns it: an interface when a prefix is given, else an address.
        text = _expect(value, str)
        return ipaddress.ip_interface(text) if "/" in text else ipaddress.ip_address(text)
    if isinstance(kind, pg.CIDR):
        return ipaddress.ip_network(_expect(value, str))
    if isinstance(kind, (sqltypes.JSON, pg.HSTORE)):
        return plain_json(value)
    python = python_type_of(kind)
    return plain_json(value) if python is None else _decode_python(python, value, field)


def _decode_array(item: TypeEngine[Any], value: Any, field: str) -> list[Any]:
    return [
        _decode_array(item, v, field)
        if isinstance(v, (list, tuple))
        else decode_value(item, v, field=field)
        for v in _json_array(value)
    ]


def _decode_range(element: type | None, value: Any, field: str) -> pg.Range[Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"a range is a JSON object, not {type(value).__name__}")
    if value.get("empty"):
        return pg.Range(empty=True)

    def bound(raw: Any) -> Any:
        return plain_json(raw) if element is None else decode_value(element, raw, field=field)

    return pg.Range(bound(value["lower"]), bound(value["upper"]), bounds=value["bounds"])


def _decode_python(kind: type, value: Any, field: str) -> Any:
    for klass in kind.__mro__:
        codec = _codecs.get(klass)
        if codec is not None:
            if codec.decode is None:
                raise EventDecodeError(
                    field,
                    value,
                    f"{kind.__qualname__} (its encoder was registered without decode=...)",
                )
            try:
                return codec.decode(value)
            except Exception as err:
                # A user's decoder may raise anything on input it does not expect.
                raise EventDecodeError(
                    field, value, kind.__qualname__, reason=f"its decoder raised {err!r}"
                ) from err
    if issubclass(kind, enum.Enum):
        return kind(value)
    if kind is bool:
        return _expect(value, bool)
    if issubclass(kind, str):
        return kind(_expect(value, str))
    if issubclass(kind, int):
        if isinstance(value, bool):
            raise TypeError("expected an integer, got a boolean")
        return kind(_expect(value, int))
    if issubclass(kind, float):
        return _decode_float(value)
    if issubclass(kind, decimal.Decimal):
        return decimal.Decimal(value if isinstance(value, str) else str(_expect(value, int, float)))
    decoder = next((_DECODERS[k] for k in kind.__mro__ if k in _DECODERS), None)
    if decoder is not None:
        return decoder(value)
    if issubclass(kind, (list, tuple, AbstractSet)):
        return kind(plain_json(_json_array(value)))  # type: ignore[call-arg]
    if issubclass(kind, Mapping):
        return plain_json(_expect(value, Mapping))
    if issubclass(kind, pg.Range):
        return _decode_range(None, value, field)
    raise EventDecodeError(
        field,
        value,
        f"{kind.__qualname__}: no decoder knows it; register one with "
        "alchemium.register_encoder(type, encode, decode)",
    )


def _decode_float(value: Any) -> float:
    if isinstance(value, str):
        return _NON_FINITE[value] if value in _NON_FINITE else float(value)
    return float(_expect(value, int, float))


_DURATION = re.compile(
    r"(-)?P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)(?:\.(\d{1,6}))?S)?)?", re.ASCII
)


def _decode_duration(value: Any) -> dt.timedelta:
    text = _expect(value, str)
    match = _DURATION.fullmatch(text)
    if match is None or text.endswith(("P", "T")):
        raise ValueError(f"{text!r} is not an ISO 8601 duration such as 'P1DT2H3M4.5S'")
    sign, days, hours, minutes, seconds, fraction = match.groups()
    total = (
        ((int(days or 0) * 24 + int(hours or 0)) * 60 + int(minutes or 0)) * 60 + int(seconds or 0)
    ) * 1_000_000 + int((fraction or "").ljust(6, "0"))
    return dt.timedelta(microseconds=-total if sign else total)


def _decode_bytes(value: Any) -> bytes:
    return base64.b64decode(_expect(value, str), validate=True)


def _from_text(parse: Callable[[str], Any]) -> Decode:
    return lambda value: parse(_expect(value, str))


_DECODERS: dict[type, Decode] = {
    **{kind: _from_text(kind) for kind in (uuid.UUID, *ADDRESS_TYPES)},
    dt.datetime: _from_text(dt.datetime.fromisoformat),
    dt.date: _from_text(dt.date.fromisoformat),
    dt.time: _from_text(dt.time.fromisoformat),
    dt.timedelta: _decode_duration,
    bytes: _decode_bytes,
    bytearray: lambda v: bytearray(_decode_bytes(v)),
    memoryview: lambda v: memoryview(_decode_bytes(v)),
}


def _json_array(value: Any) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a JSON array, got {type(value).__name__}")
    return value


def _expect(value: Any, *kinds: type) -> Any:
    if not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"expected {expected} in the JSON form, got {type(value).__name__}")
    return value
