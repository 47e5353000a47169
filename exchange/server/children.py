"""The children of the catalog chain: the child exchanges (districts under a city, streets under
a district) whose checkpoints this exchange records, as the operator named them.

:func:`add_child` records one (name, URL, the child's log key; ledgered as
``chain.child_added``); :func:`list_children` reads them back with the latest checkpoint recorded
for each, the catalog each published and the latest fork seen, which
:class:`exchange.server.chain.ChainPoller` keeps up to date.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy import Engine, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from crypto.errors import CryptoError
from crypto.note import ALG_ED25519, NoteVerifier
from exchange.errors import ConflictError, InvalidInputError
from exchange.server.ledger import EntryDraft, Ledger
from exchange.server.models import ChainChildRow

__all__ = [
    "CHILD_ADDED",
    "ChildFork",
    "ChildInfo",
    "RecordedCheckpoint",
    "add_child",
    "list_children",
    "parse_child_log_key",
]

#: the ledger entry recording a child named by the operator
CHILD_ADDED = "chain.child_added"

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}", re.ASCII)


@dataclass(frozen=True)
class RecordedCheckpoint:
    """The latest checkpoint recorded for a child (its ``chain.checkpoint`` entry's seq)."""

    size: int
    root: bytes
    note: str
    seq: int | None
    recorded_at: datetime | None


@dataclass(frozen=True)
class ChildFork:
    """The latest checkpoint a child showed that does not extend the recorded one."""

    size: int
    root: bytes
    note: str
    seq: int | None
    detected_at: datetime | None


@dataclass(frozen=True)
class ChildInfo:
    """A child exchange, the checkpoint recorded for it and the catalog it published."""

    name: str
    url: str
    #: the child's log verifier key (its log.pub)
    log_key: str
    added_at: datetime
    checkpoint: RecordedCheckpoint | None
    #: the signed envelope it published, as received (JSON), and the SHA-256 of its payload
    published: str | None
    published_digest: str | None
    published_at: datetime | None
    fork: ChildFork | None
    #: failures in a row, the last one's message, and when it is polled next
    failures: int
    last_error: str | None
    retry_at: datetime | None

    @classmethod
    def from_row(cls, row: ChainChildRow) -> ChildInfo:
        checkpoint = fork = None
        if row.size is not None and row.root is not None and row.note is not None:
            checkpoint = RecordedCheckpoint(
                row.size, bytes(row.root), row.note, row.recorded_seq, row.recorded_at
            )
        if row.fork_size is not None and row.fork_root is not None and row.fork_note is not None:
            fork = ChildFork(
                row.fork_size, bytes(row.fork_root), row.fork_note, row.fork_seq, row.fork_at
            )
        return cls(
            name=row.name,
            url=row.url,
            log_key=row.log_key,
            added_at=row.created_at,
            checkpoint=checkpoint,
            published=row.published,
            published_digest=row.published_digest,
            published_at=row.published_at,
            fork=fork,
            failures=row.failures,
            last_error=row.last_error,
            retry_at=row.retry_at,
        )

    def verifier(self) -> NoteVerifier:
        return NoteVerifier.from_verifier_key(self.log_key)

    @property
    def origin(self) -> str:
        return self.log_key.split("+", 1)[0]


def parse_child_log_key(text: str) -> NoteVerifier:
    """A child's log verifier key (its ``log.pub``: a C2SP vkey of type 0x01);
    :class:`InvalidInputError` naming what is wrong otherwise."""
    try:
        verifier = NoteVerifier.from_verifier_key(text.strip())
    except CryptoError as exc:
        raise InvalidInputError(
            f"not a log verifier key ({exc}); give the child's log.pub (NAME+KEYID+BASE64)"
        ) from exc
    if verifier.signature_type != ALG_ED25519:
        raise InvalidInputError(
            "a witness's cosignature key, not a log key: give the child exchange's log.pub"
        )
    return verifier


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(f"--url {url!r}: give the child exchange's http(s):// base URL")
    if parts.query or parts.fragment:
        raise InvalidInputError(f"--url {url!r}: a base URL has no query or fragment")
    return url.rstrip("/")


def add_child(
    engine: Engine,
    ledger: Ledger,
    actor: str,
    name: str,
    url: str,
    log_key: str,
    *,
    own_log: NoteVerifier | None = None,
) -> ChildInfo:
    """Record a child exchange (ledgered as ``chain.child_added`` by ``actor``, the operator).

    Refuses (:class:`ConflictError`) a name or a log key already recorded (one key is one
    child), and (:class:`InvalidInputError`) this exchange's own log key, ``own_log``.
    """
    if not _NAME.fullmatch(name):
        raise InvalidInputError(
            "--name: a child's name is 1 to 63 of a-z, 0-9, '.', '_', '-', starting with a "
            "letter or digit"
        )
    target = _check_url(url)
    verifier = parse_child_log_key(log_key)
    if own_log is not None and verifier.key == own_log.key:
        raise InvalidInputError("--log-key: that is this exchange's own log key")
    key_text = verifier.to_verifier_key()
    with Session(engine) as session:
        clash = session.execute(
            select(ChainChildRow.name).where(
                or_(ChainChildRow.name == name, ChainChildRow.public_key == verifier.key.raw)
            )
        ).scalar_one_or_none()
    if clash is not None:
        raise ConflictError(
            f"child {clash!r} is already recorded with this name or log key (see: zonex chain list)"
        )

    def insert(session: Session, draft: EntryDraft) -> None:
        session.add(
            ChainChildRow(
                name=name,
                url=target,
                log_key=key_text,
                public_key=verifier.key.raw,
                added_by=actor,
                failures=0,
            )
        )

    try:
        ledger.append(
            EntryDraft(
                kind=CHILD_ADDED,
                actor=actor,
                refs={"child": name},
                attrs={"url": target, "log_key": key_text},
            ),
            apply=insert,
        )
    except (ConflictError, IntegrityError) as exc:
        raise ConflictError(f"child {name!r} or its log key is already recorded") from exc
    with Session(engine) as session:
        row = session.get(ChainChildRow, name)
        assert row is not None
        return ChildInfo.from_row(row)


def list_children(engine: Engine) -> list[ChildInfo]:
    """Every recorded child, by name."""
    with Session(engine) as session:
        rows = session.execute(select(ChainChildRow).order_by(ChainChildRow.name)).scalars()
        return [ChildInfo.from_row(row) for row in rows]
