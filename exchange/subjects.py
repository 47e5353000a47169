"""Data subjects' ids and the zone's keyed digests of them: one key per use.

Each zone holds one secret, its subject salt (``ZONES/<zone>/subject.salt``, 32 random bytes,
mode 0600), read here and nowhere else. Nothing is ever keyed with the salt itself: every use
derives its own key from it (:func:`crypto.kdf.derive_key`) under a versioned label (DESIGN,
"Privacy defaults"):

=================  ===========================  ==========================================
use                label                        digest of
=================  ===========================  ==========================================
consent digest     ``zonex/v1/consent-digest``  the subject id (stored with the consent)
export pseudonym   ``zonex/v1/pseudonym``       the consumer's key id and the subject id
=================  ===========================  ==========================================

A zone hosted on its provider's node keeps this secret in the node's directory instead
(``NODE_DIR/subject.salt``, same format; :func:`exchange.node.export.node_subjects`): its
consent digests are made on the provider's machine and its pseudonyms on the node, and the
exchange never reads or creates a salt for it.

Anything later that digests subjects takes a label of its own. Keys under different labels are
independent, so a digest made for one use cannot be made, confirmed or compared through another:
knowing a consent digest tells nothing about any pseudonym.

No answer of the exchange carries a keyed digest of a string its caller chose, under any key.
Such an answer is an oracle: before the keys were separated, a refused ``he_score`` named
HMAC(salt, id) for each id asked, the L2 export pseudonym was HMAC(salt, key id || 0x00 ||
subject), and asking to score ``"<key id>\\x00<guess>"`` reversed pseudonyms. So consents are
answered by id, refusals by position and count, and the ids a score covered by a
**commitment**, SHA-256(nonce || canonical JSON of the ids), whose random nonce goes back to the
consumer only: it opens the commitment to an auditor (:func:`commit_ids`), and without it the
commitment hides the ids from everyone, the exchange included. The ledger records the consent
rows a score used by a digest over their consent ids (random tokens, not digests of anything).

Consents recorded before the keys were separated hold HMAC(salt, subject) and
``digest_version`` 0 (migration 0008). Lookups honour them, each digest compared under its own
version's key only, until they expire or are withdrawn; new consents are version 1.

A subject id is 1-512 characters with no control or format character (Unicode categories Cc,
Cf, Cs, Zl, Zp): such characters let one printed id stand for several digests (and a lone
surrogate cannot be encoded at all).

What each party still learns here (exact answers: these paths are authorizations, not
releases, so no ε or δ is spent or claimed):

- a consumer, for each id it asks to score: whether it holds a live consent for it, and for a
  consented id whether the zone has exactly one complete row (``unscorable``), by position; from
  an ``L2`` export, a pseudonym per subject that is stable across its own exports and unrelated
  to any other consumer's, to any consent digest and to the pseudonyms made before the keys
  were separated (exports from before and after do not link);
- a provider: the ids of the consents it records, never their digests;
- the exchange (which holds the salts in the embedded deployment): raw ids in memory during a
  call, consent digests in its tables, and on its ledger the consent digest of each recorded
  consent and, per score, a digest of the consent ids used; an auditor holding the consent
  table can tell which consents a score relied on, not which subjects.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from crypto.canonical import canonicalize
from crypto.kdf import DigestKey, derive_key, label
from exchange.errors import InvalidInputError

__all__ = [
    "CONSENT_DIGEST_VERSION",
    "LABELS",
    "LEGACY_DIGEST_VERSION",
    "MAX_SUBJECT_ID",
    "NONCE_BYTES",
    "SALT_FILE",
    "ZoneSubjects",
    "check_subject_id",
    "commit_ids",
    "read_salt",
]

SALT_FILE = "subject.salt"
MAX_SUBJECT_ID = 512
#: the key of each use, by name (tests search every one of them for echoes)
LABELS = {
    "consent-digest": label("zonex/v1/consent-digest"),
    "pseudonym": label("zonex/v1/pseudonym"),
}
#: ``consents.digest_version`` of digests under the consent-digest key; 0 is the raw salt
CONSENT_DIGEST_VERSION = 1
LEGACY_DIGEST_VERSION = 0
#: hex characters of a pseudonym (128 bits)
PSEUDONYM_HEX = 32
NONCE_BYTES = 32
#: Unicode categories refused in a subject id: control, format, surrogate, line/paragraph sep.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def read_salt(zone_dir: Path) -> bytes:
    """The zone's secret subject salt (created on first use, mode 0600).

    Created whole or not at all: the salt is written and synced under a name of its own, then
    linked to its place, which fails if another thread or process got there first (whose salt
    is then read). A reader never sees a salt being written."""
    path = zone_dir / SALT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        zone_dir.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".salt-", dir=zone_dir)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(32))
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)
        finally:
            os.unlink(temp)
        data = path.read_bytes()
    if len(data) != 32:
        raise InvalidInputError("the zone's subject salt is damaged")
    return data


def check_subject_id(value: object, *, what: str = "a subject id") -> str:
    """``value`` if it is a usable subject id; else :class:`InvalidInputError`
    (reason ``bad_subject_id``) saying why, without echoing the id."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_SUBJECT_ID:
        raise InvalidInputError(
            f"{what} is a string of 1-{MAX_SUBJECT_ID} characters", reason="bad_subject_id"
        )
    if not value.isprintable():  # fast path: printable text has none of the refused categories
        for char in value:
            if unicodedata.category(char) in _REFUSED_CATEGORIES:
                raise InvalidInputError(
                    f"{what} holds a control or format character (U+{ord(char):04X})",
                    reason="bad_subject_id",
                )
    return value


