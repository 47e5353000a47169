"""Cross-border data flows at the exchange (docs/cross-border.md; the rules: :mod:`policy.xborder`).

A release whose consumer is in another jurisdiction than the zone (the zone's is its
provider's) is decided at release time, **inside the ledger transaction that records it**
(:class:`Release` wraps the release's ``apply``): the provider's count of distinct data subjects
sent abroad this year is read, this release's new subjects added, :func:`policy.xborder.decide`
run, and a decision that needs a compliance document refuses the release unless the operator
recorded a live approval for that provider and document. The transaction holds the ledger head
(``SELECT … FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so releases that would
cross a threshold together are decided one after the other: exactly one goes past it.

Every cross-border decision is an ``xborder.decision`` entry: in the release's own transaction,
right after its ``computation.*`` entry, or alone when the release is refused.

Subjects are counted from keyed digests, never ids: HMAC-SHA-256 under the provider's
cross-border subject key, derived (:func:`crypto.kdf.derive_key`, label
``zonex/v1/xborder-subject``) from a secret held for the provider
(``DATA_DIR/xborder/<provider key id>/subject.salt``, 0600), one key per provider so that a
subject is counted once across all the provider's zones. The digests are made as the rows are
read and the ids dropped; ``xborder_subjects`` is unique on (provider, year, digest).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from crypto.envelope import Envelope, verify_envelope
from crypto.errors import VerificationError
from crypto.kdf import DigestKey, derive_key, label
from crypto.keys import VerifyKey
from exchange.domain import Principal, PrincipalKind
from exchange.errors import ForbiddenError, InvalidInputError, NotFoundError
from exchange.server.ledger import Apply, EntryDraft
from exchange.server.models import (
    AccessRequestRow,
    DatasetRow,
    PrincipalRow,
    XborderApprovalRow,
    XborderCountRow,
    XborderSubjectRow,
    ZoneRow,
)
from exchange.server.registry import registry_version as read_registry_version
from exchange.server.runtime import Exchange
from exchange.subjects import read_salt
from policy.levels import Level, Operation, max_level
from policy.xborder import (
    APPROVAL_TYPE,
    APPROVAL_VERSION,
    Document,
    Outcome,
    PiClass,
    Thresholds,
    XborderCase,
    XborderDecision,
    check_approval_period,
    counting_year,
    decide,
    documents_for,
    strictest,
)

__all__ = [
    "SUBJECT_LABEL",
    "Flow",
    "Release",
    "SubjectKey",
    "XborderApprovalRequiredError",
    "XborderRefusedError",
    "check_request",
    "count_subjects",
    "flow_for",
    "list_approvals",
    "record_approval",
    "release_for",
    "set_negative_list",
    "yearly_counts",
]

T = TypeVar("T")

#: the label of the provider's cross-border subject key (one key per use, crypto.kdf)
SUBJECT_LABEL = label("zonex/v1/xborder-subject")
#: digests looked up per statement
_CHUNK = 500


class XborderApprovalRequiredError(ForbiddenError):
    """The flow abroad needs a compliance document the operator has not recorded (live) for
    the provider. ``extra``: the decision, its basis and the documents any one of which would
    do."""

    code = "xborder_approval_required"
    title = "Cross-border approval required"


class XborderRefusedError(ForbiddenError):
    """The flow abroad is refused whatever approvals exist (core data, a negative list, an
    unknown jurisdiction or class)."""

    code = "xborder_refused"
    title = "Cross-border flow refused"


def thresholds(ex: Exchange) -> Thresholds:
    return ex.settings.xborder_thresholds()


# -- the provider's subject key ----------------------------------------------------------------


class SubjectKey:
    """A provider's cross-border subject key: digests subject ids, never shows them."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes) -> None:
        self._key = DigestKey(derive_key(secret, SUBJECT_LABEL))

    @classmethod
    def of(cls, ex: Exchange, provider: str) -> SubjectKey:
        return cls(read_salt(ex.settings.data_dir / "xborder" / provider))

    def __repr__(self) -> str:
        return "SubjectKey(...)"

    def digests(self, subjects: Iterable[object]) -> set[bytes]:
        """The distinct digests of the non-null ids (as text)."""
        return {self._key.digest(str(s).encode()) for s in subjects if s is not None}


# -- who is where ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """A consumer in another jurisdiction than a zone."""

    consumer: str
    consumer_jurisdiction: str
    zone: str
    zone_jurisdiction: str
    provider: str
    provider_ciio: bool
    negative: frozenset[tuple[str, str]]


