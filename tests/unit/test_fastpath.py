"""The ingester's fast path never accepts what validate() rejects, and what it accepts it
accepts with the same value: same ids, type, source, timestamp (instant and offset) and
properties (down to their JSON text: -0.0 is not 0, 1.0 is not 1).

Hypothesis writes JSON text by hand, so it can say what a JSON library never would: a key
twice in any object, keys and strings escaped in every way (\\u003a for ':', lone
surrogates), integers just past 64 bits, 1e400, NaN, whitespace before colons, nesting and
sizes at each limit, and timestamps in odd offsets, on leap seconds and on Feb 30.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.cli.generate import generate_events
from services.ingester.fastpath import Valid, accept_fast, check
from services.ingester.validation import (
    DEFAULT_LIMITS,
    MAX_KEY_BYTES,
    MAX_PROPERTIES_DEPTH,
    MAX_PROPERTIES_ITEMS,
    MAX_STRING_BYTES,
    RawEvent,
    Rejection,
    validate,
)
from tests.unit.test_hostile_inputs import EVENTS, NOW, TOKENS, encode, timestamps

EXAMPLES = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def agrees(value: bytes) -> Valid | None:
    """The fast path's answer on value, after checking it against validate()'s."""
    fast = accept_fast(value, DEFAULT_LIMITS, NOW)
    slow = validate(value, DEFAULT_LIMITS, NOW)
    if fast is None:
        # Deferred: check() gives validate()'s verdict, the reason included.
        if isinstance(slow, Rejection):
            assert check(value, DEFAULT_LIMITS, NOW) == slow
        return None
    assert isinstance(slow, RawEvent), (value, slow)
    assert_same(fast, slow)
    return fast


def assert_same(fast: Valid, slow: RawEvent) -> None:
    assert (fast.event_id, fast.event_type, fast.user_id, fast.source) == (
        slow.event_id,
        slow.event_type,
        slow.user_id,
        slow.source,
    )
    # datetime == compares instants only: the offset and the digits must match too.
    assert fast.timestamp == slow.timestamp
    assert fast.timestamp.utcoffset() == slow.timestamp.utcoffset()
    assert fast.timestamp.isoformat() == slow.timestamp.isoformat()
    assert fast.properties == slow.properties
    assert fast.properties_json == orjson.dumps(slow.properties).decode()
    assert orjson.loads(fast.properties_json) == fast.properties


BASE = b'{"event_id":"e-1","event_type":"t","timestamp":"2026-11-26T14:03:07Z","user_id":"u","properties":%s}'


# ---- JSON text written by hand ------------------------------------------------------------

# Plain values most of the time, so that acceptance (the fast path's only answer that
# matters) is reached often; the hostile ones often enough to matter.
PLAIN_KEYS = st.sampled_from(["a", "b", "c", "a", "é", "😀", "source", "event_id", ":a", "k:", "a b"])
KEYS = st.one_of(
    PLAIN_KEYS,
    PLAIN_KEYS,
    st.sampled_from([":", '"', "\\", "", "\x00", "\ud800", "a\x7f", "\u2028"]),
    st.integers(MAX_KEY_BYTES - 2, MAX_KEY_BYTES + 2).map(lambda n: "k" * n),
    st.integers(MAX_KEY_BYTES // 2 - 1, MAX_KEY_BYTES // 2 + 1).map(lambda n: "é" * n),
    st.text(max_size=6),
)  # fmt: skip
PLAIN_NUMBERS = st.one_of(
    st.integers(-(2**63), 2**64 - 1).map(str),
    st.integers(-1000, 1000).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(
        ["-0", "-0.0", "1E2", "1e-400", "1.7976931348623157e308", "0.1000000000000000055511151231257827"]
    ),
)
PLAIN_STRINGS = st.one_of(
    PLAIN_KEYS, st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=10)
)
STRINGS = st.one_of(
    KEYS,
    st.sampled_from(["\u2028", "\x7f", "\x85", "a\x00b", "\udfff", ":)", '":', "\\u0000", "}", "],"]),
    st.integers(MAX_STRING_BYTES - 2, MAX_STRING_BYTES + 2).map(lambda n: "s" * n),
    st.integers(MAX_STRING_BYTES // 3 - 1, MAX_STRING_BYTES // 3 + 1).map(lambda n: "€" * n),
)  # fmt: skip
NUMBERS = st.one_of(
    st.sampled_from([
        "0", "-0", "-0.0", "0.0", "1E2", "1e+2", "1.0", "1e400", "-1e400", "1e-400", "NaN", "Infinity",
        "1.7976931348623157e308", "1.7976931348623158e308", "1.7976931348623159e308", "2.4703282292062328e-324",
        "2.4703282292062327e-324", "0.1000000000000000055511151231257827", "01", "1.", ".5", "+1",
        str(2**63 - 1), str(2**63), str(2**64 - 1), str(2**64), str(-(2**63)), str(-(2**63) - 1), "9" * 19,
        "-" + "9" * 19, "1" + "0" * 18 + ".0", "18446744073709551615.0", "9223372036854775808e0",
    ]),
    st.integers(-(2**65), 2**65).map(str),
    st.integers(-1000, 1000).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: json.dumps(f)),
)  # fmt: skip


@st.composite
def string_literal(draw: st.DrawFn, text: str) -> str:
    """text as a JSON string, escaped one of the ways a writer may (or may not) escape it."""
    style = draw(st.sampled_from(["raw", "raw", "raw", "ascii", "all", "colon"]))
    if style == "raw":
        return json.dumps(text, ensure_ascii=False)
    if style == "ascii":
        return json.dumps(text, ensure_ascii=True)
    if style == "colon":  # ':' as \u003a: a key no '":' reveals
        return json.dumps(text, ensure_ascii=False).replace(":", "\\u003a")
    units = text.encode("utf-16-le", "surrogatepass")
    return '"' + "".join(f"\\u{units[i + 1]:02x}{units[i]:02x}" for i in range(0, len(units), 2)) + '"'


COLONS = st.sampled_from([":"] * 8 + [" :", ": ", "\n\t:", " : "])
COMMAS = st.sampled_from([","] * 4 + [", ", " ,\n"])


@st.composite
def json_text(draw: st.DrawFn, depth: int = 0, plain: bool = False) -> str:
    """A JSON value as text; plain: one validate() accepts (if written without spaced
    colons), hostile: anything goes, keys given twice included."""
    kind = draw(st.integers(0, 9 if depth < 4 else 4))
    if kind <= 1:
        return draw(PLAIN_NUMBERS if plain else NUMBERS)
    if kind <= 3:
        return draw(string_literal(draw(PLAIN_STRINGS if plain else STRINGS)))
    if kind == 4:
        return draw(st.sampled_from(["true", "false", "null"]))
    if kind <= 6:
        return "[" + draw(COMMAS).join(draw(st.lists(json_text(depth + 1, plain), max_size=4))) + "]"
    keys = draw(st.lists(PLAIN_KEYS if plain else KEYS, max_size=4, unique=plain))
    return object_text(draw, [(draw(string_literal(key)), draw(json_text(depth + 1, plain))) for key in keys])


def object_text(draw: st.DrawFn, pairs: list[tuple[str, str]]) -> str:
    comma = draw(COMMAS)
    return "{" + comma.join(f"{key}{draw(COLONS)}{value}" for key, value in pairs) + "}"


@st.composite
def deep(draw: st.DrawFn) -> str:
    """Properties nested near the depth limit, in objects or arrays."""
    levels = draw(st.integers(MAX_PROPERTIES_DEPTH - 2, MAX_PROPERTIES_DEPTH + 1))
    inner = draw(json_text(depth=5))
    for _ in range(levels - 1):
        inner = draw(st.sampled_from(["[{}]", '{{"k":{}}}'])).format(inner)
    return "{" + f'"d":{inner}' + "}"


@st.composite
def many(draw: st.DrawFn) -> str:
    """Properties near the item limit (keys and elements in all)."""
    n = draw(st.integers(MAX_PROPERTIES_ITEMS - 3, MAX_PROPERTIES_ITEMS + 1))
    split = draw(st.integers(1, n - 1))
    return (
        '{"a":['
        + ",".join(["1"] * (n - split - 1))
        + '],"b":{'
        + ",".join(f'"k{i}":0' for i in range(split - 1))
        + "}}"
    )


FIELD_VALUES: dict[str, st.SearchStrategy[str]] = {
    "event_id": st.one_of(st.just('"e-1"'), STRINGS.flatmap(string_literal), NUMBERS),
    "event_type": st.one_of(st.sampled_from(['"page_view"', '"a.b:c-d_e"', '"_x"', '"' + "t" * 65 + '"']), STRINGS.flatmap(string_literal)),
    "timestamp": st.one_of(timestamps().map(lambda t: json.dumps(t) if isinstance(t, str) else "null"), st.sampled_from([
        '"2026-11-26T14:03:60Z"', '"2026-02-30T14:03:07Z"', '"2024-02-29T23:59:59.999999999-23:59"',
        '"2026-11-26t14:03:07z"', '"2026-11-26T14:03:07.1234567890Z"', '"2026-11-26T14:03:07"',
        '"1999-12-31T23:59:59.999999Z"', '"2000-01-01T00:00:00Z"', '"2026-11-27T14:59:59.999999999Z"',
        '"2026-11-27T15:00:00.000001Z"', '"2026-11-26T14:03:07+14:00"', '"2026-11-26T14:03:07\\u002b01:00"',
    ])),
    "user_id": st.one_of(st.just('"u1"'), STRINGS.flatmap(string_literal)),
    "properties": st.one_of(json_text(depth=1), deep(), many(), st.just('{"a":1}')),
    "source": st.one_of(st.sampled_from(['"web"', "null", '"x" ', '"Web"', '"' + "s" * 64 + '"']), STRINGS.flatmap(string_literal)),
    "extra": st.just("1"),
}  # fmt: skip


@st.composite
def raw_events(draw: st.DrawFn) -> bytes:
    """An event object, its fields in any order, one possibly twice, one possibly missing."""
    names = ["event_id", "event_type", "timestamp", "user_id", "properties"]
    names += draw(st.sampled_from([[]] * 4 + [["source"]] * 4 + [["extra"]]))
    if draw(st.integers(0, 9)) == 0:
        names.remove(draw(st.sampled_from(names)))
    if draw(st.integers(0, 7)) == 0:
        names.append(draw(st.sampled_from(names)))
    names = draw(st.permutations(names))
    # At most one field drawn from its hostile values, the others good.
    changed = draw(st.sampled_from([*names, None]))
    pairs = [
        (draw(string_literal(name)), draw(FIELD_VALUES[name]) if name == changed else GOOD[name])
        for name in names
    ]
    return object_text(draw, pairs).encode("utf-8", "surrogatepass")


GOOD = {
    "event_id": '"e-1"',
    "event_type": '"page_view"',
    "timestamp": '"2026-11-26T15:03:07.123+01:00"',
    "user_id": '"u1"',
    "properties": '{"page":"/","cart":{"items":[1,2.5,null,true,-0.0,1E2]}}',
    "source": '"web"',
    "extra": "1",
}


@EXAMPLES
@given(raw_events())
def test_hand_written_events(value: bytes) -> None:
    agrees(value)


@st.composite
def properties_text(draw: st.DrawFn) -> bytes:
    plain = draw(st.booleans())
    keys = draw(st.lists(PLAIN_KEYS if plain else KEYS, max_size=6, unique=plain))
    pairs = [(draw(string_literal(key)), draw(json_text(1, plain))) for key in keys]
    return object_text(draw, pairs).encode("utf-8", "surrogatepass")


@EXAMPLES
@given(properties_text())
def test_any_properties(properties: bytes) -> None:
    agrees(BASE % properties)


# ---- the hostile strategies validate() is tested with -----------------------------------


@EXAMPLES
@given(EVENTS, st.booleans(), st.one_of(st.none(), st.sampled_from(["event_id", "source", "properties"])))
def test_hostile_events(event: dict[str, Any], ascii_only: bool, repeat: str | None) -> None:
    agrees(encode(event, ascii_only, repeat))


@EXAMPLES
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join))
def test_json_shaped_token_soup(value: bytes) -> None:
    agrees(value)


@EXAMPLES
@given(st.binary(max_size=300))
def test_arbitrary_bytes(value: bytes) -> None:
    agrees(value)


# ---- examples ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "properties",
    [
        b'{"k":"\\u003a","k":"\\u003a"}',  # the repeated key hidden by ':' strings written as escapes
        b'{"k":":","k":":"}',
        b'{"a":{"b":1,"b":2}}',
        b'{"a" :1,"a":2}',
        b'{"n":18446744073709551616}',  # orjson: a float; validate(): an int beyond 64 bits
        b'{"n":-9223372036854775809}',
        b'{"n":1e400}',
        b'{"s":"\\ud800"}',
        b'{"s":"a\\u0000b"}',
        b'{"":1}',
        b'{"' + b"k" * (MAX_KEY_BYTES + 1) + b'":1}',
        b'{"' + "é".encode() * (MAX_KEY_BYTES // 2 + 1) + b'":1}',
        b'{"s":"' + b"x" * (MAX_STRING_BYTES + 1) + b'"}',
        b'{"d":' + b"[" * MAX_PROPERTIES_DEPTH + b"]" * MAX_PROPERTIES_DEPTH + b"}",
        b'{"a":[' + b",".join([b"0"] * MAX_PROPERTIES_ITEMS) + b"]}",
    ],
)
def test_what_validate_refuses_the_fast_path_does_not_take(properties: bytes) -> None:
    value = BASE % properties
    assert isinstance(validate(value, DEFAULT_LIMITS, NOW), Rejection)
    assert accept_fast(value, DEFAULT_LIMITS, NOW) is None
    assert check(value, DEFAULT_LIMITS, NOW) == validate(value, DEFAULT_LIMITS, NOW)


@pytest.mark.parametrize(
    "properties",
    [
        b'{"n":18446744073709551615,"m":-9223372036854775808,"f":-0.0,"g":1E2,"h":1.7976931348623157e308}',
        b'{"d":' + b"[" * (MAX_PROPERTIES_DEPTH - 1) + b"]" * (MAX_PROPERTIES_DEPTH - 1) + b"}",
        b'{"a":[' + b",".join([b"0"] * (MAX_PROPERTIES_ITEMS - 1)) + b"]}",
        b'{"' + b"k" * MAX_KEY_BYTES + b'":"' + b"x" * MAX_STRING_BYTES + b'"}',
        b'{"\\u00e9":"\\ud83d\\ude00","url":"https:\\/\\/x\\/?a=1","q":"say \\"hi\\"","smiley":":)"}',
    ],
)
def test_edges_that_validate_accepts_agree(properties: bytes) -> None:
    assert isinstance(validate(BASE % properties, DEFAULT_LIMITS, NOW), RawEvent)
    agrees(BASE % properties)


def test_generated_traffic_takes_the_fast_path_with_the_same_result() -> None:
    now = datetime.now(UTC)
    valid = 0
    for generated in generate_events(2000, seed=7, start=now):
        slow = validate(generated.value, DEFAULT_LIMITS, now)
        fast = accept_fast(generated.value, DEFAULT_LIMITS, now)
        if isinstance(slow, RawEvent):
            valid += 1
            assert fast is not None, generated.value
            assert_same(fast, slow)
        else:
            assert fast is None
    assert valid > 1800


@pytest.mark.parametrize(
    "offset", [timedelta(hours=-23, minutes=-59), timedelta(0), timedelta(hours=5, minutes=30)]
)
def test_the_offset_is_kept(offset: timedelta) -> None:
    stamp = (NOW - timedelta(hours=1)).astimezone(timezone(offset)).isoformat()
    fast = agrees(BASE.replace(b"2026-11-26T14:03:07Z", stamp.encode()) % b"{}")
    assert fast is not None and fast.timestamp.utcoffset() == offset