def commit_ids(nonce: bytes, ids: Sequence[str]) -> str:
    """SHA-256(nonce || RFC 8785 JSON of the ordered ids), hex: binds which ids in which order;
    hides them while the 32-byte random nonce stays with the consumer."""
    if len(nonce) != NONCE_BYTES:
        raise InvalidInputError(f"a commitment nonce has {NONCE_BYTES} bytes")
    return hashlib.sha256(nonce + canonicalize(list(ids))).hexdigest()


class ZoneSubjects:
    """One zone's keys, derived from its salt once per use of this object."""

    __slots__ = ("_consent", "_pseudonym", "_salt")

    def __init__(self, salt: bytes) -> None:
        self._salt = salt
        self._consent = DigestKey(derive_key(salt, LABELS["consent-digest"]))
        self._pseudonym = DigestKey(derive_key(salt, LABELS["pseudonym"]))

    @classmethod
    def of(cls, zone_dir: Path) -> ZoneSubjects:
        return cls(read_salt(zone_dir))

    def __repr__(self) -> str:
        return "ZoneSubjects(...)"

    def consent_digest(self, subject: str) -> str:
        """The current consent digest (``digest_version`` 1) of a checked subject id."""
        return self._consent.hexdigest(subject.encode())

    def consent_digests(self, subjects: Sequence[str]) -> list[str]:
        return [self._consent.hexdigest(s.encode()) for s in subjects]

    def legacy_consent_digests(self, subjects: Sequence[str]) -> list[str]:
        """``digest_version`` 0: HMAC(salt, subject), only to find consents recorded before
        the keys were separated. Never written, never answered."""
        keyed = hmac.new(self._salt, digestmod=hashlib.sha256)
        out = []
        for s in subjects:
            mac = keyed.copy()
            mac.update(s.encode())
            out.append(mac.hexdigest())
        return out

    def pseudonym(self, consumer: str, subject: str) -> str:
        """A subject's pseudonym for one consumer (128 bits, hex): the consumer links its own
        exports, not another consumer's, and cannot recover the id."""
        return self._pseudonym.hexdigest(consumer.encode(), subject.encode())[:PSEUDONYM_HEX]
