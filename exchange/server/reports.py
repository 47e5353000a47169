"""Published reports (月报季评): a report's digest signed and recorded on the ledger.

A report is computed offline from a verified bundle (:mod:`exchange.audit.report`); publishing
records, as ``report.published``, who vouches for it (the operator or an auditor), its period,
the number of entries it was computed over and their Merkle root, and the SHA-256 of its
canonical measures. The exchange checks that root against its own tree at that size, so a
published report is tied to this ledger's history: anyone with a later bundle recomputes it
from the first ``bundle_size`` entries (``zonex report verify``) and compares digests.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from exchange.audit.report import PeriodError, parse_period
from exchange.domain import Principal, PrincipalKind
from exchange.errors import ForbiddenError, InvalidInputError
from exchange.server.ledger import EntryDraft
from exchange.server.runtime import Exchange

__all__ = ["PUBLISHERS", "PublishedReport", "publish_report"]

#: who may publish a report
PUBLISHERS = (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR)
_HEX64 = re.compile(r"[0-9a-f]{64}").fullmatch


@dataclass(frozen=True)
class PublishedReport:
    id: str
    period: str
    bundle_size: int
    bundle_root: str
    digest: str
    #: the ``seq`` of its ``report.published`` entry
    seq: int
    publisher: str


def publish_report(
    ex: Exchange, actor: Principal, period: str, bundle_size: int, bundle_root: str, digest: str
) -> PublishedReport:
    """Record that ``actor`` publishes the report of ``period`` whose canonical measures hash
    to ``digest``, computed over the first ``bundle_size`` entries of this ledger (root
    ``bundle_root``, hex). Refused unless the actor is the operator or an auditor, and unless
    the root is this ledger's at that size."""
    if actor.kind not in PUBLISHERS:
        raise ForbiddenError("only the operator and auditors publish reports", reason="not_auditor")
    try:
        label = parse_period(period).label
    except PeriodError as exc:
        raise InvalidInputError(str(exc), field="period", reason="bad_period") from exc
    for name, value in (("digest", digest), ("bundle_root", bundle_root)):
        if not _HEX64(value):
            raise InvalidInputError(
                f"{name} is 64 lowercase hex digits (a SHA-256)", field=name, reason="bad_digest"
            )
    size = ex.ledger.size()
    if not 1 <= bundle_size <= size:
        raise InvalidInputError(
            f"bundle_size {bundle_size}: the ledger holds {size} entries",
            field="bundle_size",
            reason="bad_size",
        )
    root = ex.ledger.tiles.tree(bundle_size).root().hex()
    if root != bundle_root:
        raise InvalidInputError(
            f"bundle_root is not this ledger's root at size {bundle_size}: the report was "
            "computed from another history",
            field="bundle_root",
            reason="root_mismatch",
        )
    report_id = "report-" + secrets.token_hex(12)
    draft = EntryDraft(
        kind="report.published",
        actor=actor.key_id,
        refs={"report": report_id},
        digests={"report": digest, "bundle_root": bundle_root},
        attrs={"period": label, "bundle_size": bundle_size},
    )
    appended = ex.ledger.append(draft)
    return PublishedReport(
        report_id, label, bundle_size, bundle_root, digest, appended.seq, actor.key_id
    )
