"""JSON forms of values (docs/events.md, "Column values in payloads"): encode, decode back."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import ipaddress
import json
import math
import uuid
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    PickleType,
    String,
    TypeDecorator,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.sql.type_api import TypeEngine

from alchemium import (
    EventConfigurationError,
    EventDecodeError,
    EventSerializationError,
    decode_value,
    register_encoder,
    unregister_encoder,
)
from alchemium.encoding import json_safe, python_type_of, unencodable_type
from tests.models import Money, MoneyType, money_text, parse_money


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A decorator that declares no python_type: decoded as its impl (DateTime)."""

    impl = DateTime(timezone=True)
    cache_ok = True


def encode(value: object) -> Any:
    encoded = json_safe(value, event="e", field="")
    json.dumps(encoded, allow_nan=False)  # strict JSON: what PostgreSQL JSONB accepts
    return encoded


# (column type or Python type, value, its JSON form): the table of docs/events.md.
FORMS: list[tuple[TypeEngine[Any] | type, Any, Any]] = [
    (LargeBinary(), b"\x00\xff", "AP8="),
    (LargeBinary(), b"", ""),
    (pg.BYTEA(), b"abc", "YWJj"),
    (Interval(), dt.timedelta(days=3, seconds=3723, microseconds=500000), "P3DT1H2M3.5S"),
    (Interval(), dt.timedelta(0), "PT0S"),
    (Interval(), -dt.timedelta(seconds=1), "-PT1S"),
    (Interval(), dt.timedelta.min, "-P999999999D"),
    (pg.INTERVAL(), dt.timedelta(microseconds=1), "PT0.000001S"),
    (Float(), math.inf, "Infinity"),
    (Float(), -math.inf, "-Infinity"),
    (Float(), 1.5, 1.5),
    (Numeric(), decimal.Decimal("NaN"), "NaN"),
    (Numeric(), decimal.Decimal("-Infinity"), "-Infinity"),
    (Numeric(), decimal.Decimal("12.50"), "12.50"),
    (pg.INET(), ipaddress.ip_interface("192.0.2.1/24"), "192.0.2.1/24"),
    (pg.INET(), ipaddress.ip_address("2001:db8::1"), "2001:db8::1"),
    (pg.CIDR(), ipaddress.ip_network("10.0.0.0/8"), "10.0.0.0/8"),
    (
        pg.TSRANGE(),
        pg.Range(dt.datetime(2024, 1, 1), None),
        {"lower": "2024-01-01T00:00:00", "upper": None, "bounds": "[)"},
    ),
    (
        pg.NUMRANGE(),
        pg.Range(decimal.Decimal("1.5"), decimal.Decimal("2"), bounds="(]"),
        {"lower": "1.5", "upper": "2", "bounds": "(]"},
    ),
    (pg.INT4RANGE(), pg.Range(empty=True), {"empty": True}),
    (
        pg.INT4MULTIRANGE(),
        pg.MultiRange([pg.Range(1, 3), pg.Range(5, 7)]),
        [{"lower": 1, "upper": 3, "bounds": "[)"}, {"lower": 5, "upper": 7, "bounds": "[)"}],
    ),
    (pg.ARRAY(Integer, dimensions=2), [[1, 2], [3, 4]], [[1, 2], [3, 4]]),
    (pg.ARRAY(pg.INET), [ipaddress.ip_address("10.0.0.1")], ["10.0.0.1"]),
    (pg.ARRAY(String), [], []),
    (
        pg.TIME(timezone=True),
        dt.time(12, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "12:00:00+02:00",
    ),
    (pg.UUID(), uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
    (pg.ENUM(Color, name="color"), Color.RED, "red"),
    (pg.JSONB(), {"a": [1, None]}, {"a": [1, None]}),
    (pg.HSTORE(), {"k": "v", "n": None}, {"k": "v", "n": None}),
    (pg.BIT(4), pg.BitString("1010"), "1010"),
    (pg.MONEY(), "$12.50", "$12.50"),
    (pg.MACADDR(), "08:00:2b:01:02:03", "08:00:2b:01:02:03"),
    (UTCDateTime(), dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), "2024-01-01T00:00:00+00:00"),
    (PickleType(), {"any": ["thing"]}, {"any": ["thing"]}),
    (frozenset, frozenset({3, 1, 2}), [1, 2, 3]),
    (Level, Level.HIGH, 3),
]


@pytest.mark.parametrize(("kind", "value", "form"), FORMS, ids=lambda x: repr(x)[:40])
def test_every_column_value_has_a_reversible_json_form(
    kind: TypeEngine[Any] | type, value: Any, form: Any
) -> None:
    assert encode(value) == form
    back = decode_value(kind, json.loads(json.dumps(form)))
    assert back == value or (back != back and value != value)  # NaN
    assert type(back) is type(value)


def test_nan_is_the_string_nan_and_decodes_to_nan() -> None:
    assert encode(math.nan) == "NaN"
    assert math.isnan(decode_value(Float(), "NaN"))


def test_enum_with_a_mixin_is_sent_as_its_plain_value() -> None:
    class Shade(str, enum.Enum):
        DARK = "dark"

    encoded = encode({"shade": Shade.DARK, "level": Level.HIGH})
    assert encoded == {"shade": "dark", "level": 3}
    assert type(encoded["shade"]) is str
    assert type(encoded["level"]) is int


def test_a_value_that_is_not_the_json_form_of_its_type_names_the_field() -> None:
    with pytest.raises(EventDecodeError, match=r"User\.avatar") as info:
        decode_value(LargeBinary(), "not base64!", field="User.avatar")
    assert info.value.field == "User.avatar"
    assert info.value.__cause__ is not None
    with pytest.raises(EventDecodeError, match="ISO 8601"):
        decode_value(dt.timedelta, "3 days")
    with pytest.raises(EventDecodeError):
        decode_value(Integer(), "12")


def test_a_registered_encoder_is_used_everywhere_json_is_needed(money_encoder: None) -> None:
    price = Money(1250, "EUR")
    assert encode({"price": price, "history": [price]}) == {
        "price": "1250 EUR",
        "history": ["1250 EUR"],
    }
    assert decode_value(Money, "1250 EUR") == price
    with pytest.raises(EventDecodeError, match="its decoder raised") as info:
        decode_value(Money, "1250", field="Invoice.total")  # not "cents currency"
    assert isinstance(info.value.__cause__, ValueError)
    assert unencodable_type(MoneyType()) is None


def test_without_its_encoder_a_custom_type_is_reported_with_what_to_do() -> None:
    assert unencodable_type(MoneyType()) is Money
    with pytest.raises(EventSerializationError) as info:
        encode({"lines": [{"price": Money(1, "EUR")}]})
    assert info.value.field == "lines[0].price"
    assert "register_encoder" in str(info.value)
    with pytest.raises(EventDecodeError, match="register_encoder"):
        decode_value(Money, "1 EUR")


def test_built_in_forms_cannot_be_replaced_and_registrations_do_not_clash(
    money_encoder: None,
) -> None:
    with pytest.raises(EventConfigurationError, match="built-in"):
        register_encoder(bytes, bytes.hex)
    register_encoder(Money, money_text, parse_money)  # the same again: a no-op
    with pytest.raises(EventConfigurationError, match="already registered"):
        register_encoder(Money, repr)
    with pytest.raises(EventConfigurationError, match="no encoder"):
        unregister_encoder(Color)


def test_an_encoder_that_fails_is_reported_with_its_error_as_cause() -> None:
    def broken(value: Money) -> str:
        raise ValueError("no currency")

    register_encoder(Money, broken)
    try:
        with pytest.raises(EventSerializationError, match="no currency") as info:
            encode({"price": Money(1, "EUR")})
        assert isinstance(info.value.__cause__, ValueError)
        with pytest.raises(EventDecodeError, match="without decode"):
            decode_value(Money, "1 EUR")
    finally:
        unregister_encoder(Money)


def test_unknown_python_types_are_known_only_at_runtime() -> None:
    # PickleType and user-defined types say nothing: checked by value, decoded unchanged.
    assert python_type_of(PickleType()) is None
    assert unencodable_type(PickleType()) is None
    assert decode_value(PickleType(), {"a": 1}) == {"a": 1}
    # A TypeDecorator without python_type is taken to return what its impl returns.
    assert python_type_of(UTCDateTime()) is dt.datetime
    assert python_type_of(JSON()) is None
