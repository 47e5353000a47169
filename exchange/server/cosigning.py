"""The exchange's checkpoints, cosigned by witnesses (c2sp.org/tlog-witness).

The operator configures witnesses (:func:`add_witness`: name, URL, cosignature verifier key;
ledgered as ``witness.added``). On the ledger's ticker, :class:`Cosigner` offers the newest
stored checkpoint to every witness that has not cosigned it, with a consistency proof from the
size that witness last cosigned. A cosignature is verified with the witness's key
(:func:`crypto.note.check_cosignatures`) before it is kept, and kept by appending its line to
that checkpoint's note in ``checkpoints``: the export bundle then carries it, and
``verify_checkpoint`` ignores it.

Submissions run on a thread of their own, never on the ledger's writer or ticker: a witness that
is slow or down delays nothing but its own cosignatures. After a failure it is retried with
exponential backoff; every failure is logged and kept on its row (``last_error``). Several
processes of one exchange share the work through a lease on each witness's row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from crypto.errors import CryptoError
from crypto.note import (
    NoteVerifier,
    add_signatures,
    check_cosignatures,
    drop_signatures,
    keep_signatures,
)
from exchange.errors import ConflictError, InvalidInputError, ZonexError
from exchange.server.ledger import EntryDraft, Ledger, SignedCheckpoint
from exchange.server.models import CheckpointRow, WitnessRow
from exchange.server.rounds import Rounds, backoff
from exchange.server.witness.client import (
    ProofSource,
    WitnessConflictError,
    WitnessError,
    WitnessRefusedError,
    submit_checkpoint,
)
from exchange.settings import Settings

__all__ = [
    "WITNESS_ADDED",
    "CosignedCheckpoint",
    "Cosigner",
    "Submit",
    "WitnessInfo",
    "add_witness",
    "list_witnesses",
    "parse_witness_key",
]

log = logging.getLogger("zonex.cosigning")

#: the ledger entry recording a witness configured by the operator
WITNESS_ADDED = "witness.added"
#: characters of a failure kept on the witness's row and in the log line
_ERROR_CHARS = 500

#: :func:`exchange.server.witness.client.submit_checkpoint`'s shape (replaceable in tests)
Submit = Callable[..., tuple[str, ...]]


@dataclass(frozen=True)
class WitnessInfo:
    """A configured witness and how far it got."""

    name: str
    url: str
    verifier_key: str
    #: the latest checkpoint size it cosigned for this log, as far as the exchange knows
    cosigned_size: int | None
    cosigned_at: datetime | None
    #: failures in a row, the last one's message, and when the next attempt may be made
    failures: int
    last_error: str | None
    retry_at: datetime | None

    @classmethod
    def from_row(cls, row: WitnessRow) -> WitnessInfo:
        return cls(
            name=row.name,
            url=row.url,
            verifier_key=row.verifier_key,
            cosigned_size=row.cosigned_size,
            cosigned_at=row.cosigned_at,
            failures=row.failures,
            last_error=row.last_error,
            retry_at=row.retry_at,
        )

    def verifier(self) -> NoteVerifier:
        return NoteVerifier.from_verifier_key(self.verifier_key)


@dataclass(frozen=True)
class CosignedCheckpoint:
    """A stored checkpoint (its note with the cosignatures kept), the witnesses that cosigned
    it and those that did not."""

    checkpoint: SignedCheckpoint
    cosigned: tuple[WitnessInfo, ...]
    missing: tuple[WitnessInfo, ...]


def parse_witness_key(text: str) -> NoteVerifier:
    """A witness's cosignature verifier key (C2SP vkey, type 0x04, or 0x01 as some witnesses
    publish theirs); :class:`InvalidInputError` naming what is wrong otherwise."""
    try:
        return NoteVerifier.from_verifier_key(text.strip())
    except CryptoError as exc:
        raise InvalidInputError(
            f"not a witness verifier key ({exc}); give the vkey `zonex witness init` printed "
            "(NAME+KEYID+BASE64, also in the witness's witness.pub)"
        ) from exc


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(
            f"--url {url!r}: give the witness's http:// or https:// URL (its submission prefix)"
        )
    if parts.query or parts.fragment:
        raise InvalidInputError(f"--url {url!r}: a submission prefix has no query or fragment")
    return url.rstrip("/")


def add_witness(
    engine: Engine,
    ledger: Ledger,
    actor: str,
    url: str,
    verifier_key: str,
    name: str | None = None,
) -> WitnessInfo:
    """Configure a witness (ledgered as ``witness.added`` by ``actor``, the operator).

    ``name`` is the exchange's label for it, by default the key's name. Refuses (with
    :class:`ConflictError`) a name or a public key already configured: one key is one
    witness, since an Ed25519 cosignature does not name its witness.
    """
    verifier = parse_witness_key(verifier_key)
    label = name if name is not None else verifier.name
    if not label or len(label) > 200 or not label.isprintable():
        raise InvalidInputError("--name: a witness name is 1 to 200 printable characters")
    target = _check_url(url)
    key_text = verifier.to_verifier_key()
    with Session(engine) as session:
        clash = session.execute(
            select(WitnessRow.name).where(
                or_(WitnessRow.name == label, WitnessRow.public_key == verifier.key.raw)
            )
        ).scalar_one_or_none()
    if clash is not None:
        raise ConflictError(
            f"witness {clash!r} is already configured with this name or key "
            "(see: zonex ledger witness list)"
        )

    def insert(session: Session, draft: EntryDraft) -> WitnessRow:
        row = WitnessRow(
            name=label,
            url=target,
            verifier_key=key_text,
            public_key=verifier.key.raw,
            added_by=actor,
            failures=0,
        )
        session.add(row)
        return row

    try:
        ledger.append(
            EntryDraft(
                kind=WITNESS_ADDED,
                actor=actor,
                refs={"witness": label},
                attrs={"url": target, "verifier_key": key_text},
            ),
            apply=insert,
        )
    except (ConflictError, IntegrityError) as exc:
        raise ConflictError(f"witness {label!r} or its key is already configured") from exc
    return WitnessInfo(label, target, key_text, None, None, 0, None, None)


def list_witnesses(engine: Engine) -> list[WitnessInfo]:
    """Every configured witness, by name."""
    with Session(engine) as session:
        rows = session.execute(select(WitnessRow).order_by(WitnessRow.name)).scalars()
        return [WitnessInfo.from_row(row) for row in rows]


def _has_cosignature(note: str, witness: NoteVerifier) -> bool:
    try:
        keep_signatures(note, [witness])
    except CryptoError:
        return False
    return True


def _names_key(note: str, line: str, witness: NoteVerifier) -> bool:
    """Whether ``line`` is a well-formed signature line with the witness's name and key ID."""
    try:
        keep_signatures(add_signatures(note, [line]), [witness])
    except CryptoError:
        return False
    return True


