"""RFC 8785 canonical JSON: the examples of the RFC, the no-float profile, strict parsing.

Vectors and their sources:
- RFC 8785 section 3.2.2 (string escaping, literals) and 3.2.3 (property sorting by UTF-16 code
  units). The 3.2.3 example already uses string values. The 3.2.2 example's ``numbers`` member is
  made of floats, which zonex refuses: the full example is checked against the ``rfc8785``
  dependency itself, and the zonex profile is checked on the same object without that member.
"""

from __future__ import annotations

import json
import random
from decimal import Decimal
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.canonical import MAX_SAFE_INTEGER, _fast_encode, canonicalize, parse_canonical
from crypto.errors import EncodingError

RFC_3_2_2_INPUT = r"""{
  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}"""
RFC_3_2_2_OUTPUT = (
    r"""{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"""
    r""""string":"€$\u000f\nA'B\"\\\\\"/"}"""
)
RFC_3_2_2_WITHOUT_NUMBERS = r"""{"literals":[null,true,false],"string":"€$\u000f\nA'B\"\\\\\"/"}"""

RFC_3_2_3_INPUT = r"""{
  "\u20ac": "Euro Sign",
  "\r": "Carriage Return",
  "\ufb33": "Hebrew Letter Dalet With Dagesh",
  "1": "One",
  "\ud83d\ude00": "Emoji: Grinning Face",
  "\u0080": "Control",
  "\u00f6": "Latin Small Letter O With Diaeresis"
}"""
RFC_3_2_3_ORDER = [
    "Carriage Return",
    "One",
    "Control",
    "Latin Small Letter O With Diaeresis",
    "Euro Sign",
    "Emoji: Grinning Face",
    "Hebrew Letter Dalet With Dagesh",
]
RFC_3_2_3_OUTPUT = (
    '{"\\r":"Carriage Return","1":"One","\u0080":"Control",'
    '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign",'
    '"\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
).encode("utf-8")


def test_rfc8785_3_2_2_full_example_through_the_dependency() -> None:
    assert rfc8785.dumps(json.loads(RFC_3_2_2_INPUT)) == RFC_3_2_2_OUTPUT.encode("utf-8")


def test_rfc8785_3_2_2_floats_are_refused_by_zonex() -> None:
    with pytest.raises(EncodingError):
        canonicalize(json.loads(RFC_3_2_2_INPUT))


def test_rfc8785_3_2_2_without_the_numbers() -> None:
    value = json.loads(RFC_3_2_2_INPUT)
    del value["numbers"]
    out = canonicalize(value)
    assert out == RFC_3_2_2_WITHOUT_NUMBERS.encode("utf-8")
    assert parse_canonical(out) == value


def test_rfc8785_3_2_3_sorting_by_utf16_code_units() -> None:
    value = json.loads(RFC_3_2_3_INPUT)
    out = canonicalize(value)
    assert out == RFC_3_2_3_OUTPUT
    assert list(json.loads(out).values()) == RFC_3_2_3_ORDER
    assert parse_canonical(out) == value


def test_code_point_order_is_not_canonical() -> None:
    # U+1F600 is D83D DE00 in UTF-16 and so sorts before U+FB33; by code point it sorts after
    value = {"\U0001f600": "a", "\ufb33": "b"}
    assert canonicalize(value) == '{"\U0001f600":"a","\ufb33":"b"}'.encode()
    with pytest.raises(EncodingError):
        parse_canonical('{"\ufb33":"b","\U0001f600":"a"}'.encode())


def test_non_ascii_keys_inside_tuples_are_sorted_like_lists() -> None:
    value = {"\U0001f600": 1, "\ufb33": 2}
    expected = rfc8785.dumps([value])
    assert canonicalize((value,)) == expected
    assert canonicalize({"k": (value,)}) == rfc8785.dumps({"k": [value]})


# -- the no-float profile ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        1.0,
        0.0,
        -0.0,
        1.5,
        float("nan"),
        float("inf"),
        float("-inf"),
        {"a": [1, 2.5]},
        [{"x": {"y": 1e30}}],
        (0.1,),
    ],
)
def test_floats_are_refused(value: Any) -> None:
    with pytest.raises(EncodingError):
        canonicalize(value)


@pytest.mark.parametrize("value", [MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 0, -1, True, False])
def test_safe_integers_are_accepted(value: int) -> None:
    assert canonicalize(value) == json.dumps(value).encode()
    assert canonicalize({"n": [value]}) == b'{"n":[%s]}' % json.dumps(value).encode()


@pytest.mark.parametrize("value", [2**53, -(2**53), 2**63, -(2**64), 10**30])
def test_integers_beyond_2_53_minus_1_are_refused(value: int) -> None:
    assert MAX_SAFE_INTEGER == 2**53 - 1
    with pytest.raises(EncodingError):
        canonicalize(value)
    with pytest.raises(EncodingError):
        canonicalize({"n": [value]})


