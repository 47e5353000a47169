"""The tlog-witness wire format: round trips, the spec's example body, and malformed bodies."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.encoding import b64_decode
from exchange.server.witness.protocol import (
    MAX_PROOF_LINES,
    AddCheckpointRequest,
    ProtocolError,
    format_add_checkpoint,
    format_size,
    origin_hash,
    parse_add_checkpoint,
    parse_cosignature_lines,
    parse_size,
)

#: the example request body of c2sp.org/tlog-witness, "add-checkpoint"
SPEC_EXAMPLE = (
    "old 20852014\n"
    "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=\n"
    "jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=\n"
    "5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=\n"
    "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=\n"
    "\n"
    "example.com/behind-the-sofa\n"
    "20852163\n"
    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    "\n"
    "— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5"
    "/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
).encode()


def test_the_spec_example_parses() -> None:
    parsed = parse_add_checkpoint(SPEC_EXAMPLE)
    assert parsed.old_size == 20852014
    assert parsed.proof[0] == b64_decode("PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=")
    assert len(parsed.proof) == 4
    assert parsed.note.startswith("example.com/behind-the-sofa\n20852163\n")
    assert format_add_checkpoint(parsed.old_size, parsed.proof, parsed.note) == SPEC_EXAMPLE


@given(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.lists(st.binary(min_size=32, max_size=32), max_size=MAX_PROOF_LINES),
    st.text(min_size=1).filter(lambda t: "\x00" not in t),
)
def test_round_trip(old: int, proof: list[bytes], note: str) -> None:
    body = format_add_checkpoint(old, proof, note)
    assert parse_add_checkpoint(body) == AddCheckpointRequest(old, tuple(proof), note)


H = "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=\n"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"old 5",
        b"new 5\n\nnote\n",
        b"old 05\n\nnote\n",
        b"old -1\n\nnote\n",
        b"old 5 \n\nnote\n",
        b"old  5\n\nnote\n",
        b"old 18446744073709551616\n\nnote\n",  # 2^64
        b"old 5\n" + H.encode(),  # no empty line
        b"old 5\n\n",  # no checkpoint
        b"old 5\nnot base64!\n\nnote\n",
        b"old 5\nPlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDp\n\nnote\n",  # 30 bytes
        b"old 5\n" + H.encode().replace(b"=\n", b"\n") + b"\nnote\n",  # unpadded
        b"old 5\n" + H.encode() * (MAX_PROOF_LINES + 1) + b"\nnote\n",
        b"old 5\n\n\xff\xfe\n",
    ],
    ids=[
        "empty", "no-newline", "not-old", "leading-zero", "negative", "trailing-space",
        "two-spaces", "above-2^64-1", "no-empty-line", "no-checkpoint", "proof-not-base64",
        "proof-not-32-bytes", "proof-unpadded", "64-proof-lines", "note-not-utf8",
    ],
)  # fmt: skip
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_add_checkpoint(body)


def test_63_proof_lines_are_allowed() -> None:
    body = b"old 5\n" + H.encode() * MAX_PROOF_LINES + b"\nnote\n"
    assert len(parse_add_checkpoint(body).proof) == MAX_PROOF_LINES


def test_sizes_and_cosignature_lines() -> None:
    assert parse_size(format_size(12345)) == 12345
    for bad in (b"12", b"012\n", b"x\n", b"\n"):
        with pytest.raises(ProtocolError):
            parse_size(bad)
    assert parse_cosignature_lines("— a/b QUJD\n— c/d REVG\n".encode()) == (
        "— a/b QUJD",
        "— c/d REVG",
    )
    for bad in ("— a/b QUJD", "", "\n", "— a/b QUJD\nnot a signature\n"):
        with pytest.raises(ProtocolError):
            parse_cosignature_lines(bad.encode())


def test_origin_hash_is_lowercase_hex_sha256_of_the_origin() -> None:
    digest = origin_hash("example.com/behind-the-sofa")
    assert digest == hashlib.sha256(b"example.com/behind-the-sofa").hexdigest()
    assert digest == digest.lower() and len(digest) == 64