def _where(ex: Exchange, row: PrincipalRow) -> str:
    return row.jurisdiction or ex.settings.jurisdiction


def _negative(value: object) -> frozenset[tuple[str, str]]:
    if not isinstance(value, list):
        return frozenset()
    return frozenset((str(p[0]), str(p[1])) for p in value if isinstance(p, list) and len(p) == 2)


def flow_for(ex: Exchange, session: Session, consumer: str, zone: str) -> Flow | None:
    """The flow from ``zone`` to ``consumer``, or None when both are in one jurisdiction."""
    zrow = session.get(ZoneRow, zone)
    crow = session.get(PrincipalRow, consumer)
    if zrow is None or crow is None:
        raise NotFoundError("no such zone or consumer")
    prow = session.get(PrincipalRow, zrow.owner)
    assert prow is not None  # a zone's owner is a foreign key
    there, here = _where(ex, crow), _where(ex, prow)
    if there == here:
        return None
    return Flow(
        consumer=consumer,
        consumer_jurisdiction=there,
        zone=zone,
        zone_jurisdiction=here,
        provider=prow.key_id,
        provider_ciio=bool(prow.ciio),
        negative=_negative(zrow.xborder_negative),
    )


# -- counting ----------------------------------------------------------------------------------


def _counts(session: Session, provider: str, year: int) -> XborderCountRow:
    row = session.get(XborderCountRow, (provider, year))
    if row is None:
        row = XborderCountRow(provider=provider, year=year, personal=0, sensitive=0)
        session.add(row)
    return row


def _known(
    session: Session, provider: str, year: int, digests: Sequence[bytes]
) -> dict[bytes, XborderSubjectRow]:
    found: dict[bytes, XborderSubjectRow] = {}
    for i in range(0, len(digests), _CHUNK):
        part = digests[i : i + _CHUNK]
        rows = session.scalars(
            select(XborderSubjectRow).where(
                XborderSubjectRow.provider == provider,
                XborderSubjectRow.year == year,
                XborderSubjectRow.digest.in_(part),
            )
        )
        found.update({bytes(r.digest): r for r in rows})
    return found


def count_subjects(
    session: Session,
    provider: str,
    year: int,
    digests: Iterable[bytes],
    classes: Iterable[PiClass],
    *,
    seq: int | None = None,
    write: bool = True,
) -> dict[PiClass, tuple[int, int]]:
    """Per class (``personal``, ``sensitive``) the provider's count of distinct subjects this
    year before and after adding ``digests``; with ``write``, the subjects and counts are
    stored (a subject already counted for a class is not counted again)."""
    wanted = sorted({c for c in classes if c is not PiClass.NONE})
    ordered = sorted(set(digests))
    known = _known(session, provider, year, ordered)
    counts = _counts(session, provider, year)
    out: dict[PiClass, tuple[int, int]] = {}
    for cls in wanted:
        attr = cls.value
        before = int(getattr(counts, attr) or 0)
        new = sum(1 for d in ordered if d not in known or not getattr(known[d], attr))
        out[cls] = (before, before + new)
    if write and wanted:
        for d in ordered:
            row = known.get(d)
            if row is None:
                session.add(
                    XborderSubjectRow(
                        provider=provider,
                        year=year,
                        digest=d,
                        personal=PiClass.PERSONAL in wanted,
                        sensitive=PiClass.SENSITIVE in wanted,
                        first_seq=seq,
                    )
                )
            else:
                for cls in wanted:
                    setattr(row, cls.value, True)
        for cls in wanted:
            setattr(counts, cls.value, out[cls][1])
    return out


def yearly_counts(
    ex: Exchange, actor: Principal, provider: str, year: int | None = None
) -> dict[str, Any]:
    """The provider's counts this year (or ``year``): the operator, auditors and the provider."""
    if actor.kind not in (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR) and (
        actor.key_id != provider
    ):
        raise ForbiddenError("only the operator, an auditor or the provider sees its counts")
    year = counting_year(datetime.now(UTC)) if year is None else year
    with Session(ex.engine) as session:
        row = session.get(XborderCountRow, (provider, year))
        t = thresholds(ex)
        return {
            "provider": provider,
            "year": year,
            "personal": 0 if row is None else int(row.personal),
            "sensitive": 0 if row is None else int(row.sensitive),
            "thresholds": {
                "personal_contract": t.personal_contract,
                "personal_assessment": t.personal_assessment,
                "sensitive_assessment": t.sensitive_assessment,
            },
        }


