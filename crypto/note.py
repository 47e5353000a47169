"""C2SP signed notes, transparency-log checkpoints and witness cosignatures, with Ed25519 keys.

- ``c2sp.org/signed-note``: a text ending in a newline, a blank line, then signature lines
  ``— <key name> <base64(4-byte key ID || signature)>``. The Ed25519 key ID is
  SHA-256(name || "\\n" || 0x01 || public key)[:4]; a verifier key is written
  ``<name>+<8 hex digits of the key ID>+<base64(0x01 || public key)>``.
- ``c2sp.org/tlog-checkpoint``: the text is the origin line, the decimal tree size, the base64
  root hash and optional non-empty extension lines.
- ``c2sp.org/tlog-cosignature`` (Ed25519, ``cosignature/v1``): the key ID uses type byte 0x04;
  the signed message is ``cosignature/v1\\ntime <t>\\n`` followed by the checkpoint text; the
  signature is 4-byte key ID || uint64 big-endian t || Ed25519 signature.

Parsing is strict: a note that another implementation might read differently is refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from crypto.encoding import b64_decode, b64_encode
from crypto.errors import EncodingError, VerificationError
from crypto.keys import SigningKey, VerifyKey

#: signature type bytes from c2sp.org/signed-note
ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04

#: the signature-line prefix: em dash (U+2014) and a space
SIGNATURE_PREFIX = "\u2014 "

#: more than the spec's minimum of 16 signatures, as many as golang.org/x/mod/sumdb/note allows
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 1 << 16
MAX_TREE_SIZE = 2**64 - 1
MAX_TIMESTAMP = 2**63 - 1

_COSIGNATURE_HEADER = b"cosignature/v1\n"
_DECIMAL = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_KEY_HASH_HEX = re.compile(r"[0-9a-f]{8}", re.ASCII)
_ED25519_SIGNATURE = 64
_COSIGNATURE_SIZE = 4 + 8 + _ED25519_SIGNATURE


def _key_hash(name: str, signature_type: int, public_key: bytes) -> bytes:
    """The 4-byte key ID recommended by c2sp.org/signed-note."""
    return hashlib.sha256(
        name.encode("utf-8") + b"\n" + bytes([signature_type]) + public_key
    ).digest()[:4]


def _bad_text(text: str) -> str | None:
    """Why ``text`` cannot appear in a note, or ``None``: UTF-8 with no control but newline."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if any(ch < " " and ch != "\n" for ch in text):
        return "control character"
    return None


def _valid_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name != ""
        and "+" not in name
        and not any(ch.isspace() or ch < " " for ch in name)
        and _bad_text(name) is None
    )


def _check_name(name: str) -> str:
    if not _valid_name(name):
        raise EncodingError("a key name is non-empty text without spaces, controls or '+'")
    return name