class Cosigner(Rounds):
    """Offers the ledger's newest checkpoint to the configured witnesses.

    :meth:`tick` (registered on the ledger's ticker) starts a round on a thread of its own
    unless one is running, and returns at once; :meth:`run_once` runs a round in the caller's
    thread.
    """

    def __init__(
        self,
        engine: Engine,
        ledger: Ledger,
        log_verifier: NoteVerifier,
        settings: Settings,
        *,
        submit: Submit = submit_checkpoint,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        # one connection pool for every round (tlog-witness: clients SHOULD keep connections
        # alive)
        super().__init__(
            engine,
            thread_name="zonex-witness-submit",
            join_timeout=settings.witness_timeout_seconds + 5,
            log=log,
            clock=clock,
        )
        self._ledger = ledger
        self._log = log_verifier
        self._settings = settings
        self._submit = submit
        #: one synchronous round at a time (:meth:`cosigned_covering`): callers that waited
        #: behind it take its checkpoint when it covers their entry
        self._covering_lock = threading.Lock()

    # -- one round -------------------------------------------------------------------------

    def run_once(self, *, ignore_backoff: bool = False) -> dict[str, bool]:
        """Offer the newest checkpoint to every witness that is due (with ``ignore_backoff``,
        also to those waiting after a failure); which ones cosigned it."""
        try:
            latest = self._ledger.latest_checkpoint()
        except SQLAlchemyError:
            log.exception("witness round: cannot read the latest checkpoint")
            return {}
        if latest is None:
            return {}
        now = self._clock()
        query = select(WitnessRow)
        if not ignore_backoff:
            query = query.where(or_(WitnessRow.retry_at.is_(None), WitnessRow.retry_at <= now))
        with Session(self._engine) as session:
            rows = session.execute(query).scalars()
            configured = [WitnessInfo.from_row(row) for row in rows]
        due = [
            witness
            for witness in configured
            if witness.cosigned_size != latest.size
            or not _has_cosignature(latest.note, witness.verifier())
        ]
        outcome: dict[str, bool] = {}
        for witness in due:
            if self._stopping.is_set():
                break
            if not self.claim(
                WitnessRow, witness.name, 2 * self._settings.witness_timeout_seconds + 5
            ):
                continue  # another process of this exchange is at it
            outcome[witness.name] = self._offer(witness, latest)
        return outcome

    def has_witnesses(self) -> bool:
        """Whether any witness is configured."""
        return bool(list_witnesses(self._engine))

    def cosign_latest(self, timeout: float) -> CosignedCheckpoint | None:
        """Offer the newest stored checkpoint to every witness now, backoff or not, until each
        has cosigned it or ``timeout`` seconds passed; ``None`` if there is no checkpoint. For
        an operator who exports right after."""
        deadline = time.monotonic() + timeout
        while True:
            self.run_once(ignore_backoff=True)
            latest = self._ledger.latest_checkpoint()
            if latest is None:
                return None
            cosigned: list[WitnessInfo] = []
            missing: list[WitnessInfo] = []
            for witness in list_witnesses(self._engine):
                done = witness.cosigned_size == latest.size and _has_cosignature(
                    latest.note, witness.verifier()
                )
                (cosigned if done else missing).append(witness)
            if not missing or time.monotonic() >= deadline:
                return CosignedCheckpoint(latest, tuple(cosigned), tuple(missing))
            time.sleep(0.2)

    def cosigned_covering(self, seq: int, timeout: float) -> SignedCheckpoint:
        """A stored checkpoint that includes entry ``seq``, with the cosignatures the witnesses
        gave it. The newest stored checkpoint that includes ``seq`` and that every witness not
        waiting after a failure has cosigned is taken as it is. Otherwise the newest stored
        one (if it includes ``seq``, else one the ledger signs and stores now over everything
        committed) is offered at once to every such witness that has not cosigned it; this
        returns when none is left to ask or after ``timeout`` seconds, with whatever
        cosignatures it then carries.

        Callers take turns on one lock: those that waited while a round ran find their entry
        included in that round's checkpoint and take it as it is, so tasks handed out together
        share one round instead of one each. For a zone node with a witness policy
        (:mod:`exchange.server.dispatch`)."""
        with self._covering_lock:
            cosigned = self._cosigned_including(seq)
            if cosigned is not None:
                return cosigned
            latest = self._ledger.latest_checkpoint()
            if latest is None or latest.size <= seq:
                self._ledger.checkpoint()
            deadline = time.monotonic() + timeout
            while True:
                latest = self._ledger.latest_checkpoint()
                if latest is None or latest.size <= seq:  # pragma: no cover - just stored
                    raise ZonexError(f"no stored checkpoint includes entry {seq}")
                if (
                    not self._owing(latest)
                    or time.monotonic() >= deadline
                    or self._stopping.is_set()
                ):
                    return latest
                if not self.run_once():
                    # another round holds the lease on every witness still owing; its answer
                    # lands on the rows, read above. This process's ticker round is waited
                    # for; another process's is looked at again shortly
                    with self._lock:
                        background = self._thread
                    if background is not None and background.is_alive():
                        background.join(max(0.0, deadline - time.monotonic()))
                    else:
                        time.sleep(0.01)

    #: stored checkpoints looked at (newest first) for one every due witness cosigned
    _REUSE_WINDOW = 8

    def _due(self) -> list[WitnessInfo]:
        """The witnesses not waiting after a failure."""
        now = self._clock()
        with Session(self._engine) as session:
            rows = session.execute(
                select(WitnessRow).where(
                    or_(WitnessRow.retry_at.is_(None), WitnessRow.retry_at <= now)
                )
            ).scalars()
            return [WitnessInfo.from_row(row) for row in rows]

    def _cosigned_including(self, seq: int) -> SignedCheckpoint | None:
        """The newest of the last few stored checkpoints that includes entry ``seq`` and
        carries a (verified when stored) cosignature of every due witness, if any."""
        verifiers = [witness.verifier() for witness in self._due()]
        with Session(self._engine) as session:
            rows = session.execute(
                select(CheckpointRow)
                .where(CheckpointRow.size > seq)
                .order_by(CheckpointRow.size.desc())
                .limit(self._REUSE_WINDOW)
            ).scalars()
            stored = [SignedCheckpoint(row.size, bytes(row.root), row.note) for row in rows]
        for checkpoint in stored:
            if all(_has_cosignature(checkpoint.note, verifier) for verifier in verifiers):
                return checkpoint
        return None

    def _owing(self, latest: SignedCheckpoint) -> bool:
        """Whether a witness that is not waiting after a failure has not cosigned ``latest``."""
        return any(
            witness.cosigned_size != latest.size
            or not _has_cosignature(latest.note, witness.verifier())
            for witness in self._due()
        )

    def _offer(self, witness: WitnessInfo, latest: SignedCheckpoint) -> bool:
        verifier = witness.verifier()
        old_size = witness.cosigned_size or 0
        if old_size > latest.size:
            # it reported a size beyond this checkpoint: ask again from 0 (its 409 names its
            # size) rather than trust a number no proof can start from
            old_size = 0

        def proof(size: int) -> Sequence[bytes]:
            return self._ledger.consistency_proof(size, latest.size)

        try:
            lines = self._request(witness, latest, old_size, proof)
            self._keep(witness, verifier, latest, lines)
        except WitnessConflictError as exc:
            self._failed(witness, exc, hint=exc.size)
            return False
        except (WitnessError, CryptoError, ZonexError, SQLAlchemyError) as exc:
            self._failed(witness, exc)
            return False
        log.info("witness %s cosigned checkpoint %d", witness.name, latest.size)
        return True

    def _request(
        self, witness: WitnessInfo, latest: SignedCheckpoint, old_size: int, proof: ProofSource
    ) -> tuple[str, ...]:
        # the log's signature only: the witness stores and returns what it verified
        note = keep_signatures(latest.note, [self._log])
        with self._lock:  # rounds run on the ticker's thread and on dispatchers' (one pool)
            if self._http is None:
                self._http = httpx.Client(timeout=self._settings.witness_timeout_seconds)
            http = self._http
        lines: tuple[str, ...] = self._submit(witness.url, note, old_size, proof, client=http)
        verifier = witness.verifier()
        # only lines naming its key count; any other line is ignored (tlog-witness: "The
        # client MUST ignore any cosignatures from unknown keys"), even one that does not parse
        own = [line for line in lines if _names_key(note, line, verifier)]
        if not own:
            raise WitnessError("the witness answered no cosignature from its key")
        candidate = add_signatures(note, own)
        report = check_cosignatures(candidate, self._log, [verifier], 1)
        if not report.ok:
            raise WitnessError("the witness answered a bad cosignature")
        return tuple(own)

    def _keep(
        self,
        witness: WitnessInfo,
        verifier: NoteVerifier,
        latest: SignedCheckpoint,
        lines: tuple[str, ...],
    ) -> None:
        """Append the verified lines to the checkpoint's note (replacing this witness's older
        ones) and record the size it cosigned, in one transaction."""
        with Session(self._write_engine) as session, session.begin():
            row = session.get(CheckpointRow, latest.size, with_for_update=True)
            if row is None:  # pragma: no cover - checkpoints are never deleted
                raise ZonexError(f"checkpoint {latest.size} is gone")
            # a witness's older cosignature of this checkpoint (a resubmission) is replaced
            row.note = add_signatures(drop_signatures(row.note, [verifier]), lines)
            session.execute(
                update(WitnessRow)
                .where(WitnessRow.name == witness.name)
                .values(
                    cosigned_size=latest.size,
                    cosigned_at=self._clock(),
                    failures=0,
                    last_error=None,
                    retry_at=None,
                    lease_until=None,
                )
            )

    def _failed(self, witness: WitnessInfo, exc: Exception, hint: int | None = None) -> None:
        failures = witness.failures + 1
        delay = backoff(failures, self._settings.witness_backoff_max_seconds)
        message = (str(exc) or type(exc).__name__)[:_ERROR_CHARS]
        # 422: the witness holds a checkpoint of this log that this one does not extend
        inconsistent = isinstance(exc, WitnessRefusedError) and exc.status == 422
        log.log(
            logging.ERROR if inconsistent else logging.WARNING,
            "witness %s at %s: %s (failure %d; next attempt in %.0f s)",
            witness.name,
            witness.url,
            message,
            failures,
            delay,
        )
        values: dict[str, object] = {
            "failures": failures,
            "last_error": message,
            "retry_at": self._clock() + timedelta(seconds=delay),
            "lease_until": None,
        }
        if hint is not None:
            values["cosigned_size"] = hint  # what the witness says it cosigned last
        try:
            with Session(self._write_engine) as session, session.begin():
                session.execute(
                    update(WitnessRow).where(WitnessRow.name == witness.name).values(**values)
                )
        except SQLAlchemyError:
            log.exception("witness %s: cannot record the failure", witness.name)


def export_checkpoint(
    ledger: Ledger, cosigner: Cosigner | None, timeout: float
) -> SignedCheckpoint:
    """The checkpoint an export ends with: one signed now over everything committed, offered to
    the configured witnesses at once, waiting up to ``timeout`` seconds for their cosignatures
    (the bundle then carries them, so ``zonex audit verify --policy`` can require a quorum on
    it). Without witnesses, or when none answers in time, the fresh checkpoint as signed."""
    final = ledger.checkpoint()
    if cosigner is None or not cosigner.has_witnesses():
        return final
    done = cosigner.cosign_latest(timeout)
    if done is not None and done.checkpoint.size >= final.size:
        return done.checkpoint
    return final
