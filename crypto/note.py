"""C2SP signed notes, transparency-log checkpoints and witness cosignatures (Ed25519).

- signed-note: text, a blank line, then lines ``— <name> <base64(keyhash4 || signature)>``;
  Ed25519 key hash = SHA-256(name || "\\n" || 0x01 || pubkey)[:4]; verifier key string
  ``<name>+<hex keyhash>+<base64(0x01 || pubkey)>``.
- tlog-checkpoint body: origin, decimal size, base64 root hash, optional extension lines.
- tlog-cosignature/v1: key hash with algorithm byte 0x04; the signed message is
  ``cosignature/v1\\ntime <t>\\n`` + checkpoint body; the line carries
  keyhash4 || uint64 big-endian t || signature.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from crypto.encoding import b64_decode, b64_encode
from crypto.errors import EncodingError, VerificationError
from crypto.keys import SigningKey, VerifyKey

ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04
SIGNATURE_PREFIX = "\u2014 "  # em dash, space
_NAME = re.compile(r"[^\s+\u2014]+")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
MAX_NOTE_BYTES = 1 << 16


def _key_hash(name: str, alg: int, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([alg]) + public_key).digest()[:4]


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise EncodingError("key names are non-empty, with no spaces, '+' or em dash")
    return name


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> bytes:
        if not self.origin or "\n" in self.origin:
            raise EncodingError("bad origin")
        if len(self.root) != 32 or self.size < 0:
            raise EncodingError("bad size or root")
        lines = [self.origin, str(self.size), b64_encode(self.root), *self.extensions]
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def from_body(cls, body: bytes) -> Checkpoint:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EncodingError("checkpoint is not UTF-8") from exc
        if not text.endswith("\n") or "\r" in text:
            raise EncodingError("checkpoint lines must end in a single newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3 or any(line == "" for line in lines):
            raise EncodingError("checkpoint needs origin, size and root lines")
        origin, size, root = lines[:3]
        if not _DECIMAL.fullmatch(size):
            raise EncodingError("checkpoint size is not a canonical decimal")
        digest = b64_decode(root)
        if len(digest) != 32:
            raise EncodingError("checkpoint root is not 32 bytes")
        return cls(origin, int(size), digest, tuple(lines[3:]))


class NoteSigner:
    def __init__(self, name: str, key: SigningKey) -> None:
        self.name = _check_name(name)
        self.key = key
        self.key_hash = _key_hash(name, ALG_ED25519, key.public_key.raw)

    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.name, self.key.public_key)

    def verifier_key(self) -> str:
        return self.verifier().to_verifier_key()


class NoteVerifier:
    def __init__(self, name: str, key: VerifyKey) -> None:
        self.name = _check_name(name)
        self.key = key
        self.key_hash = _key_hash(name, ALG_ED25519, key.raw)
        self.cosignature_key_hash = _key_hash(name, ALG_COSIGNATURE_V1, key.raw)

    def to_verifier_key(self) -> str:
        return f"{self.name}+{self.key_hash.hex()}+{b64_encode(bytes([ALG_ED25519]) + self.key.raw)}"

    @classmethod
    def from_verifier_key(cls, text: str) -> NoteVerifier:
        parts = text.split("+")
        if len(parts) != 3:
            raise EncodingError("a verifier key is name+hash+key")
        name, hash_hex, key_b64 = parts
        if not re.fullmatch(r"[0-9a-f]{8}", hash_hex):
            raise EncodingError("verifier key hash is not 8 lowercase hex digits")
        raw = b64_decode(key_b64)
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise EncodingError("verifier key is not an Ed25519 key")
        verifier = cls(name, VerifyKey(raw[1:]))
        if verifier.key_hash.hex() != hash_hex:
            raise EncodingError("verifier key hash does not match the key")
        return verifier


@dataclass(frozen=True)
class _Signature:
    name: str
    blob: bytes


def _split_note(note: str) -> tuple[bytes, list[_Signature]]:
    if len(note.encode("utf-8")) > MAX_NOTE_BYTES:
        raise VerificationError("malformed note: too large")
    if "\r" in note or any(ord(ch) < 0x20 and ch != "\n" for ch in note):
        raise VerificationError("malformed note: control characters")
    cut = note.rfind("\n\n")
    if cut < 0 or not note.endswith("\n"):
        raise VerificationError("malformed note: no signature block")
    body = note[: cut + 1]
    signatures = []
    for line in note[cut + 2 : -1].split("\n"):
        if not line.startswith(SIGNATURE_PREFIX):
            raise VerificationError("malformed note: bad signature line")
        fields = line[len(SIGNATURE_PREFIX) :].split(" ")
        if len(fields) != 2 or not _NAME.fullmatch(fields[0]):
            raise VerificationError("malformed note: bad signature line")
        try:
            blob = b64_decode(fields[1])
        except EncodingError as exc:
            raise VerificationError("malformed note: bad signature encoding") from exc
        if len(blob) < 5:
            raise VerificationError("malformed note: short signature")
        signatures.append(_Signature(fields[0], blob))
    if not signatures:
        raise VerificationError("malformed note: no signatures")
    return body.encode("utf-8"), signatures


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> str:
    body = checkpoint.body()
    signature = signer.key.sign(body)
    line = f"{SIGNATURE_PREFIX}{signer.name} {b64_encode(signer.key_hash + signature)}\n"
    return body.decode("utf-8") + "\n" + line


def verify_checkpoint(note: str, verifier: NoteVerifier) -> Checkpoint:
    """Verify the log's signature on a checkpoint note and parse it."""
    body, signatures = _split_note(note)
    try:
        checkpoint = Checkpoint.from_body(body)
    except EncodingError as exc:
        raise VerificationError(f"malformed note: {exc}") from exc
    if checkpoint.origin != verifier.name:
        raise VerificationError("origin mismatch")
    mine = [
        s for s in signatures if s.name == verifier.name and s.blob[:4] == verifier.key_hash
    ]
    if not mine:
        raise VerificationError("no signature from key")
    for sig in mine:
        if len(sig.blob) == 68:
            try:
                verifier.key.verify(body, sig.blob[4:])
                return checkpoint
            except VerificationError:
                continue
    raise VerificationError("bad signature")