# -- checkpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: origin, size and root (c2sp.org/tlog-checkpoint)."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin or "\n" in self.origin:
            raise EncodingError("a checkpoint origin is one non-empty line")
        if _bad_text(self.origin) is not None:
            raise EncodingError("a checkpoint origin holds no control characters")
        if (
            not isinstance(self.size, int)
            or isinstance(self.size, bool)
            or not 0 <= self.size <= MAX_TREE_SIZE
        ):
            raise EncodingError("a checkpoint size is an integer in 0..2**64-1")
        if not isinstance(self.root, bytes) or len(self.root) != 32:
            raise EncodingError("a checkpoint root is 32 bytes")
        if not isinstance(self.extensions, tuple):
            raise EncodingError("checkpoint extensions are a tuple of lines")
        for line in self.extensions:
            if not isinstance(line, str) or not line or "\n" in line or _bad_text(line):
                raise EncodingError("a checkpoint extension is one non-empty line of text")

    def body(self) -> bytes:
        """The note text: origin, size, base64 root, extensions, each ending in a newline."""
        lines = [self.origin, str(self.size), b64_encode(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines).encode("utf-8")

    @classmethod
    def from_body(cls, body: bytes) -> Checkpoint:
        """Parse a checkpoint text strictly; raise :class:`EncodingError` on any deviation."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EncodingError("checkpoint is not UTF-8") from exc
        problem = _bad_text(text)
        if problem is not None:
            raise EncodingError(f"checkpoint text: {problem}")
        if not text.endswith("\n"):
            raise EncodingError("checkpoint text does not end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise EncodingError("checkpoint needs origin, size and root lines")
        if any(line == "" for line in lines):
            raise EncodingError("checkpoint has an empty line")
        origin, size_text, root_text = lines[:3]
        if not _DECIMAL.fullmatch(size_text):
            raise EncodingError("checkpoint size is not a decimal without leading zeros")
        size = int(size_text)
        if size > MAX_TREE_SIZE:
            raise EncodingError("checkpoint size exceeds 2**64-1")
        root = b64_decode(root_text)
        if len(root) != 32:
            raise EncodingError("checkpoint root is not 32 bytes")
        return cls(origin, size, root, tuple(lines[3:]))


# -- keys ----------------------------------------------------------------------------------


class NoteVerifier:
    """A trusted (name, Ed25519 public key) pair.

    ``signature_type`` is 0x01 for a key that signs notes (a log) and 0x04 for a key given in
    cosignature form; either can check witness cosignatures, only 0x01 verifies note signatures.
    """

    __slots__ = ("cosignature_key_hash", "key", "key_hash", "name", "signature_type")

    def __init__(self, name: str, key: VerifyKey, *, signature_type: int = ALG_ED25519) -> None:
        if signature_type not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise EncodingError("only Ed25519 (0x01) and cosignature/v1 (0x04) keys are supported")
        self.name = _check_name(name)
        self.key = key
        self.signature_type = signature_type
        self.key_hash = _key_hash(name, signature_type, key.raw)
        self.cosignature_key_hash = _key_hash(name, ALG_COSIGNATURE_V1, key.raw)

    def to_verifier_key(self) -> str:
        """``<name>+<hex key ID>+<base64(type || public key)>``."""
        material = b64_encode(bytes([self.signature_type]) + self.key.raw)
        return f"{self.name}+{self.key_hash.hex()}+{material}"

    @classmethod
    def from_verifier_key(cls, text: str) -> NoteVerifier:
        """Parse a verifier key string strictly; raise :class:`EncodingError` otherwise."""
        if not isinstance(text, str):
            raise EncodingError("a verifier key is text")
        # the key material is base64 and may itself contain '+': split at the first two only
        name, sep1, rest = text.partition("+")
        hash_hex, sep2, material = rest.partition("+")
        if not sep1 or not sep2:
            raise EncodingError("a verifier key is <name>+<key id>+<key>")
        if not _valid_name(name):
            raise EncodingError("verifier key has an invalid name")
        if not _KEY_HASH_HEX.fullmatch(hash_hex):
            raise EncodingError("verifier key id is not 8 lowercase hex digits")
        raw = b64_decode(material)
        if len(raw) != 33 or raw[0] not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise EncodingError("verifier key is not an Ed25519 key")
        verifier = cls(name, VerifyKey(raw[1:]), signature_type=raw[0])
        if verifier.key_hash.hex() != hash_hex:
            raise EncodingError("verifier key id does not match the key")
        return verifier

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, NoteVerifier)
            and other.name == self.name
            and other.key == self.key
            and other.signature_type == self.signature_type
        )

    def __hash__(self) -> int:
        return hash((self.name, self.key.raw, self.signature_type))

    def __repr__(self) -> str:
        return f"NoteVerifier({self.name!r}, {self.key_hash.hex()})"


class NoteSigner:
    """A named Ed25519 signing key for notes (a log) or cosignatures (a witness)."""

    __slots__ = ("cosignature_key_hash", "key", "key_hash", "name")

    def __init__(self, name: str, key: SigningKey) -> None:
        self.name = _check_name(name)
        self.key = key
        self.key_hash = _key_hash(name, ALG_ED25519, key.public_key.raw)
        self.cosignature_key_hash = _key_hash(name, ALG_COSIGNATURE_V1, key.public_key.raw)

    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.name, self.key.public_key)

    def verifier_key(self) -> str:
        """The verifier key string to hand to those who check this signer's notes."""
        return self.verifier().to_verifier_key()

    def cosignature_verifier(self) -> NoteVerifier:
        """The verifier of this signer's cosignatures, in cosignature form (type 0x04)."""
        return NoteVerifier(self.name, self.key.public_key, signature_type=ALG_COSIGNATURE_V1)

    def cosignature_verifier_key(self) -> str:
        """A witness's vkey, ``<name>+<hex key ID>+<base64(0x04 || public key)>``
        (c2sp.org/tlog-cosignature, "Format"): what a log and its auditors configure."""
        return self.cosignature_verifier().to_verifier_key()

    def __repr__(self) -> str:  # never print the key
        return f"NoteSigner({self.name!r}, {self.key_hash.hex()})"


# -- notes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Signature:
    name: str
    key_hash: bytes
    signature: bytes


def _split_note(note: str) -> tuple[str, list[_Signature]]:
    """Split a signed note into its text and signature lines; check syntax only."""

    def malformed(why: str) -> VerificationError:
        return VerificationError(f"malformed note: {why}")

    if not isinstance(note, str):
        raise malformed("not text")
    problem = _bad_text(note)
    if problem is not None:
        raise malformed(problem)
    if len(note.encode("utf-8")) > MAX_NOTE_BYTES:
        raise malformed("too large")
    # the text is separated from the signatures by the last blank line
    cut = note.rfind("\n\n")
    if cut < 0:
        raise malformed("no blank line before the signatures")
    text, block = note[: cut + 1], note[cut + 2 :]
    if not block or not block.endswith("\n"):
        raise malformed("signature lines must end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise malformed(f"more than {MAX_SIGNATURES} signatures")
    if len(set(lines)) != len(lines):
        raise malformed("duplicated signature line")
    signatures = []
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise malformed("a signature line must start with an em dash and a space")
        name, space, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
        if not space or not _valid_name(name):
            raise malformed("bad key name in a signature line")
        try:
            blob = b64_decode(encoded)
        except EncodingError as exc:
            raise malformed("signature is not canonical standard base64") from exc
        if len(blob) < 5:
            raise malformed("signature too short")
        signatures.append(_Signature(name, blob[:4], blob[4:]))
    return text, signatures


def _ed25519_only(verifier: NoteVerifier) -> None:
    if verifier.signature_type != ALG_ED25519:
        raise VerificationError("a cosignature key cannot verify note signatures")


def _check_signatures(text: str, signatures: list[_Signature], verifier: NoteVerifier) -> None:
    mine = [s for s in signatures if s.name == verifier.name and s.key_hash == verifier.key_hash]
    if not mine:
        raise VerificationError("no signature from key")
    message = text.encode("utf-8")
    for sig in mine:
        # a failing signature from a known key rejects the whole note (c2sp signed-note)
        try:
            verifier.key.verify(message, sig.signature)
        except VerificationError as exc:
            raise VerificationError("bad signature") from exc


def _signature_line(name: str, blob: bytes) -> str:
    return f"{SIGNATURE_PREFIX}{name} {b64_encode(blob)}\n"


def sign_note(text: str, signer: NoteSigner) -> str:
    """Sign ``text`` (which must end in a newline) as a note with one signature."""
    if not isinstance(text, str) or not text.endswith("\n") or _bad_text(text) is not None:
        raise EncodingError("note text is UTF-8 ending in a newline, with no other controls")
    signature = signer.key.sign(text.encode("utf-8"))
    return text + "\n" + _signature_line(signer.name, signer.key_hash + signature)


def verify_note(note: str, verifier: NoteVerifier) -> str:
    """Verify ``verifier``'s signature on a note and return the note text.

    Signatures from other keys are ignored; raise :class:`VerificationError` ("malformed note",
    "no signature from key", "bad signature") otherwise.
    """
    _ed25519_only(verifier)
    text, signatures = _split_note(note)
    _check_signatures(text, signatures, verifier)
    return text


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> str:
    """The signed checkpoint note."""
    return sign_note(checkpoint.body().decode("utf-8"), signer)


def _parse_checkpoint_note(note: str) -> tuple[str, list[_Signature], Checkpoint]:
    text, signatures = _split_note(note)
    try:
        checkpoint = Checkpoint.from_body(text.encode("utf-8"))
    except EncodingError as exc:
        raise VerificationError(f"malformed note: {exc}") from exc
    return text, signatures, checkpoint


def checkpoint_origin(note: str) -> str:
    """The origin line of a checkpoint note, read *before* any signature is verified.

    Only for choosing the keys to verify the note with (a witness trusts keys per origin,
    c2sp.org/tlog-witness "add-checkpoint"); nothing else of an unverified note may be used.
    Raises :class:`VerificationError` ("malformed note: ...") for a note or checkpoint text
    that does not parse strictly.
    """
    _, _, checkpoint = _parse_checkpoint_note(note)
    return checkpoint.origin


def verify_checkpoint(note: str, verifier: NoteVerifier) -> Checkpoint:
    """Verify the log's signature on a checkpoint note and return the checkpoint.

    Raises :class:`VerificationError` whose message starts with "malformed note",
    "origin mismatch", "no signature from key" or "bad signature".
    """
    _ed25519_only(verifier)
    text, signatures, checkpoint = _parse_checkpoint_note(note)
    # the origin is read before the signature is checked only to name the fault precisely;
    # nothing from the note is returned unless the signature verifies
    if checkpoint.origin != verifier.name:
        raise VerificationError(
            f"origin mismatch: checkpoint from {checkpoint.origin!r}, expected {verifier.name!r}"
        )
    _check_signatures(text, signatures, verifier)
    return checkpoint


# -- cosignatures --------------------------------------------------------------------------


def _cosigned_message(text: str, timestamp: int) -> bytes:
    return _COSIGNATURE_HEADER + b"time %d\n" % timestamp + text.encode("utf-8")


def cosign_checkpoint(note: str, witness: NoteSigner, timestamp: int) -> str:
    """Append ``witness``'s cosignature/v1 line (made at ``timestamp``) to a checkpoint note.

    The witness is trusted to have checked the log's signature and consistency first.
    """
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise EncodingError("a cosignature timestamp is an integer")
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise EncodingError("a cosignature timestamp is in 0..2**63-1")
    text, signatures, _ = _parse_checkpoint_note(note)
    if any(
        s.name == witness.name and s.key_hash == witness.cosignature_key_hash for s in signatures
    ):
        raise EncodingError("the note already carries a cosignature from this witness")
    signature = witness.key.sign(_cosigned_message(text, timestamp))
    blob = witness.cosignature_key_hash + timestamp.to_bytes(8, "big") + signature
    return note + _signature_line(witness.name, blob)


@dataclass(frozen=True)
class Cosignature:
    """A witness cosignature that verified."""

    name: str
    timestamp: int


@dataclass(frozen=True)
class CosignatureReport:
    """Which of the configured witnesses cosigned a verified checkpoint.

    ``invalid`` names witnesses with a cosignature line that did not verify; ``missing`` those
    with none. ``ok`` is true when at least ``threshold`` witnesses verified.
    """

    checkpoint: Checkpoint
    verified: tuple[Cosignature, ...]
    invalid: tuple[str, ...]
    missing: tuple[str, ...]
    threshold: int
    ok: bool


def _check_witness(text: str, signatures: list[_Signature], witness: NoteVerifier) -> int | None:
    """The verified timestamp, ``None`` if the witness has no line; raise if any line is bad."""
    lines = [
        s
        for s in signatures
        if s.name == witness.name and s.key_hash == witness.cosignature_key_hash
    ]
    if not lines:
        return None
    latest = -1
    for sig in lines:
        if len(sig.signature) != _COSIGNATURE_SIZE - 4:
            raise VerificationError("cosignature has the wrong length")
        timestamp = int.from_bytes(sig.signature[:8], "big")
        if timestamp > MAX_TIMESTAMP:
            raise VerificationError("cosignature timestamp exceeds 2**63-1")
        witness.key.verify(_cosigned_message(text, timestamp), sig.signature[8:])
        latest = max(latest, timestamp)
    return latest


@dataclass(frozen=True)
class CosignerResult:
    """What one witness's cosignature lines on a checkpoint note show.

    ``timestamp`` is the latest timestamp when the witness has lines and every one verified;
    ``problem`` says why one did not. Both are ``None`` when the note has no line from it.
    """

    timestamp: int | None
    problem: str | None

    @property
    def verified(self) -> bool:
        return self.timestamp is not None


def check_cosigners(note: str, witnesses: Sequence[NoteVerifier]) -> tuple[CosignerResult, ...]:
    """Check each of ``witnesses``' cosignature lines on a checkpoint note, in the order given.

    This checks the note's syntax but not the log's signature: verify that first (with
    :func:`verify_checkpoint`). Lines from other keys are ignored. Raises
    :class:`VerificationError` ("malformed note") only for a note that cannot be parsed.
    """
    text, signatures, _ = _parse_checkpoint_note(note)
    results = []
    for witness in witnesses:
        try:
            timestamp = _check_witness(text, signatures, witness)
        except VerificationError as exc:
            results.append(CosignerResult(None, str(exc)))
        else:
            results.append(CosignerResult(timestamp, None))
    return tuple(results)


def check_cosignatures(
    note: str, log: NoteVerifier, witnesses: Sequence[NoteVerifier], threshold: int
) -> CosignatureReport:
    """Verify the log's signature, then report which ``witnesses`` cosigned the checkpoint.

    Raises :class:`VerificationError` if the log's own signature does not verify, and
    ``ValueError`` for a configuration that could count one witness twice (repeated public
    keys) or a threshold outside ``0..len(witnesses)``.
    """
    keys = [w.key.raw for w in witnesses]
    if len(set(keys)) != len(keys):
        # the Ed25519 cosigned message does not name the witness: one key is one witness
        raise ValueError("witnesses must have distinct public keys")
    if isinstance(threshold, bool) or not 0 <= threshold <= len(witnesses):
        raise ValueError(f"threshold must be in 0..{len(witnesses)}")
    checkpoint = verify_checkpoint(note, log)
    text, signatures = _split_note(note)
    verified: list[Cosignature] = []
    invalid: list[str] = []
    missing: list[str] = []
    for witness in witnesses:
        try:
            timestamp = _check_witness(text, signatures, witness)
        except VerificationError:
            invalid.append(witness.name)
            continue
        if timestamp is None:
            missing.append(witness.name)
        else:
            verified.append(Cosignature(witness.name, timestamp))
    return CosignatureReport(
        checkpoint=checkpoint,
        verified=tuple(verified),
        invalid=tuple(invalid),
        missing=tuple(missing),
        threshold=threshold,
        ok=len(verified) >= threshold,
    )


def verify_cosignatures(
    note: str, log: NoteVerifier, witnesses: Sequence[NoteVerifier], threshold: int
) -> Checkpoint:
    """Return the checkpoint if the log signed it and ``threshold`` witnesses cosigned it."""
    report = check_cosignatures(note, log, witnesses, threshold)
    if not report.ok:
        detail = ""
        if report.invalid:
            detail = f"; bad cosignatures from {', '.join(report.invalid)}"
        raise VerificationError(
            f"{len(report.verified)} of the {threshold} required witness cosignatures{detail}"
        )
    return report.checkpoint


# -- moving signature lines between notes --------------------------------------------------


def _belongs(signature: _Signature, verifiers: Sequence[NoteVerifier]) -> bool:
    """Whether a line is a note signature or a cosignature by one of ``verifiers``."""
    return any(
        signature.name == v.name and signature.key_hash in (v.key_hash, v.cosignature_key_hash)
        for v in verifiers
    )


def _rebuild(note: str, keep: bool, verifiers: Sequence[NoteVerifier]) -> str:
    text, signatures = _split_note(note)
    block = note[len(text) + 1 :]
    lines = [
        line
        for line, sig in zip(block[:-1].split("\n"), signatures, strict=True)
        if _belongs(sig, verifiers) == keep
    ]
    if not lines:
        raise VerificationError("no signature from key")
    return text + "\n" + "".join(line + "\n" for line in lines)


def keep_signatures(note: str, verifiers: Sequence[NoteVerifier]) -> str:
    """The note with only the signature and cosignature lines of ``verifiers`` (matched by
    name and key ID; nothing is verified here).

    A witness stores the log's own signature next to its cosignature; a log submits its
    checkpoint without the cosignatures it already holds. Raises :class:`VerificationError`
    for a malformed note or when no line would remain.
    """
    return _rebuild(note, True, verifiers)


def drop_signatures(note: str, verifiers: Sequence[NoteVerifier]) -> str:
    """The note without the signature and cosignature lines of ``verifiers`` (see
    :func:`keep_signatures`)."""
    return _rebuild(note, False, verifiers)


def add_signatures(note: str, lines: Sequence[str]) -> str:
    """Append signature lines (each ``— <name> <base64>``, without its newline) to a note,
    leaving out lines it already holds, and check the result's syntax.

    c2sp.org/tlog-witness: "the client MAY concatenate [the response] to the checkpoint, and
    use a note verification function configured with the witness keys it trusts". Nothing is
    verified here: verify the result (:func:`check_cosignatures`) before keeping it.
    """
    text, _ = _split_note(note)
    present = set(note[len(text) + 1 : -1].split("\n"))
    added = []
    for line in lines:
        if not isinstance(line, str) or "\n" in line:
            raise VerificationError("malformed note: a signature line is one line of text")
        if line not in present:
            present.add(line)
            added.append(line + "\n")
    result = note + "".join(added)
    _split_note(result)  # the lines' syntax, the size and signature-count limits
    return result