@pytest.mark.parametrize(
    "value",
    [
        {1: "a"},
        {None: 1},
        {b"k": 1},
        {("a",): 1},
        b"bytes",
        {1, 2},
        object(),
        Decimal("1"),
        {"a": Decimal("1.5")},
    ],
)
def test_other_types_are_refused(value: Any) -> None:
    with pytest.raises(EncodingError):
        canonicalize(value)


def test_deep_nesting_is_refused() -> None:
    value: Any = []
    for _ in range(200):
        value = [value]
    with pytest.raises(EncodingError):
        canonicalize(value)
    shallow: Any = "x"
    for _ in range(20):
        shallow = {"k": [shallow]}
    assert parse_canonical(canonicalize(shallow)) == shallow


# -- strict parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"{}",
        b"[]",
        b'""',
        b"0",
        b"-1",
        b"9007199254740991",
        b"-9007199254740991",
        b"true",
        b"false",
        b"null",
        b'{"a":[1,"x",null,{}],"b":{"c":true}}',
        b'"\\u0000\\u001f\\b\\t\\n\\f\\r"',
        b'"\\"\\\\/"',
        b'"\x7f"',
        '"\u20ac\U0001f600\u2028"'.encode(),
        RFC_3_2_3_OUTPUT,
        RFC_3_2_2_WITHOUT_NUMBERS.encode(),
    ],
)
def test_canonical_bytes_are_accepted(data: bytes) -> None:
    value = parse_canonical(data)
    assert canonicalize(value) == data


@pytest.mark.parametrize(
    "data",
    [
        # insignificant whitespace
        b'{ "a":1}',
        b'{"a": 1}',
        b'{"a":1 }',
        b'{"a" :1}',
        b"[1, 2]",
        b" {}",
        b"{}\n",
        b"{}\t",
        b"\r\n[]",
        # member order and repetition
        b'{"b":1,"a":2}',
        b'{"a":1,"a":1}',
        b'{"a":1,"a":2}',
        b'{"a":{"d":1,"c":2}}',
        # escapes that are not the canonical ones
        b'"\\u00e9"',
        b'"\\u20ac"',
        b'"\\ud83d\\ude00"',
        b'"\\u0041"',
        b'"\\/"',
        b'"\\u000a"',
        b'"\\u001F"',
        b'"\\u007f"',
        # numbers
        b"1.0",
        b"1e3",
        b"1E3",
        b"0.5",
        b"-0.0",
        b"[1.5]",
        b'{"a":2.0}',
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"-0",
        b"01",
        b"+1",
        b"9007199254740992",
        b"-9007199254740992",
        b"1" + b"0" * 30,
        # not UTF-8, or not scalar values
        b'"\xff"',
        b'"\xc3"',
        b'"\xc0\xaf"',
        b'"\xed\xa0\x80"',
        b'"\\ud800"',
        b'"\\udc00"',
        b'"\\ud800x"',
        b'"\\ude00\\ud83d"',
        b"\xef\xbb\xbf{}",
        # not JSON
        b"",
        b"nul",
        b"{}x",
        b"{}{}",
        b'"\x01"',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_non_canonical_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(EncodingError):
        parse_canonical(data)


# -- properties -------------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
    | st.text(max_size=12)
    | st.sampled_from(["", "\x00", "\x1f", "\x7f", '"', "\\", "/", "\u2028", "\U0001f600"])
)
KEYS = st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=6) | st.text(max_size=4)


def json_values(sequences: Any = st.lists) -> st.SearchStrategy[Any]:
    return st.recursive(
        SCALARS,
        lambda inner: sequences(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
        max_leaves=25,
    )


@settings(max_examples=300)
@given(json_values())
def test_round_trip(value: Any) -> None:
    data = canonicalize(value)
    assert parse_canonical(data) == value
    assert data == rfc8785.dumps(value)


@settings(max_examples=500)
@given(json_values() | json_values(lambda s, **kw: st.lists(s, **kw).map(tuple)))
def test_fast_path_agrees_with_rfc8785(value: Any) -> None:
    fast = _fast_encode(value)
    if fast is not None:
        assert fast == rfc8785.dumps(value)


@given(st.dictionaries(KEYS, SCALARS, min_size=2, max_size=8), st.randoms())
def test_key_insertion_order_does_not_matter(value: dict[str, Any], rnd: random.Random) -> None:
    items = list(value.items())
    rnd.shuffle(items)
    assert canonicalize(dict(items)) == canonicalize(value)


@given(json_values(), st.integers(min_value=0), st.sampled_from([b" ", b"\n", b"\t", b"\r"]))
def test_inserted_whitespace_outside_strings_is_refused(
    value: Any, where: int, space: bytes
) -> None:
    data = canonicalize(value)
    # with strings inside, only the two ends are surely outside every string
    candidates = [0, len(data)] if b'"' in data else list(range(len(data) + 1))
    at = candidates[where % len(candidates)]
    with pytest.raises(EncodingError):
        parse_canonical(data[:at] + space + data[at:])
