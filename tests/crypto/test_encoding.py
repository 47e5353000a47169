"""Strict wire encodings: every value has exactly one accepted spelling.

Vectors: RFC 4648 section 10 ("f", "fo", "foo", ... "foobar").
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.encoding import b64_decode, b64_encode, b64url_decode, b64url_encode, hex_decode
from crypto.errors import EncodingError

RFC4648 = [
    (b"", "", ""),
    (b"f", "Zg==", "Zg"),
    (b"fo", "Zm8=", "Zm8"),
    (b"foo", "Zm9v", "Zm9v"),
    (b"foob", "Zm9vYg==", "Zm9vYg"),
    (b"fooba", "Zm9vYmE=", "Zm9vYmE"),
    (b"foobar", "Zm9vYmFy", "Zm9vYmFy"),
]


@pytest.mark.parametrize(("data", "std", "url"), RFC4648)
def test_rfc4648_vectors(data: bytes, std: str, url: str) -> None:
    assert b64_encode(data) == std
    assert b64_decode(std) == data
    assert b64url_encode(data) == url
    assert b64url_decode(url) == data


def test_alphabets_differ_where_they_should() -> None:
    data = bytes([0xFB, 0xFF, 0xBF])
    assert b64_encode(data) == "+/+/"
    assert b64url_encode(data) == "-_-_"


@given(st.binary(max_size=200))
def test_round_trips(data: bytes) -> None:
    assert b64url_decode(b64url_encode(data)) == data
    assert b64_decode(b64_encode(data)) == data
    assert hex_decode(data.hex()) == data
    assert hex_decode(data.hex(), len(data)) == data


@pytest.mark.parametrize(
    "text",
    [
        "Zg==",  # padding
        "Zg=",
        "Zm8=",
        "Z",  # a single leftover character encodes no byte
        "Zm9vY",
        "Zh",  # non-zero trailing bits: "Zg" is the one spelling of b"f"
        "Zm9",
        "+/+/",  # standard alphabet
        "Zm9v Yg",
        " Zm9v",
        "Zm9v\n",
        "Zm9v\t",
        "Zm9v.",
        "Zm9\u0430",  # Cyrillic a
        "\uff3a\uff47",  # full-width letters
    ],
)
def test_b64url_refuses(text: str) -> None:
    with pytest.raises(EncodingError):
        b64url_decode(text)


@pytest.mark.parametrize(
    "text",
    [
        "Zg",  # missing padding
        "Zm8",
        "Zg=",
        "Zg===",
        "Z===",
        "Zh==",  # non-zero pad bits
        "Zm9=",
        "-_-_",  # url alphabet
        "Zm9v Yg==",
        "Zm9vYg==\n",
        " Zm9v",
        "Zm9v\r\n",
        "Zm9vYg==Zg==",  # padding in the middle
        "=Zm9",
        "Zm9v\u0430",
        "Zm9v.",
    ],
)
def test_b64_refuses(text: str) -> None:
    with pytest.raises(EncodingError):
        b64_decode(text)


@pytest.mark.parametrize(
    ("text", "length"),
    [
        ("AB", None),  # uppercase
        ("aB", None),
        ("abc", None),  # odd length
        ("zz", None),
        ("00 11", None),  # whitespace between bytes
        (" 0011", None),
        ("0011\n", None),
        ("0x0011", None),
        ("\u0660\u0661", None),  # Arabic-Indic digits
        ("00", 2),
        ("0011", 1),
        ("", 32),
    ],
)
def test_hex_refuses(text: str, length: int | None) -> None:
    with pytest.raises(EncodingError):
        hex_decode(text, length)


def test_hex_length_check() -> None:
    assert hex_decode("00" * 32, 32) == bytes(32)
    assert hex_decode("") == b""


@pytest.mark.parametrize("value", [b"Zm9v", bytearray(b"Zm9v"), None, 12])
def test_decoders_take_text_only(value: object) -> None:
    for decode in (b64url_decode, b64_decode, hex_decode):
        with pytest.raises(EncodingError):
            decode(value)  # type: ignore[arg-type]


@given(st.text(max_size=24))
def test_decoders_accept_only_their_own_encoding(text: str) -> None:
    for decode, encode in (
        (b64url_decode, b64url_encode),
        (b64_decode, b64_encode),
        (hex_decode, bytes.hex),
    ):
        try:
            data = decode(text)
        except EncodingError:
            continue
        assert encode(data) == text