# -- releases ----------------------------------------------------------------------------------


def _live_approval(
    session: Session, provider: str, documents: Iterable[Document], now: datetime
) -> XborderApprovalRow | None:
    return session.scalars(
        select(XborderApprovalRow)
        .where(
            XborderApprovalRow.provider == provider,
            XborderApprovalRow.document.in_([d.value for d in documents]),
            XborderApprovalRow.status == "active",
            XborderApprovalRow.valid_from <= now,
            XborderApprovalRow.valid_until > now,
        )
        .order_by(XborderApprovalRow.valid_until.desc())
        .limit(1)
    ).first()


@dataclass
class Release:
    """One release abroad, decided in the ledger transaction that records it."""

    ex: Exchange
    flow: Flow
    dataset: str
    operation: Operation
    level: Level
    #: the personal-information classes of the columns it releases
    classes: frozenset[PiClass]
    dp: bool
    #: keyed digests of the subjects it releases (None: an anonymized or non-personal output)
    digests: set[bytes] | None
    draft: EntryDraft = field(init=False)
    decision: XborderDecision | None = None

    def __post_init__(self) -> None:
        f = self.flow
        self.draft = EntryDraft(
            kind="xborder.decision",
            actor=f.consumer,
            refs={"zone": f.zone, "dataset": self.dataset, "provider": f.provider},
            attrs={
                "operation": self.operation.value,
                "consumer_jurisdiction": f.consumer_jurisdiction,
                "zone_jurisdiction": f.zone_jurisdiction,
                "pi": self._pi().value,
            },
        )

    def _pi(self) -> PiClass:
        if PiClass.SENSITIVE in self.classes:
            return PiClass.SENSITIVE
        return PiClass.PERSONAL if PiClass.PERSONAL in self.classes else PiClass.NONE

    def _case(self, pi: PiClass, before: int, after: int, known: bool = True) -> XborderCase:
        f = self.flow
        return XborderCase(
            count_known=known,
            operation=self.operation.value,
            pi=pi.value,
            level=self.level.value,
            consumer_jurisdiction=f.consumer_jurisdiction,
            zone_jurisdiction=f.zone_jurisdiction,
            dp=self.dp,
            provider_ciio=f.provider_ciio,
            count_before=before,
            count_after=after,
            negative=f.negative,
            thresholds=thresholds(self.ex),
        )

    def decide(self, session: Session, *, write: bool, seq: int | None = None) -> XborderDecision:
        now = datetime.now(UTC)
        year = counting_year(now)
        counted = [c for c in self.classes if c is not PiClass.NONE]
        if self.digests is None or not counted:
            # no subjects given: an anonymized or non-personal output, or subjects this
            # release cannot count (decide() then asks for an assessment)
            pi = self._pi() if self.digests is None else PiClass.NONE
            decision = decide(self._case(pi, 0, 0, known=self.digests is not None))
            counts: dict[PiClass, tuple[int, int]] = {}
        else:
            counts = count_subjects(
                session, self.flow.provider, year, self.digests, counted, seq=seq, write=False
            )
            decision = strictest(decide(self._case(c, *counts[c])) for c in sorted(counts))
        self.decision = decision
        self.draft.attrs.update(
            {
                "decision": decision.decision.value,
                "basis": decision.basis.value,
                "count_before": decision.count_before,
                "count_after": decision.count_after,
                "threshold": -1 if decision.threshold is None else decision.threshold,
                "year": year,
            }
        )
        if decision.decision is Outcome.REFUSE:
            raise XborderRefusedError(
                f"this flow abroad is refused: {decision.provision}",
                decision=decision.decision.value,
                basis=decision.basis.value,
            )
        if decision.decision is not Outcome.EXEMPT:
            needed = documents_for(decision.decision)
            approval = _live_approval(session, self.flow.provider, needed, now)
            if approval is None:
                names = sorted(d.value for d in needed)
                raise XborderApprovalRequiredError(
                    f"this flow abroad needs a {decision.decision.value} "
                    f"({decision.provision}); the provider has no live approval for "
                    f"{' or '.join(names)}: zonex xborder approve --document {names[0]} ...",
                    decision=decision.decision.value,
                    basis=decision.basis.value,
                    document=decision.decision.value,
                    documents=",".join(names),
                    # no count: the provider's yearly count after this release would tell the
                    # consumer how many of its subjects others already sent abroad (the
                    # ledgered decision keeps it)
                )
            self.draft.refs["approval"] = approval.id
        if write and counts:
            count_subjects(session, self.flow.provider, year, self.digests or (), counted, seq=seq)
        return decision

    def wrap(self, apply: Apply | None) -> Apply:
        """``apply`` preceded by this release's decision and count, in its transaction."""

        def checked(session: Session, draft: EntryDraft) -> Any:
            self.decide(session, write=True, seq=draft.seq)
            return None if apply is None else apply(session, draft)

        return checked

    def record(self, call: Callable[[Apply, list[EntryDraft]], T], apply: Apply | None = None) -> T:
        """Run ``call(apply, more)`` (a :func:`~exchange.server.receipts.record_computation`
        with this release's decision as a further entry); a refused release is ledgered as its
        decision alone."""
        return record_releases([self], call, apply)


