"""C2SP signed notes, checkpoints and cosignatures: published vectors, round trips, strict parsing
and tampering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.encoding import b64_decode, b64_encode
from crypto.errors import EncodingError, VerificationError
from crypto.keys import SigningKey
from crypto.merkle import EMPTY_ROOT
from crypto.note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    Checkpoint,
    NoteSigner,
    NoteVerifier,
    add_signatures,
    check_cosignatures,
    checkpoint_origin,
    cosign_checkpoint,
    drop_signatures,
    keep_signatures,
    sign_checkpoint,
    sign_note,
    verify_checkpoint,
    verify_cosignatures,
    verify_note,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "ledger" / "signed-notes.json").read_text(
        "utf-8"
    )
)
ORIGIN = "example.zonex/log"
ROOT = bytes(range(32))

LOG = NoteSigner(ORIGIN, SigningKey(b"\x01" * 32))
OTHER = NoteSigner(ORIGIN, SigningKey(b"\x02" * 32))
WITNESSES = [
    NoteSigner(f"witness.example/w{i}", SigningKey(bytes([0x10 + i]) * 32)) for i in range(3)
]


def _signed(size: int = 42, extensions: tuple[str, ...] = ()) -> str:
    return sign_checkpoint(Checkpoint(ORIGIN, size, ROOT, extensions), LOG)


def _go_signer() -> NoteSigner:
    # "PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>"
    _, _, name, _, material = VECTORS["go_sumdb_note"]["signer_key"].split("+", 4)
    raw = b64_decode(material)
    assert raw[0] == ALG_ED25519
    return NoteSigner(name, SigningKey(raw[1:]))


# -- published vectors ---------------------------------------------------------------------


def test_go_note_vector_reproduced_byte_for_byte() -> None:
    v = VECTORS["go_sumdb_note"]
    signer = _go_signer()
    assert signer.verifier_key() == v["verifier_key"]
    assert sign_note(v["text"], signer) == v["note"]  # Ed25519 is deterministic
    verifier = NoteVerifier.from_verifier_key(v["verifier_key"])
    assert verify_note(v["note"], verifier) == v["text"]


def test_go_note_vector_other_signatures() -> None:
    v = VECTORS["go_sumdb_note"]
    peter = NoteVerifier.from_verifier_key(v["verifier_key"])
    enoch = NoteVerifier.from_verifier_key(v["other_verifier_key"])
    both = v["note"] + v["other_signature_line"]
    assert verify_note(both, peter) == v["text"]  # an unknown key's signature is ignored
    assert verify_note(both, enoch) == v["text"]
    with pytest.raises(VerificationError, match="no signature from key"):
        verify_note(v["note"], enoch)


@pytest.mark.parametrize("index", range(len(VECTORS["go_sumdb_note"]["malformed"])))
def test_go_note_vector_malformed(index: int) -> None:
    v = VECTORS["go_sumdb_note"]
    verifier = NoteVerifier.from_verifier_key(v["verifier_key"])
    with pytest.raises(VerificationError, match="malformed note"):
        verify_note(v["malformed"][index], verifier)


def test_go_note_vector_invalid_signature() -> None:
    v = VECTORS["go_sumdb_note"]
    verifier = NoteVerifier.from_verifier_key(v["verifier_key"])
    with pytest.raises(VerificationError):
        verify_note(v["invalid_signature"], verifier)


@pytest.mark.parametrize("index", [0, 1])
def test_sum_golang_org_checkpoints(index: int) -> None:
    v = VECTORS["sum_golang_org_checkpoints"]
    case = v["notes"][index]
    verifier = NoteVerifier.from_verifier_key(v["verifier_key"])
    text = verify_note(case["note"], verifier)
    checkpoint = Checkpoint.from_body(text.encode("utf-8"))
    assert (checkpoint.size, checkpoint.root) == (case["size"], b64_decode(case["root"]))
    # its origin line is not the key name, which verify_checkpoint requires
    with pytest.raises(VerificationError, match="origin mismatch"):
        verify_checkpoint(case["note"], verifier)


@pytest.mark.parametrize("entry", VECTORS["verifier_keys"]["valid"], ids=lambda e: e["key"][:14])
def test_published_verifier_keys_parse(entry: dict[str, Any]) -> None:
    verifier = NoteVerifier.from_verifier_key(entry["key"])
    assert verifier.signature_type == entry["signature_type"]
    assert verifier.to_verifier_key() == entry["key"]


@pytest.mark.parametrize("key", VECTORS["verifier_keys"]["invalid"])
def test_published_bad_verifier_keys_refused(key: str) -> None:
    with pytest.raises(EncodingError):
        NoteVerifier.from_verifier_key(key)


def test_verifier_key_manglings_refused() -> None:
    # as golang/mod's TestNewVerifier: every proper substring and every single-byte increment
    key = VECTORS["go_sumdb_note"]["verifier_key"]
    for i in range(len(key)):
        for j in range(i + 1, len(key) + 1):
            if (i, j) != (0, len(key)):
                with pytest.raises(EncodingError):
                    NoteVerifier.from_verifier_key(key[i:j])
    for i in range(len(key)):
        mangled = key[:i] + chr(ord(key[i]) + 1) + key[i + 1 :]
        with pytest.raises(EncodingError):
            NoteVerifier.from_verifier_key(mangled)


# -- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_body_format() -> None:
    cp = Checkpoint(ORIGIN, 42, ROOT, ("ext one",))
    assert cp.body() == f"{ORIGIN}\n42\n{b64_encode(ROOT)}\next one\n".encode()
    assert Checkpoint.from_body(cp.body()) == cp
    assert Checkpoint.from_body(Checkpoint(ORIGIN, 0, EMPTY_ROOT).body()).size == 0


@pytest.mark.parametrize(
    "body",
    [
        b"o\n42\n" + b64_encode(ROOT).encode(),  # no final newline
        b"o\r\n42\r\n" + b64_encode(ROOT).encode() + b"\r\n",  # CRLF
        b"o\n42\n" + b64_encode(ROOT).encode() + b"\n\n",  # empty extension line
        b"o\n\n42\n" + b64_encode(ROOT).encode() + b"\n",  # blank line inside
        b"\n42\n" + b64_encode(ROOT).encode() + b"\n",  # empty origin
        b"o\n042\n" + b64_encode(ROOT).encode() + b"\n",  # leading zero
        b"o\n-1\n" + b64_encode(ROOT).encode() + b"\n",
        b"o\n+1\n" + b64_encode(ROOT).encode() + b"\n",
        b"o\n 1\n" + b64_encode(ROOT).encode() + b"\n",
        "o\n\u0661\n".encode() + b64_encode(ROOT).encode() + b"\n",  # non-ASCII digit
        b"o\n18446744073709551616\n" + b64_encode(ROOT).encode() + b"\n",  # 2**64
        b"o\n42\n" + b64_encode(ROOT[:31]).encode() + b"\n",  # short root
        b"o\n42\n" + b64_encode(ROOT).rstrip("=").encode() + b"\n",  # unpadded
        b"o\n42\n" + b64_encode(b"\xfb" * 32).replace("+", "-").encode() + b"\n",  # url
        b"o\n42\n" + b64_encode(ROOT)[:-2].encode() + b"x=\n",  # non-canonical bits
        b"o\n42\n",  # no root
        b"\xffo\n42\n" + b64_encode(ROOT).encode() + b"\n",  # not UTF-8
        b"o\t\n42\n" + b64_encode(ROOT).encode() + b"\n",  # control character
    ],
)
def test_checkpoint_from_body_is_strict(body: bytes) -> None:
    with pytest.raises(EncodingError):
        Checkpoint.from_body(body)


@pytest.mark.parametrize(
    "args",
    [
        ("", 1, ROOT),
        ("a\nb", 1, ROOT),
        (ORIGIN, -1, ROOT),
        (ORIGIN, 2**64, ROOT),
        (ORIGIN, 1, b"x"),
    ],
)
def test_checkpoint_refuses_bad_fields(args: tuple[Any, ...]) -> None:
    with pytest.raises(EncodingError):
        Checkpoint(*args)
    with pytest.raises(EncodingError):
        Checkpoint(ORIGIN, 1, ROOT, ("",))


def test_sign_and_verify_checkpoint_round_trip() -> None:
    for cp in (Checkpoint(ORIGIN, 0, EMPTY_ROOT), Checkpoint(ORIGIN, 2**63, ROOT, ("x", "y z"))):
        note = sign_checkpoint(cp, LOG)
        assert note.startswith(cp.body().decode() + "\n\u2014 " + ORIGIN + " ")
        assert verify_checkpoint(note, LOG.verifier()) == cp


def test_signature_line_carries_key_hash() -> None:
    note = _signed()
    blob = b64_decode(note.rsplit(" ", 1)[1].rstrip("\n"))
    assert blob[:4] == LOG.key_hash and len(blob) == 68


def test_signed_by_another_key_fails() -> None:
    note = sign_checkpoint(Checkpoint(ORIGIN, 42, ROOT), OTHER)
    with pytest.raises(VerificationError, match="no signature from key"):
        verify_checkpoint(note, LOG.verifier())


def test_other_key_claiming_our_key_hash_fails() -> None:
    body = Checkpoint(ORIGIN, 42, ROOT).body().decode()
    forged = f"{body}\n\u2014 {ORIGIN} {b64_encode(LOG.key_hash + OTHER.key.sign(body.encode()))}\n"
    with pytest.raises(VerificationError, match="bad signature"):
        verify_checkpoint(forged, LOG.verifier())


def test_a_bad_signature_rejects_even_next_to_a_good_one() -> None:
    note = _signed()
    body = note.split("\n\n")[0] + "\n"
    bad = b64_encode(LOG.key_hash + OTHER.key.sign(body.encode()))
    with pytest.raises(VerificationError, match="bad signature"):
        verify_checkpoint(note + f"\u2014 {ORIGIN} {bad}\n", LOG.verifier())


def test_origin_mismatch() -> None:
    other_log = NoteSigner("other.example/log", LOG.key)
    note = sign_checkpoint(Checkpoint("other.example/log", 42, ROOT), other_log)
    with pytest.raises(VerificationError, match="origin mismatch"):
        verify_checkpoint(note, LOG.verifier())


def test_unknown_signatures_are_ignored() -> None:
    note = _signed()
    extra = f"\u2014 someone.else {b64_encode(b'abcd' + bytes(64))}\n"
    assert verify_checkpoint(note + extra, LOG.verifier()).size == 42


def _malformed_notes() -> list[tuple[str, str]]:
    note = _signed()
    body, sig = note.split("\n\n")
    sig_line = sig  # ends with "\n"
    return [
        ("missing final newline", note[:-1]),
        ("CRLF", note.replace("\n", "\r\n")),
        ("extra blank line before signatures", body + "\n\n\n" + sig_line),
        ("blank line between signatures", note + "\n" + sig_line.replace(ORIGIN, "x", 1)),
        ("trailing blank line", note + "\n"),
        ("no signatures", body + "\n\n"),
        ("no blank line", body + "\n" + sig_line),
        ("duplicated signature line", note + sig_line),
        ("duplicated origin line", ORIGIN + "\n" + note),
        ("hyphen instead of em dash", note.replace("\u2014", "-")),
        ("en dash instead of em dash", note.replace("\u2014", "\u2013")),
        ("two spaces after the dash", note.replace("\u2014 ", "\u2014  ")),
        ("bad base64", note.replace(sig_line.split(" ")[2], "!!!!\n")),
        ("unpadded base64", note.replace("=\n", "\n")),
        ("short signature", note.replace(sig_line.split(" ")[2], "AAAA\n")),
        ("name with a plus", note.replace(f"\u2014 {ORIGIN}", "\u2014 a+b")),
        ("tab in a line", note.replace(ORIGIN, ORIGIN + "\t", 1)),
        ("text only", body + "\n"),
        ("empty", ""),
        ("wrong name", note.replace(f"\u2014 {ORIGIN}", "\u2014 wrong.example/log")),
        ("too many signatures", note + "".join(f"\u2014 n{i} AAAAAAA=\n" for i in range(100))),
    ]


@pytest.mark.parametrize("case", _malformed_notes(), ids=lambda c: c[0])
def test_strict_note_parse_failures(case: tuple[str, str]) -> None:
    with pytest.raises(VerificationError):
        verify_checkpoint(case[1], LOG.verifier())


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_byte_fails(data: st.DataObject) -> None:
    raw = bytearray(_signed(7, ("ext",)).encode("utf-8"))
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != raw[index]), label="value")
    raw[index] = value
    try:
        note = raw.decode("utf-8")
    except UnicodeDecodeError:
        return  # not text at all, so never a note
    with pytest.raises(VerificationError):
        verify_checkpoint(note, LOG.verifier())


# -- keys ----------------------------------------------------------------------------------


def test_verifier_key_round_trip() -> None:
    text = LOG.verifier_key()
    name, key_hash, material = text.split("+", 2)
    assert (name, key_hash) == (ORIGIN, LOG.key_hash.hex())
    assert b64_decode(material) == b"\x01" + LOG.key.public_key.raw
    verifier = NoteVerifier.from_verifier_key(text)
    assert verifier == LOG.verifier()
    assert verifier.to_verifier_key() == text
    assert verifier.key_hash == LOG.key_hash


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k.upper(),
        lambda k: k + "\n",
        lambda k: " " + k,
        lambda k: k.replace("+", "+0", 1),
        lambda k: k.replace(ORIGIN, "wrong.example/log"),
        lambda k: k.rsplit("+", 1)[0],
        lambda k: k + "+extra",
    ],
)
def test_verifier_key_parse_is_strict(mangle: Any) -> None:
    with pytest.raises(EncodingError):
        NoteVerifier.from_verifier_key(mangle(LOG.verifier_key()))


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\u00a0b", "a\u2003b", "a\nb", "a\x01b"])
def test_bad_key_names(name: str) -> None:
    with pytest.raises(EncodingError):
        NoteSigner(name, LOG.key)


def test_key_hash_definition() -> None:
    import hashlib

    pub = LOG.key.public_key.raw
    assert LOG.key_hash == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + pub).digest()[:4]
    assert (
        LOG.cosignature_key_hash == hashlib.sha256(ORIGIN.encode() + b"\n\x04" + pub).digest()[:4]
    )


# -- cosignatures --------------------------------------------------------------------------


def _cosigned(count: int = 3, timestamp: int = 1_700_000_000) -> str:
    note = _signed()
    for witness in WITNESSES[:count]:
        note = cosign_checkpoint(note, witness, timestamp)
    return note


def _witness_verifiers() -> list[NoteVerifier]:
    return [w.verifier() for w in WITNESSES]


def test_cosignature_line_format() -> None:
    note = cosign_checkpoint(_signed(), WITNESSES[0], 1679315147)
    line = note.rstrip("\n").rsplit("\n", 1)[1]
    name, blob_text = line.removeprefix("\u2014 ").split(" ")
    blob = b64_decode(blob_text)
    assert name == WITNESSES[0].name and len(blob) == 76
    assert blob[:4] == WITNESSES[0].cosignature_key_hash
    assert int.from_bytes(blob[4:12], "big") == 1679315147
    message = b"cosignature/v1\ntime 1679315147\n" + Checkpoint(ORIGIN, 42, ROOT).body()
    WITNESSES[0].key.public_key.verify(message, blob[12:])


def test_cosignatures_k_of_n() -> None:
    note = _cosigned(2)
    report = check_cosignatures(note, LOG.verifier(), _witness_verifiers(), 2)
    assert report.ok
    assert [c.name for c in report.verified] == [w.name for w in WITNESSES[:2]]
    assert report.verified[0].timestamp == 1_700_000_000
    assert report.missing == (WITNESSES[2].name,) and report.invalid == ()
    assert report.checkpoint.size == 42
    assert not check_cosignatures(note, LOG.verifier(), _witness_verifiers(), 3).ok
    assert verify_cosignatures(note, LOG.verifier(), _witness_verifiers(), 2).size == 42
    with pytest.raises(VerificationError, match="2 of the 3 required"):
        verify_cosignatures(note, LOG.verifier(), _witness_verifiers(), 3)
    # the log's own verification ignores the cosignature lines
    assert verify_checkpoint(note, LOG.verifier()).size == 42


def test_cosignature_over_other_checkpoint_is_invalid() -> None:
    honest = cosign_checkpoint(_signed(43), WITNESSES[0], 5)
    stolen_line = honest.rstrip("\n").rsplit("\n", 1)[1] + "\n"
    note = _signed(42) + stolen_line
    report = check_cosignatures(note, LOG.verifier(), _witness_verifiers(), 1)
    assert not report.ok and report.invalid == (WITNESSES[0].name,)


def test_cosignature_with_changed_timestamp_is_invalid() -> None:
    note = cosign_checkpoint(_signed(), WITNESSES[0], 5)
    head, line = note.rstrip("\n").rsplit("\n", 1)
    name, blob_text = line.removeprefix("\u2014 ").split(" ")
    blob = bytearray(b64_decode(blob_text))
    blob[11] ^= 1
    tampered = f"{head}\n\u2014 {name} {b64_encode(bytes(blob))}\n"
    report = check_cosignatures(tampered, LOG.verifier(), _witness_verifiers(), 1)
    assert report.invalid == (WITNESSES[0].name,)


def test_cosignatures_need_a_valid_log_signature() -> None:
    note = cosign_checkpoint(sign_checkpoint(Checkpoint(ORIGIN, 42, ROOT), OTHER), WITNESSES[0], 1)
    with pytest.raises(VerificationError, match="no signature from key"):
        check_cosignatures(note, LOG.verifier(), _witness_verifiers(), 1)


def test_witness_configuration_checks() -> None:
    note = _cosigned(1)
    same_key = NoteVerifier("alias.example/w", WITNESSES[0].key.public_key)
    with pytest.raises(ValueError, match="distinct"):
        check_cosignatures(note, LOG.verifier(), [WITNESSES[0].verifier(), same_key], 2)
    with pytest.raises(ValueError, match="threshold"):
        check_cosignatures(note, LOG.verifier(), _witness_verifiers(), 4)
    with pytest.raises(EncodingError):
        cosign_checkpoint(note, WITNESSES[0], 2)  # already cosigned
    with pytest.raises(EncodingError):
        cosign_checkpoint(_signed(), WITNESSES[0], -1)
    with pytest.raises(EncodingError):
        cosign_checkpoint(_signed(), WITNESSES[0], 2**63)


def test_cosignature_form_verifier_key() -> None:
    witness = WITNESSES[0]
    cosigner = NoteVerifier(witness.name, witness.key.public_key, signature_type=ALG_COSIGNATURE_V1)
    text = cosigner.to_verifier_key()
    assert text.split("+")[1] == witness.cosignature_key_hash.hex()
    parsed = NoteVerifier.from_verifier_key(text)
    assert parsed == cosigner
    assert check_cosignatures(_cosigned(1), LOG.verifier(), [parsed], 1).ok
    with pytest.raises(VerificationError, match="cosignature key"):
        verify_checkpoint(_signed(), parsed)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_flipped_byte_in_a_cosignature_line_invalidates_it(data: st.DataObject) -> None:
    note = _cosigned(1)
    head = _signed()
    raw = bytearray(note.encode("utf-8"))
    index = data.draw(st.integers(len(head.encode("utf-8")), len(raw) - 2), label="index")
    raw[index] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[index]), label="value")
    try:
        tampered = raw.decode("utf-8")
        report = check_cosignatures(tampered, LOG.verifier(), _witness_verifiers(), 1)
    except (UnicodeDecodeError, VerificationError):
        return
    assert not report.ok


# -- witness keys and moving signature lines --------------------------------------------------


def test_a_witness_publishes_its_cosignature_key_with_type_0x04() -> None:
    witness = WITNESSES[0]
    vkey = witness.cosignature_verifier_key()
    name, key_hash, material = vkey.split("+", 2)
    assert name == witness.name and key_hash == witness.cosignature_key_hash.hex()
    assert b64_decode(material) == bytes([ALG_COSIGNATURE_V1]) + witness.key.public_key.raw
    parsed = NoteVerifier.from_verifier_key(vkey)
    assert parsed == witness.cosignature_verifier()
    note = cosign_checkpoint(_signed(), witness, 1_700_000_000)
    assert check_cosignatures(note, LOG.verifier(), [parsed], 1).ok


def test_checkpoint_origin_reads_the_origin_of_a_well_formed_note_only() -> None:
    assert checkpoint_origin(_signed()) == ORIGIN
    unverified = sign_checkpoint(Checkpoint(ORIGIN, 42, ROOT), OTHER)
    assert checkpoint_origin(unverified) == ORIGIN  # nothing is verified
    for bad in ("", "no blank line\n", "o\n1\n\n— o AAAA\n", "o\nx\nroot\n\n— o QUJDREVG\n"):
        with pytest.raises(VerificationError, match="malformed note"):
            checkpoint_origin(bad)


def test_keep_drop_and_add_signature_lines() -> None:
    log, w0, w1 = LOG.verifier(), WITNESSES[0].cosignature_verifier(), WITNESSES[1].verifier()
    note = _signed()
    for i, witness in enumerate(WITNESSES):
        note = cosign_checkpoint(note, witness, 1_700_000_000 + i)
    assert keep_signatures(note, [log]) == _signed()
    kept = keep_signatures(note, [log, w0, w1])  # a 0x01 key matches its cosignatures too
    assert check_cosignatures(kept, log, [w0, w1], 2).ok
    assert WITNESSES[2].name not in kept
    dropped = drop_signatures(note, [w0])
    assert WITNESSES[0].name not in dropped and WITNESSES[1].name in dropped
    with pytest.raises(VerificationError, match="no signature from key"):
        keep_signatures(note, [NoteSigner("x.test/w", SigningKey(b"\x33" * 32)).verifier()])
    with pytest.raises(VerificationError, match="no signature from key"):
        drop_signatures(_signed(), [log])
    # adding back the dropped line restores the same checks; a line already there is skipped
    line = note.splitlines()[-3]
    assert line.startswith(f"— {WITNESSES[0].name} ")
    restored = add_signatures(dropped, [line, line])
    assert restored.count(line) == 1
    assert check_cosignatures(restored, log, [w0, w1], 2).ok
    for bad in (["not a signature"], ["— name"], ["two\nlines"], ["— n AAAA"]):
        with pytest.raises(VerificationError, match="malformed note"):
            add_signatures(note, bad)