def _cosigned_message(body: bytes, timestamp: int) -> bytes:
    return b"cosignature/v1\ntime %d\n" % timestamp + body


def cosign_checkpoint(note: str, witness: NoteSigner, timestamp: int) -> str:
    """Append a witness's tlog-cosignature/v1 line to a checkpoint note."""
    body, _ = _split_note(note)
    key_hash = _key_hash(witness.name, ALG_COSIGNATURE_V1, witness.key.public_key.raw)
    signature = witness.key.sign(_cosigned_message(body, timestamp))
    blob = key_hash + struct.pack(">Q", timestamp) + signature
    return note + f"{SIGNATURE_PREFIX}{witness.name} {b64_encode(blob)}\n"


@dataclass(frozen=True)
class CosignatureReport:
    verified: tuple[str, ...]
    threshold: int

    @property
    def ok(self) -> bool:
        return len(self.verified) >= self.threshold


def check_cosignatures(
    note: str, log: NoteVerifier, witnesses: Sequence[NoteVerifier], threshold: int
) -> CosignatureReport:
    """Which of ``witnesses`` validly cosigned this (log-verified) checkpoint."""
    verify_checkpoint(note, log)
    body, signatures = _split_note(note)
    verified: list[str] = []
    for witness in witnesses:
        for sig in signatures:
            if (
                sig.name == witness.name
                and len(sig.blob) == 76
                and sig.blob[:4] == witness.cosignature_key_hash
            ):
                (timestamp,) = struct.unpack(">Q", sig.blob[4:12])
                try:
                    witness.key.verify(_cosigned_message(body, timestamp), sig.blob[12:])
                except VerificationError:
                    continue
                verified.append(witness.name)
                break
    return CosignatureReport(tuple(verified), threshold)


def verify_cosignatures(
    note: str, log: NoteVerifier, witnesses: Sequence[NoteVerifier], threshold: int
) -> None:
    report = check_cosignatures(note, log, witnesses, threshold)
    if not report.ok:
        raise VerificationError(
            f"{len(report.verified)} of {threshold} required witness cosignatures"
        )