def record_releases(
    releases: Sequence[Release],
    call: Callable[[Apply, list[EntryDraft]], T],
    apply: Apply | None = None,
) -> T:
    """Run ``call(apply, more)`` with every release's decision and count in the transaction
    (a secure sum over several zones abroad is one release per zone); when one is refused,
    the decisions taken up to it, the refused one included, are ledgered alone."""
    wrapped = releases[-1].wrap(apply)  # at least one
    for release in reversed(releases[:-1]):
        wrapped = release.wrap(wrapped)
    try:
        return call(wrapped, [r.draft for r in releases])
    except (XborderApprovalRequiredError, XborderRefusedError) as exc:
        decided = [r.draft for r in releases if r.decision is not None or "basis" in r.draft.attrs]
        releases[0].ex.ledger.append_group(decided)
        exc.ledgered = True
        raise


def _classes(columns: Sequence[Mapping[str, Any]]) -> frozenset[PiClass]:
    found = set()
    for c in columns:
        try:
            found.add(PiClass(c.get("pi", "none")))
        except ValueError:
            # an unknown class fails closed: decide() refuses it
            raise XborderRefusedError(
                f"column {c.get('name')!r} has an unknown personal-information class",
                basis="unknown_pi_class",
            ) from None
    return frozenset(found)


def _load_flow(
    ex: Exchange, conn: Connection, consumer: str, zone: str, dataset: str
) -> tuple[Flow | None, list[dict[str, Any]]]:
    z = conn.execute(
        select(ZoneRow.owner, ZoneRow.xborder_negative).where(ZoneRow.name == zone)
    ).first()
    if z is None:
        raise NotFoundError("no such zone")
    people = {
        r.key_id: r
        for r in conn.execute(
            select(PrincipalRow.key_id, PrincipalRow.jurisdiction, PrincipalRow.ciio).where(
                PrincipalRow.key_id.in_([consumer, z.owner])
            )
        )
    }
    if consumer not in people:
        raise NotFoundError("no such consumer")
    there = people[consumer].jurisdiction or ex.settings.jurisdiction
    here = people[z.owner].jurisdiction or ex.settings.jurisdiction
    if there == here:
        return None, []
    # an aggregate over several datasets names them all, comma-separated
    names = dataset.split(",")
    found = conn.execute(
        select(DatasetRow.columns).where(DatasetRow.zone == zone, DatasetRow.name.in_(names))
    ).all()
    if len(found) != len(set(names)):
        raise XborderRefusedError(
            "the datasets of this release abroad could not be identified", basis="unknown_dataset"
        )
    columns = [c for (cols,) in found for c in cols]
    flow = Flow(
        consumer=consumer,
        consumer_jurisdiction=there,
        zone=zone,
        zone_jurisdiction=here,
        provider=z.owner,
        provider_ciio=bool(people[z.owner].ciio),
        negative=_negative(z.xborder_negative),
    )
    return flow, list(columns)


def release_for(
    ex: Exchange,
    consumer: str,
    zone: str,
    dataset: str,
    operation: Operation,
    *,
    dp: bool,
    subjects: Iterable[object] | None = None,
    columns: Sequence[str] | None = None,
    registry_version: int | None = None,
) -> Release | None:
    """The cross-border release of ``dataset`` to ``consumer`` (None when domestic).

    ``subjects``: the ids of the subjects released (digested here at once; an export's subject
    column); ``columns``: the columns released (default all). Who is where is read once per
    registry version (principals, zones and datasets all move it): ``registry_version`` is the
    version the request was authenticated at (None: read the current one), so a release at an
    unchanged version reads nothing."""
    version = registry_version
    if version is None:
        with ex.engine.connect() as conn:
            version = read_registry_version(conn)
    flow, cols = ex.registry.snapshot(
        f"xborder:{consumer}:{zone}:{dataset}",
        version,
        lambda conn, _v: _load_flow(ex, conn, consumer, zone, dataset),
    )
    if flow is None:
        return None
    chosen = [c for c in cols if columns is None or c["name"] in columns]
    level = max_level(Level(c["level"]) for c in cols)
    digests = None if subjects is None else SubjectKey.of(ex, flow.provider).digests(subjects)
    return Release(ex, flow, dataset, operation, level, _classes(chosen), dp, digests)


# -- approvals ---------------------------------------------------------------------------------


def _parse_time(value: object, what: str) -> datetime:
    try:
        return datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError as exc:
        raise InvalidInputError(f"{what} is an RFC 3339 UTC time (…Z)") from exc


def record_approval(ex: Exchange, actor: Principal, envelope: Envelope) -> dict[str, Any]:
    """Record the operator's signed compliance approval for a provider (an
    ``xborder.approval_recorded`` entry). Verify, then parse: the envelope must be signed by the
    operator who sends it."""
    if actor.kind is not PrincipalKind.OPERATOR:
        raise ForbiddenError("only the operator records cross-border approvals")
    with Session(ex.engine) as session:
        me = session.get(PrincipalRow, actor.key_id)
        assert me is not None
        try:
            verifier = VerifyKey(bytes(me.public_key))
            payload = verify_envelope(envelope, APPROVAL_TYPE, {verifier.key_id: verifier})
        except VerificationError as exc:
            raise InvalidInputError(f"the approval does not verify: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("type") != APPROVAL_VERSION:
        raise InvalidInputError(f"the approval payload is not a {APPROVAL_VERSION} object")
    if payload.get("approver") != actor.key_id:
        raise InvalidInputError("the approval's approver is not the sender")
    provider = str(payload.get("provider", ""))
    digest = str(payload.get("document_sha256", ""))
    if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
        raise InvalidInputError("document_sha256 is 64 lowercase hex digits")
    start = _parse_time(payload.get("valid_from"), "valid_from")
    end = _parse_time(payload.get("valid_until"), "valid_until")
    try:
        document = check_approval_period(str(payload.get("document")), start, end)
    except ValueError as exc:
        raise InvalidInputError(str(exc), reason="bad_approval_period") from exc
    if end <= datetime.now(UTC):
        raise InvalidInputError("the approval has already ended", reason="bad_approval_period")
    approval_id = "xba_" + secrets.token_hex(16)
    text = envelope.model_dump_json()

    def apply(session: Session, draft: EntryDraft) -> dict[str, Any]:
        prow = session.get(PrincipalRow, provider)
        if prow is None or prow.kind not in ("agency", "enterprise"):
            raise NotFoundError("no such provider")
        session.add(
            XborderApprovalRow(
                id=approval_id,
                provider=provider,
                document=document.value,
                document_digest=digest,
                valid_from=start,
                valid_until=end,
                envelope=text,
                recorded_by=actor.key_id,
                recorded_seq=draft.seq,
                status="active",
            )
        )
        return _approval_out(approval_id, provider, document.value, digest, start, end, draft.seq)

    draft = EntryDraft(
        kind="xborder.approval_recorded",
        actor=actor.key_id,
        refs={"approval": approval_id, "provider": provider},
        attrs={
            "document": document.value,
            "valid_from": payload["valid_from"],
            "valid_until": payload["valid_until"],
        },
        digests={"document": digest},
    )
    out: dict[str, Any] = ex.ledger.append(draft, apply).value
    return out


def _approval_out(
    approval_id: str,
    provider: str,
    document: str,
    digest: str,
    start: datetime,
    end: datetime,
    seq: int | None,
) -> dict[str, Any]:
    return {
        "id": approval_id,
        "provider": provider,
        "document": document,
        "document_sha256": digest,
        "valid_from": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "valid_until": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seq": seq,
    }


def list_approvals(ex: Exchange, actor: Principal, provider: str | None) -> list[dict[str, Any]]:
    """Approvals recorded (the operator and auditors: all; a provider: its own)."""
    if actor.kind not in (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR):
        provider = actor.key_id
    with Session(ex.engine) as session:
        q = select(XborderApprovalRow).order_by(XborderApprovalRow.created_at)
        if provider is not None:
            q = q.where(XborderApprovalRow.provider == provider)
        now = datetime.now(UTC)
        return [
            {
                **_approval_out(
                    r.id,
                    r.provider,
                    r.document,
                    r.document_digest,
                    r.valid_from,
                    r.valid_until,
                    r.recorded_seq,
                ),
                "live": r.status == "active" and r.valid_from <= now < r.valid_until,
            }
            for r in session.scalars(q)
        ]


# -- negative lists ----------------------------------------------------------------------------

_CATEGORIES = frozenset({"*", *(lv.value for lv in Level), *(c.value for c in PiClass)})
_OPERATIONS = frozenset({"*", *(op.value for op in Operation)})


def set_negative_list(
    ex: Exchange, actor: Principal, zone: str, entries: Sequence[Sequence[str]]
) -> list[list[str]]:
    """Set a zone's negative list (the operator or the zone's provider): ``[operation,
    category]`` pairs refused abroad (category: a level, a PI class or ``*``)."""
    clean = sorted({(str(e[0]), str(e[1])) for e in entries if len(e) == 2})
    if len(clean) != len(entries) and len({tuple(e) for e in entries}) != len(clean):
        raise InvalidInputError("each negative-list entry is [operation, category]")
    for op, cat in clean:
        if op not in _OPERATIONS or cat not in _CATEGORIES:
            raise InvalidInputError(
                f"negative-list entry [{op!r}, {cat!r}]: an operation (or *) and a level, "
                "a personal-information class (or *)"
            )
    value = [list(p) for p in clean]

    def apply(session: Session, draft: EntryDraft) -> list[list[str]]:
        row = session.get(ZoneRow, zone)
        if row is None:
            raise NotFoundError("no such zone")
        if actor.kind is not PrincipalKind.OPERATOR and row.owner != actor.key_id:
            raise ForbiddenError("only the operator or the zone's provider sets its negative list")
        row.xborder_negative = value
        return value

    digest = hashlib.sha256(repr(value).encode()).hexdigest()
    draft = EntryDraft(
        kind="xborder.negative_list_set",
        actor=actor.key_id,
        refs={"zone": zone},
        attrs={"entries": ",".join(f"{op}:{cat}" for op, cat in clean) or "-"},
        digests={"list": digest},
    )
    out: list[list[str]] = ex.ledger.append(draft, apply).value
    return out


# -- access requests ---------------------------------------------------------------------------


def check_request(ex: Exchange, actor: Principal, request_id: str) -> list[dict[str, Any]]:
    """For an access request: what each (dataset, operation) would need abroad at the
    provider's current counts, and whether a live approval covers it. Empty when domestic.
    ``zonex approve`` prints these as warnings."""
    out: list[dict[str, Any]] = []
    with Session(ex.engine) as session:
        req = session.get(AccessRequestRow, request_id)
        if req is None:
            raise NotFoundError("no such request")
        zrow = session.get(ZoneRow, req.zone)
        assert zrow is not None
        if actor.kind is not PrincipalKind.OPERATOR and zrow.owner != actor.key_id:
            raise NotFoundError("no such request")
        flow = flow_for(ex, session, req.consumer, req.zone)
        if flow is None:
            return []
        for name in req.datasets:
            row = session.execute(
                select(DatasetRow).where(DatasetRow.zone == req.zone, DatasetRow.name == name)
            ).scalar_one_or_none()
            if row is None:
                continue
            level = max_level(Level(c["level"]) for c in row.columns)
            for op in req.operations:
                try:
                    classes = _classes(row.columns)
                    operation = Operation(op)
                except (XborderRefusedError, ValueError):
                    out.append({"dataset": name, "operation": op, "decision": "refuse"})
                    continue
                # aggregates are differentially private by default from L3 (DESIGN)
                dp = level >= Level.L3
                release = Release(ex, flow, name, operation, level, classes, dp, set())
                decision: XborderDecision | None
                try:
                    decision = release.decide(session, write=False)
                    live = True
                except XborderApprovalRequiredError:
                    decision, live = release.decision, False
                except XborderRefusedError:
                    decision, live = release.decision, False
                assert decision is not None
                out.append(
                    {
                        "dataset": name,
                        "operation": op,
                        **decision.to_dict(),
                        "approved": live,
                        "documents": sorted(d.value for d in documents_for(decision.decision)),
                        "consumer_jurisdiction": flow.consumer_jurisdiction,
                    }
                )
        session.rollback()
    return out
