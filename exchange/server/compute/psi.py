"""Private joins: ``psi_cardinality``, ``psi_members`` and ``psi_aggregate`` as sessions.

Three roles meet here (DESIGN, "Computations"; ``docs/psi.md``): the consumer C (its ids X and
its secrets stay on its machine, :mod:`exchange.client.psi`), the provider's zone P (its secret
scalar lives only in the zone's directory) and the exchange E, which matches blinded points it
cannot invert and sums ciphertexts it cannot read. One session, one fresh scalar per party, one
hashing domain (:func:`crypto.psi.session_domain` over the session id), so nothing carries over
between sessions.

Steps, each authorized again and each done at most once (a repeat or a message out of order is a
409; a revocation between steps stops the session):

1. ``create``: C names zone, dataset, mode, purpose and |X| (plus sum columns, ε and its HE
   context digest for ``aggregate``). Limits, k and the rules are checked before any work; at
   L3 and above a release over C's id list is differentially private unless the provider opted
   out (:func:`exchange.node.analysis.requires_dp`), so ε is required and ``members`` refused.
2. ``a``: C uploads A = c·H(x) over its shuffled, de-duplicated ids, in order, in batches. The
   zone re-blinds each batch to A' = p·A (checking every point) for E. When A is complete it is
   checked whole; then the zone reads Y, normalizes and de-duplicates it (skipping, and
   counting, values that are no usable id), shuffles it and computes B = p·H(y) for C and,
   for ``aggregate``, its clipped values encrypted under C's key in B's order.
3. ``b``: C downloads B (a read; may be repeated).
4. ``bc``: C uploads B^c = c·B in B's order, in batches; complete, it is checked whole.
5. ``result``: E checks both lists whole again, matches A' against B^c and releases what the
   mode allows, with a receipt; every artefact of the session is deleted. Under DP the k gate
   of ``aggregate`` reads the released noisy count; a closed gate is a suppressed release,
   charged and receipted like any other.

Every step re-reads the dataset's rules and applies the stricter of the terms the session
opened under and those in force (:func:`_terms`); a session that can no longer comply fails.

Sessions live in ``psi_sessions`` (counts and digests only). Bulk artefacts (A', B, B^c,
ciphertexts) are files under ``DATA_DIR/psi/<session>/`` (0700); the zone's scalar is
``ZONES/<zone>/psi/<session>.key`` (0600). Both go when the session completes, fails or expires.
A step claims the session by moving it from ``open`` to ``busy`` with a conditional update, so
two requests (or two processes) can never run steps of one session at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from crypto import he
from crypto import psi as cpsi
from crypto.canonical import canonicalize
from crypto.encoding import b64url_encode
from crypto.errors import CryptoError, VerificationError
from crypto.keys import VerifyKey
from exchange.domain import Principal
from exchange.errors import (
    ConflictError,
    DeniedError,
    InvalidInputError,
    NotFoundError,
    ZoneUnavailableError,
    ZonexError,
)
from exchange.node import dp
from exchange.node.analysis import NUMERIC_TYPES, AnalysisRules, effective_disclosure, requires_dp
from exchange.psi_protocol import (
    LABEL,
    MAX_ID_CHARS,
    MAX_SUM_COLUMNS,
    MODES,
    NORMALIZATION,
    encrypt_columns,
    id_bytes,
    int_bounds,
    normalize_id,
    read_y,
    subject_bounds,
)
from exchange.server import access, dispatch
from exchange.server.budget import charge, charge_attrs
from exchange.server.compute.contexts import load_context
from exchange.server.compute.rules import current_rules
from exchange.server.compute.source import open_source
from exchange.server.ledger import EntryDraft
from exchange.server.models import DatasetRow, NodeRow, NodeTaskRow, PrincipalRow, PsiSessionRow
from exchange.server.receipts import record_computation
from exchange.server.runtime import Exchange
from exchange.tasks import verify_result
from policy import Operation

__all__ = [
    "LABEL",
    "MAX_ID_CHARS",
    "MAX_SUM_COLUMNS",
    "MODES",
    "create_session",
    "finish_session",
    "get_b_points",
    "id_bytes",
    "normalize_id",
    "put_a_points",
    "put_bc_points",
    "session_info",
    "sweep_expired",
]

_P = cpsi.POINT_BYTES
_TERMINAL = ("done", "failed", "expired")
#: the task a node-hosted zone runs for its role (:mod:`exchange.node.psi`)
NODE_TASK_KIND = "psi_zone"
#: one name each for the shared helpers (:mod:`exchange.psi_protocol`)
_int_bounds = int_bounds
_subject_bounds = subject_bounds


# -- session rows and files -------------------------------------------------------------------


@dataclass(frozen=True)
class _Snap:
    """What a step needs of its session row (read under the claim)."""

    id: str
    consumer: str
    zone: str
    dataset: str
    mode: str
    purpose: str
    step: str
    x_count: int
    y_count: int | None
    a_received: int
    bc_received: int
    params: dict[str, Any]
    digests: dict[str, Any]
    context_digest: str | None

    @property
    def operation(self) -> Operation:
        return MODES[self.mode]


def _snap(row: PsiSessionRow) -> _Snap:
    return _Snap(
        row.id,
        row.consumer,
        row.zone,
        row.dataset,
        row.mode,
        row.purpose,
        row.step,
        int(row.x_count or 0),
        None if row.y_count is None else int(row.y_count),
        int(row.a_received),
        int(row.bc_received),
        dict(row.params),
        dict(row.digests),
        row.context_digest,
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _session_dir(ex: Exchange, sid: str) -> Path:
    return ex.settings.data_dir / "psi" / sid


def _key_path(ex: Exchange, zone: str, sid: str) -> Path:
    return ex.zones_dir / zone / "psi" / f"{sid}.key"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write_key(path: Path, key: cpsi.PsiKey) -> None:
    _private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.to_bytes())


def _read_key(ex: Exchange, snap: _Snap) -> cpsi.PsiKey:
    if snap.params.get("epoch"):
        from exchange.server.compute import psi_epoch

        return psi_epoch.zone_key(ex, snap)
    try:
        return cpsi.PsiKey.from_bytes(_key_path(ex, snap.zone, snap.id).read_bytes())
    except (OSError, CryptoError) as exc:
        raise ConflictError("the zone's session key is gone", reason="session_broken") from exc


def _cleanup(ex: Exchange, zone: str, sid: str) -> None:
    """Delete every artefact of a session (idempotent)."""
    shutil.rmtree(_session_dir(ex, sid), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        _key_path(ex, zone, sid).unlink()


def _points(body: bytes, what: str) -> list[bytes]:
    if not body:
        raise InvalidInputError(f"the {what} batch is empty", reason="empty_batch")
    if len(body) % _P:
        raise InvalidInputError(
            f"a {what} batch is a concatenation of {_P}-byte points", reason="bad_point"
        )
    return [body[i : i + _P] for i in range(0, len(body), _P)]


def _first_repeat(points: Sequence[bytes], offset: int = 0) -> str | None:
    seen: dict[bytes, int] = {}
    for i, p in enumerate(points):
        j = seen.setdefault(p, i)
        if j != i:
            return f"point {offset + i} repeats point {offset + j}"
    return None


def _check_whole(points: Sequence[bytes], expected: int, what: str) -> None:
    """An uploaded list, whole, before the zone answers it or the exchange matches it: exactly
    as many points as the list it answers for, each once. Batches are checked as they come,
    but a point repeated across batches (one matched point copied into every position would
    make every position match: counts and sums inflated, k bypassed) shows only here. A
    violation fails the session."""
    if len(points) != expected:
        raise InvalidInputError(
            f"{what} holds {len(points)} points where {expected} are due; the session is closed",
            reason="wrong_length",
            fatal=True,
        )
    if len(set(points)) != len(points):
        raise InvalidInputError(
            f"{_first_repeat(points)} of {what}: each point is sent once; the session is closed",
            reason="duplicate_point",
            fatal=True,
        )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_points(path: Path) -> list[bytes]:
    data = path.read_bytes() if path.exists() else b""
    return [data[i : i + _P] for i in range(0, len(data), _P)]


def _append(path: Path, offset: int, points: Sequence[bytes]) -> None:
    """Write ``points`` at point index ``offset`` (truncating anything after: a retried batch
    after a crash overwrites its half-written predecessor)."""
    with path.open("r+b" if path.exists() else "w+b") as f:
        f.truncate(offset * _P)
        f.seek(offset * _P)
        f.write(b"".join(points))


# -- claiming a step --------------------------------------------------------------------------


def _load(session: Session, actor: Principal, sid: str) -> PsiSessionRow:
    row = session.get(PsiSessionRow, sid) if isinstance(sid, str) and len(sid) <= 40 else None
    if row is None or row.consumer != actor.key_id:
        # another consumer's session is not acknowledged to exist
        raise NotFoundError("no such PSI session")
    return row


def _ledger_end(ex: Exchange, snap: _Snap | PsiSessionRow, state: str, reason: str) -> None:
    ex.ledger.append(
        EntryDraft(
            kind=f"psi.session_{state}",
            actor=snap.consumer,
            refs={"zone": snap.zone, "dataset": snap.dataset, "session": snap.id},
            attrs={"mode": snap.mode, "reason": reason[:100]},
        )
    )


def _end(ex: Exchange, snap: _Snap | PsiSessionRow, state: str, reason: str) -> None:
    """Move a session to a terminal state, delete its artefacts and ledger why."""
    with Session(ex.engine) as s, s.begin():
        s.execute(
            update(PsiSessionRow)
            .where(PsiSessionRow.id == snap.id, PsiSessionRow.state.not_in(_TERMINAL))
            .values(state=state, error=reason[:200], updated_at=_now())
        )
    _cleanup(ex, snap.zone, snap.id)
    _ledger_end(ex, snap, state, reason)


def _expired_error() -> ConflictError:
    return ConflictError(
        "the PSI session expired; its data was deleted; start a new one", reason="session_expired"
    )


def _claim(ex: Exchange, actor: Principal, sid: str, steps: Sequence[str]) -> _Snap:
    """Move the session from ``open`` to ``busy`` if its last step is one of ``steps``."""
    now = _now()
    with Session(ex.engine) as s, s.begin():
        row = _load(s, actor, sid)
        snap = _snap(row)
        state, expires = row.state, row.expires_at
    if state not in _TERMINAL and expires <= now:
        _end(ex, snap, "expired", "session_expired")
        raise _expired_error()
    if state == "expired":
        raise _expired_error()
    if state in _TERMINAL:
        raise ConflictError(f"the PSI session is {state}; start a new one", reason="session_over")
    if state == "busy":
        raise ConflictError("another step of this session is running", reason="session_busy")
    if snap.step not in steps:
        raise ConflictError(
            f"out of order: the session's last step is {snap.step!r}", reason="out_of_order"
        )
    with Session(ex.engine) as s, s.begin():
        done = s.execute(
            update(PsiSessionRow)
            .where(
                PsiSessionRow.id == sid,
                PsiSessionRow.state == "open",
                PsiSessionRow.step == snap.step,
            )
            .values(state="busy", updated_at=now)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise ConflictError("another step of this session is running", reason="session_busy")
    return snap


def _release(ex: Exchange, sid: str, **values: Any) -> None:
    with Session(ex.engine) as s, s.begin():
        s.execute(
            update(PsiSessionRow)
            .where(PsiSessionRow.id == sid, PsiSessionRow.state == "busy")
            .values(state="open", updated_at=_now(), **values)
        )


@contextlib.contextmanager
def _step(ex: Exchange, actor: Principal, sid: str, steps: Sequence[str]) -> Iterator[_Snap]:
    """Claim the session for one step. On a refused message (bad input, a conflict) it goes
    back to ``open`` unchanged, so the step can be retried; on a denial or anything
    unexpected it fails and its artefacts are deleted."""
    snap = _claim(ex, actor, sid, steps)
    try:
        yield snap
    except DeniedError as exc:
        _end(ex, snap, "failed", f"denied:{exc.reason}")
        exc.ledgered = True  # psi.session_failed
        raise
    except (InvalidInputError, ConflictError) as exc:
        if exc.extra.get("fatal"):
            _end(ex, snap, "failed", str(exc.extra.get("reason", exc.code)))
            exc.ledgered = True
        else:
            _release(ex, sid)
        raise
    except BaseException as exc:
        _end(ex, snap, "failed", getattr(exc, "code", "internal"))
        if isinstance(exc, ZonexError):
            exc.ledgered = True
        raise


def _authorize(ex: Exchange, actor: Principal, snap: _Snap, step: str) -> access.Authorization:
    return access.authorize(
        ex, actor, snap.zone, snap.dataset, snap.operation, snap.purpose, step=step
    )


# -- rules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Terms:
    """What a step may do: the stricter of the terms the session opened under (its stored
    params) and the dataset's rules in force now."""

    k: int
    dp: bool
    epsilon: Decimal | None
    plan: list[dict[str, str]]
    max_rows: int
    rules: AnalysisRules
    rules_version: int


def _cannot_comply(detail: str, reason: str) -> InvalidInputError:
    return InvalidInputError(
        f"{detail}; the session is closed and nothing was released", reason=reason, fatal=True
    )


def _terms(ex: Exchange, snap: _Snap, *, encrypted: bool) -> _Terms:
    """Re-read the rules and the dataset's level and take the stricter of them and the
    session's own terms: the larger k, DP if either requires it, at most as many rows per
    subject. A session that cannot comply fails (a fatal error): DP now required but the
    session has no ε (or is ``members``), fewer ids than k for ``cardinality``, a summed column
    no longer summable or its bounds changed, fewer rows per subject after values were
    encrypted (``encrypted``: the zone has answered)."""
    with Session(ex.engine) as s:
        row = access._dataset(s, snap.zone, snap.dataset)
        rules, version = current_rules(s, row)
    params = snap.params
    k = max(int(params["k"]), rules.min_group_size)
    needs_dp = bool(params.get("dp")) or requires_dp(row.level, rules)
    eps = None if params.get("epsilon") is None else Decimal(params["epsilon"])
    if needs_dp and (snap.mode == "members" or eps is None):
        raise _cannot_comply(
            f"releases from this dataset ({row.level}) must now be differentially private "
            + (
                "and membership has no noisy form"
                if snap.mode == "members"
                else "and this session has no epsilon"
            ),
            "dp_required",
        )
    if snap.mode == "cardinality" and snap.x_count < k:
        raise _cannot_comply(f"psi_cardinality now needs at least k = {k} ids", "below_minimum_ids")
    plan = [dict(p) for p in params.get("sums", [])]
    used = int(params.get("max_rows_per_subject", 1))
    max_rows = min(used, rules.max_rows_per_subject)
    if snap.mode == "aggregate":
        try:
            current = _sum_plan(row, rules, [p["column"] for p in plan])
        except InvalidInputError as exc:
            raise _cannot_comply(
                f"the rules changed during the session: {exc.detail}",
                str(exc.extra.get("reason", "rules_changed")),
            ) from exc
        if current != plan:
            raise _cannot_comply(
                "the clamping bounds of a summed column changed during the session",
                "rules_changed",
            )
        if encrypted and max_rows < used:
            raise _cannot_comply(
                "fewer rows per subject are allowed than the values were encrypted with",
                "rules_changed",
            )
    return _Terms(k, needs_dp, eps, plan, max_rows, rules, version)


def _sum_plan(row: DatasetRow, rules: Any, sums: Sequence[str]) -> list[dict[str, str]]:
    """Check that each column may be summed; return its declared bounds (decimal strings)."""
    if len(sums) > MAX_SUM_COLUMNS:
        raise InvalidInputError(f"at most {MAX_SUM_COLUMNS} sum columns")
    if len(set(sums)) != len(sums):
        raise InvalidInputError("a sum column is named twice")
    columns = {c["name"]: c for c in row.columns}
    plan = []
    for name in sums:
        col = columns.get(name)
        if col is None:
            raise InvalidInputError(f"no column {name!r} in the dataset")
        if name == row.subject_column:
            raise InvalidInputError("the subject column cannot be summed")
        if col.get("type") not in NUMERIC_TYPES:
            raise InvalidInputError(f"column {name!r} is not numeric", reason="not_summable")
        rule = rules.rule_for(name)
        level = col.get("level", row.level)
        if not effective_disclosure(rule.disclosure, level).may_aggregate:
            raise InvalidInputError(
                f"the analysis rules do not let column {name!r} be aggregated",
                reason="not_summable",
            )
        if not rule.bounded:
            raise InvalidInputError(
                f"column {name!r} has no clamping bounds in the analysis rules; the provider must "
                "declare [lower, upper] before it can be summed",
                reason="unbounded_column",
            )
        plan.append({"column": name, "lower": str(rule.lower), "upper": str(rule.upper)})
    return plan


# -- step 1: create ---------------------------------------------------------------------------


def create_session(
    ex: Exchange,
    actor: Principal,
    *,
    zone: str,
    dataset: str,
    mode: str,
    purpose: str,
    x_count: int,
    sums: Sequence[str] = (),
    epsilon: object = None,
    context: str | None = None,
    protocol: str | None = None,
) -> dict[str, Any]:
    """Open a session after checking the grant, the limits and the rules; no data moves yet.
    ``protocol`` ``epoch`` binds it to the dataset's prepared epoch (:mod:`.psi_epoch`); left
    out, the epoch is used when one is ready and |Y| is large against |X|."""
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(MODES)}")
    auth = access.authorize(ex, actor, zone, dataset, MODES[mode], purpose, step="create")
    cfg = ex.settings
    if isinstance(x_count, bool) or not isinstance(x_count, int) or x_count < 1:
        raise InvalidInputError("the id list is empty", reason="empty_input")
    if x_count > cfg.psi_max_items:
        raise InvalidInputError(
            f"at most {cfg.psi_max_items} ids per session", reason="too_many_ids"
        )
    eps = None
    if epsilon is not None:
        eps = dp.parse_epsilon(epsilon, floor=cfg.min_release_epsilon)
    with Session(ex.engine) as s:
        row = access._dataset(s, zone, dataset)
        rules, rules_version = current_rules(s, row)
        level = row.level
        on_node = row.source == "node"
        if on_node:
            _node_online(ex, s, zone)
        if row.row_count > cfg.psi_max_items:
            raise InvalidInputError(
                f"the dataset has more than {cfg.psi_max_items} rows", reason="too_many_ids"
            )
        plan = _sum_plan(row, rules, list(sums)) if mode == "aggregate" else []
        for p in plan:
            lo, hi = _subject_bounds(p["lower"], p["upper"], rules.max_rows_per_subject)
            # before any work: declared bounds x rows must not wrap the plain modulus
            if not he.fits_exactly(he.BFV_DEFAULT, lo=lo, hi=hi, max_rows=row.row_count):
                raise InvalidInputError(
                    f"{row.row_count} rows of {p['column']!r} in [{lo}, {hi}] could exceed the "
                    f"exact capacity {he.bfv_capacity(he.BFV_DEFAULT)} of one BFV sum",
                    reason="capacity",
                )
    k = rules.min_group_size
    if mode != "aggregate" and (sums or context):
        raise InvalidInputError("sum columns and an HE context belong to psi_aggregate only")
    if mode == "cardinality" and x_count < k:
        # one id (or a handful) would turn a count into a membership test
        raise InvalidInputError(
            f"psi_cardinality needs at least k = {k} ids", reason="below_minimum_ids"
        )
    # DP by default (DESIGN, "Privacy defaults"): the consumer chooses the id list, so two
    # sessions differing by one id would tell that subject's membership or value exactly
    needs_dp = requires_dp(level, rules)
    if mode == "members" and needs_dp:
        raise InvalidInputError(
            f"psi_members releases membership exactly, which this {level} dataset allows only "
            "with the provider's exact_release (never at L4 and above); use psi_cardinality or "
            "psi_aggregate with epsilon",
            reason="dp_required",
        )
    if mode == "members" and eps is not None:
        raise InvalidInputError("psi_members takes no epsilon", reason="bad_epsilon")
    if needs_dp and eps is None:
        raise InvalidInputError(
            f"releases over an id list from this {level} dataset are differentially private: "
            "pass epsilon",
            reason="dp_required",
        )
    ctx_digest = None
    if mode == "aggregate":
        if not context:
            raise InvalidInputError("psi_aggregate needs the digest of an uploaded BFV context")
        load_context(ex, context, expected=he.BFV_DEFAULT)
        ctx_digest = context
    from exchange.server.compute import psi_epoch  # epoch mode builds on this module

    epoch = psi_epoch.bind(
        ex,
        zone=zone,
        dataset=dataset,
        snapshot=auth.digest,
        on_node=on_node,
        x_count=x_count,
        requested=protocol,
    )

    sid = "psi_" + secrets.token_urlsafe(24)
    now = _now()
    params = {
        "sums": plan,
        "epsilon": None if eps is None else str(eps),
        "k": k,
        "dp": needs_dp,
        "rules_version": rules_version,
        "max_rows_per_subject": rules.max_rows_per_subject,
    }
    if on_node:
        # the zone's role runs on its node, which draws p itself: no key is kept here
        params["host"] = "node"
    if epoch is not None:
        # the zone answers with its epoch key (psi_epoch.zone_key): no session key is drawn
        params.update(protocol="epoch", epoch=epoch["id"])
    _private_dir(_session_dir(ex, sid))
    if not on_node and epoch is None:
        _write_key(_key_path(ex, zone, sid), cpsi.PsiKey.generate())
    expires = now + timedelta(seconds=cfg.psi_session_seconds)

    def apply(session: Session, draft: EntryDraft) -> None:
        session.add(
            PsiSessionRow(
                id=sid,
                consumer=actor.key_id,
                zone=zone,
                dataset=dataset,
                mode=mode,
                purpose=auth.request.purpose,
                state="open",
                step="created",
                created_at=now,
                expires_at=expires,
                updated_at=now,
                x_count=x_count,
                a_received=0,
                bc_received=0,
                digests={},
                params=params,
                context_digest=ctx_digest,
            )
        )
        session.flush()

    try:
        ex.ledger.append(
            EntryDraft(
                kind="psi.session_opened",
                actor=actor.key_id,
                refs={"zone": zone, "dataset": dataset, "session": sid},
                digests={"context": ctx_digest} if ctx_digest else {},
                attrs={
                    **auth.attrs(),
                    "mode": mode,
                    "x_count": x_count,
                    **({"protocol": "epoch", "epoch": epoch["id"]} if epoch else {}),
                },
            ),
            apply,
        )
    except BaseException:
        _cleanup(ex, zone, sid)
        raise
    sweep_expired(ex)
    return {
        "session": sid,
        "mode": mode,
        "zone": zone,
        "dataset": dataset,
        "label": LABEL,
        "x_count": x_count,
        "k": k,
        "epsilon": params["epsilon"],
        "sums": plan,
        "max_batch_points": cfg.max_psi_batch_bytes // _P,
        "expires_at": expires.isoformat(),
        "protocol": "session" if epoch is None else "epoch",
        "epoch": None if epoch is None else epoch["id"],
        "y_count": None if epoch is None else epoch["y_count"],
    }


def session_info(ex: Exchange, actor: Principal, sid: str) -> dict[str, Any]:
    with Session(ex.engine) as s:
        row = _load(s, actor, sid)
        return {
            "session": row.id,
            "mode": row.mode,
            "zone": row.zone,
            "dataset": row.dataset,
            "state": row.state,
            "step": row.step,
            "x_count": row.x_count,
            "y_count": row.y_count,
            "a_received": row.a_received,
            "bc_received": row.bc_received,
            "expires_at": row.expires_at.isoformat(),
            "error": row.error,
        }


def sweep_expired(ex: Exchange) -> int:
    """End every session past its expiry (artefacts deleted); returns how many."""
    now = _now()
    with Session(ex.engine) as s:
        rows = (
            s.execute(
                select(PsiSessionRow).where(
                    PsiSessionRow.state.not_in(_TERMINAL), PsiSessionRow.expires_at <= now
                )
            )
            .scalars()
            .all()
        )
        snaps = [_snap(r) for r in rows]
    for snap in snaps:
        _end(ex, snap, "expired", "session_expired")
    return len(snaps)


# -- step 2: A, and the zone's answer ----------------------------------------------------------


def put_a_points(
    ex: Exchange, actor: Principal, sid: str, offset: int, body: bytes
) -> dict[str, Any]:
    """Receive one batch of A (in order); the zone re-blinds it. The last batch makes the zone
    compute B (and, for ``aggregate``, the ciphertexts)."""
    with _step(ex, actor, sid, ("created",)) as snap:
        auth = _authorize(ex, actor, snap, "a")
        terms = _terms(ex, snap, encrypted=False)
        if offset != snap.a_received:
            raise ConflictError(
                f"expected the batch at offset {snap.a_received}, got {offset}",
                reason="out_of_order",
            )
        points = _points(body, "A")
        if offset + len(points) > snap.x_count:
            raise InvalidInputError(
                f"more points than the {snap.x_count} ids announced", reason="too_many_ids"
            )
        repeat = _first_repeat(points, offset)
        if repeat is not None:
            raise InvalidInputError(
                f"{repeat}: send each id once (de-duplicate before blinding)",
                reason="duplicate_point",
            )
        folder = _session_dir(ex, sid)
        on_node = snap.params.get("host") == "node"
        if on_node:
            # the zone's node re-blinds A once it is whole; here every point is checked as the
            # zone would check it, so a bad batch is refused now and can be sent again
            _check_points(points, offset)
            _append(folder / "a.bin", offset, points)
        else:
            key = _read_key(ex, snap)
            try:
                a_prime = cpsi.reblind(key, points, workers=ex.settings.psi_workers)
            except VerificationError as exc:
                raise InvalidInputError(_shift(str(exc), offset), reason="bad_point") from exc
            _append(folder / "a_prime.bin", offset, a_prime)
        received = offset + len(points)
        if received < snap.x_count:
            _release(ex, sid, a_received=received)
            return {"received": received, "complete": False}
        if on_node:
            _check_whole(_read_points(folder / "a.bin"), snap.x_count, "A")
            if snap.params.get("epoch"):
                from exchange.server.compute import psi_epoch_node

                # A_e = k_e·A on the node that keeps k_e
                y_count, digests = psi_epoch_node.node_answer(ex, snap, terms, auth.digest)
            else:
                y_count, digests = _node_answer(ex, snap, terms, auth.digest)
        else:
            # A' = p·A is a bijection of A: A' holds a repeat exactly when A does
            _check_whole(_read_points(folder / "a_prime.bin"), snap.x_count, "A")
            if snap.params.get("epoch"):
                from exchange.server.compute import psi_epoch

                y_count, digests = psi_epoch.zone_answer(ex, snap, terms, auth.digest)
            else:
                y_count, digests = _zone_answer(ex, snap, key, terms)
        digests["a_prime"] = _file_digest(folder / "a_prime.bin")
        _release(
            ex,
            sid,
            a_received=received,
            y_count=y_count,
            step="ae_ready" if snap.params.get("epoch") else "b_ready" if y_count else "bc_done",
            digests=digests,
            # the rows per subject the values were encrypted with (the release's noise scale)
            params={**snap.params, "max_rows_per_subject": terms.max_rows},
        )
    return {"received": received, "complete": True, "y_count": y_count}


def _shift(message: str, offset: int) -> str:
    """``point i …`` from :func:`crypto.psi.reblind` with ``i`` counted over the whole upload."""
    head, _, rest = message.partition(" ")
    number, _, tail = rest.partition(" ")
    if head == "point" and number.isdigit():
        return f"point {int(number) + offset} {tail}"
    return message


def _read_y(
    ex: Exchange, snap: _Snap, plan: Sequence[dict[str, str]], limit: int
) -> tuple[list[str], list[list[int]], int]:
    """Y as the zone reads it (:func:`exchange.psi_protocol.read_y`) from a dataset this
    exchange hosts."""
    with Session(ex.engine) as s:
        row = access._dataset(s, snap.zone, snap.dataset)
        subject = row.subject_column
    with open_source(ex, row) as src:
        return read_y(src.engine, src.relation, subject, plan, limit, ex.settings.psi_max_items)


def _zone_answer(
    ex: Exchange, snap: _Snap, key: cpsi.PsiKey, terms: _Terms
) -> tuple[int, dict[str, Any]]:
    """The zone's message: B = p·H(y) over its shuffled subjects (for C), and for
    ``aggregate`` each sum column's per-subject totals encrypted under C's key in B's order."""
    ids, totals, skipped = _read_y(ex, snap, terms.plan, terms.max_rows)
    order = cpsi.shuffled(range(len(ids)))
    domain = cpsi.session_domain(snap.id, LABEL)
    b = cpsi.blind(
        key, domain, [ids[i].encode("utf-8") for i in order], workers=ex.settings.psi_workers
    )
    folder = _session_dir(ex, snap.id)
    (folder / "b.bin").write_bytes(b"".join(b))
    digests: dict[str, Any] = {"b": _file_digest(folder / "b.bin"), "y_skipped": skipped}
    if snap.mode == "aggregate" and ids:
        assert snap.context_digest is not None
        ctx = load_context(ex, snap.context_digest, expected=he.BFV_DEFAULT)
        columns = encrypt_columns(ctx, terms.plan, totals, order, terms.max_rows)
        for j, chunks in enumerate(columns):
            for c, chunk in enumerate(chunks):
                (folder / f"sum{j}.{c}.ct").write_bytes(chunk)
            digests[f"sum{j}"] = str(len(chunks))
    return len(ids), digests


# -- the zone's answer from its node --------------------------------------------------------


def _node_online(ex: Exchange, session: Session, zone: str) -> NodeRow:
    """The active node of a zone whose datasets it hosts, online now (else 503: a session
    could not be answered)."""
    node = dispatch.node_for_zone(session, zone)
    offline = ex.settings.node_offline_seconds
    if (
        node is None
        or node.last_seen is None
        or (_now() - node.last_seen).total_seconds() >= (offline)
    ):
        raise ZoneUnavailableError(
            f"zone {zone!r} is hosted on a node that is offline; retry when the catalog shows "
            "it online"
        )
    return node


def _check_points(points: Sequence[bytes], offset: int) -> None:
    """Every point of a batch of A is a valid point other than the identity (what
    :func:`crypto.psi.reblind` checks), named by its index in the whole upload."""
    for i, p in enumerate(points):
        try:
            cpsi.validate_point(p)
        except VerificationError as exc:
            detail = str(exc).removeprefix("point ")
            raise InvalidInputError(f"point {offset + i} {detail}", reason="bad_point") from exc


def _node_mismatch(what: str) -> dispatch.NodeRefusedError:
    return dispatch.NodeRefusedError(
        f"the zone's node answered {what} other than asked; nothing was released",
        reason="node_mismatch",
    )


def _node_answer(
    ex: Exchange, snap: _Snap, terms: _Terms, snapshot: str
) -> tuple[int, dict[str, Any]]:
    """The zone's message computed on its node (:mod:`exchange.node.psi`): A' = p·A, B and,
    for ``aggregate``, the ciphertexts, uploaded by the node and checked here against the
    digests it signed before they take the places an in-process zone writes them to. The
    exchange never holds p and never reads Y."""
    with Session(ex.engine) as s:
        node = _node_online(ex, s, snap.zone)
    cfg = ex.settings
    folder = _session_dir(ex, snap.id)
    work = _private_dir(folder / "node")
    a_path = folder / "a.bin"
    a_digest = _file_digest(a_path)
    slots = he.slot_count(he.BFV_DEFAULT)
    per_column = -(-cfg.psi_max_items // slots)
    inputs = {"a": a_path}
    outputs = {
        "a_prime": (work / "a_prime", snap.x_count * _P),
        "b": (work / "b", cfg.psi_max_items * _P),
    }
    if snap.mode == "aggregate":
        assert snap.context_digest is not None
        load_context(ex, snap.context_digest, expected=he.BFV_DEFAULT)  # stored and usable
        inputs["context"] = cfg.data_dir / "contexts" / snap.context_digest
        outputs["ciphertexts"] = (
            work / "ciphertexts",
            len(terms.plan) * per_column * (he.max_ciphertext_bytes(he.BFV_DEFAULT) + 4),
        )
    fields = {
        "consumer": snap.consumer,
        "purpose": snap.purpose,
        "session": snap.id,
        "dataset": snap.dataset,
        "snapshot": snapshot,
        "mode": snap.mode,
        "a": {"sha256": a_digest, "count": snap.x_count},
        "sums": terms.plan,
        "max_rows_per_subject": terms.max_rows,
        "context": snap.context_digest,
        "label": LABEL,
        "normalization": NORMALIZATION,
        "k": terms.k,
        "epsilon": snap.params.get("epsilon"),
        "max_items": cfg.psi_max_items,
    }
    answer = dispatch.dispatch(
        ex, node, NODE_TASK_KIND, fields, files=dispatch.TaskFiles(inputs, outputs)
    )
    body = answer.payload
    result = body.get("result")
    want: dict[str, Any] = {
        "zone": snap.zone,
        "session": snap.id,
        "dataset": snap.dataset,
        "mode": snap.mode,
        "x_count": snap.x_count,
    }
    if snap.mode == "aggregate":
        want["bounds"] = {p["column"]: [p["lower"], p["upper"]] for p in terms.plan}
        want["he_context"] = snap.context_digest
    if not isinstance(result, dict) or set(result) != {*want, "y_count"}:
        raise _node_mismatch("a result")
    if any(result[name] != value for name, value in want.items()):
        raise _node_mismatch("another session")
    y = result["y_count"]
    if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y <= cfg.psi_max_items:
        raise _node_mismatch("a count")
    if body.get("snapshot") != snapshot or body.get("a") != _want_a(a_digest, snap.x_count):
        raise _node_mismatch("for another snapshot or list")
    skipped = body.get("y_skipped")
    if not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0:
        raise _node_mismatch("a skipped count")
    signed = body.get("outputs")
    assert isinstance(signed, dict)  # dispatch checked the uploads against it

    def output(name: str, size: int) -> bytes:
        path = outputs[name][0]
        data = path.read_bytes() if path.exists() else b""
        claim = signed.get(name) or {}
        if len(data) != size or claim.get("sha256") != hashlib.sha256(data).hexdigest():
            raise _node_mismatch(f"{name} of another length or digest")
        path.unlink()
        return data

    (folder / "a_prime.bin").write_bytes(output("a_prime", snap.x_count * _P))
    _check_whole(_read_points(folder / "a_prime.bin"), snap.x_count, "A'")
    b = output("b", y * _P)
    _check_whole([b[i : i + _P] for i in range(0, len(b), _P)], y, "B")
    (folder / "b.bin").write_bytes(b)
    digests: dict[str, Any] = {"b": _file_digest(folder / "b.bin"), "y_skipped": skipped}
    if snap.mode == "aggregate" and y:
        per = -(-y // slots)
        count = per * len(terms.plan)
        packed = outputs["ciphertexts"][0]
        data = packed.read_bytes() if packed.exists() else b""
        claim = signed.get("ciphertexts") or {}
        if claim.get("sha256") != hashlib.sha256(data).hexdigest():
            raise _node_mismatch("ciphertexts of another digest")
        try:
            chunks = he.unpack_ciphertexts(
                data, max_items=count, max_item_bytes=he.max_ciphertext_bytes(he.BFV_DEFAULT)
            )
        except CryptoError as exc:
            raise _node_mismatch(f"ciphertexts that do not unpack ({exc})") from exc
        if len(chunks) != count:
            raise _node_mismatch("another number of ciphertexts")
        for j in range(len(terms.plan)):
            for c in range(per):
                (folder / f"sum{j}.{c}.ct").write_bytes(chunks[j * per + c])
            digests[f"sum{j}"] = str(per)
        packed.unlink()
    shutil.rmtree(work, ignore_errors=True)
    a_path.unlink()
    digests["node"] = {"task": body["task"], "key_id": answer.node}
    return y, digests


def _want_a(digest: str, count: int) -> dict[str, Any]:
    """How a node's signed result names the list A it answered."""
    return {"sha256": digest, "count": count}


def _node_result(ex: Exchange, snap: _Snap) -> dispatch.NodeResult | None:
    """The node's verified answer for a session whose zone ran on a node (None in-process),
    read back from its task and verified again under the node's registered key."""
    ref = snap.digests.get("node")
    if not isinstance(ref, dict):
        return None
    with Session(ex.engine) as s:
        row = s.get(NodeTaskRow, str(ref.get("task")))
        principal = s.get(PrincipalRow, str(ref.get("key_id")))
        if row is None or principal is None or row.outcome is None or "result" not in row.outcome:
            raise ConflictError("the node's answer is gone", reason="session_broken")
        task, envelope, public_key = row.bundle["task"], row.outcome["result"], principal.public_key
    payload = verify_result(envelope, VerifyKey(bytes(public_key)), task)
    return dispatch.NodeResult(row.node, bytes(public_key), envelope, payload)


# -- step 3: B for the consumer -------------------------------------------------------------


def get_b_points(ex: Exchange, actor: Principal, sid: str, offset: int, limit: int) -> bytes:
    """A slice of B (a read: it may be repeated until the session ends)."""
    snap = _readable(ex, actor, sid, "b_ready", "b")
    y = snap.y_count or 0
    if offset < 0 or limit < 1 or offset > y:
        raise InvalidInputError("offset and limit must select points of B")
    limit = min(limit, ex.settings.max_psi_batch_bytes // _P, y - offset)
    with (_session_dir(ex, sid) / "b.bin").open("rb") as f:
        f.seek(offset * _P)
        return f.read(limit * _P)


def _readable(ex: Exchange, actor: Principal, sid: str, ready: str, step: str) -> _Snap:
    """A session whose last step is ``ready``, authorized for the read ``step`` under the
    rules in force (a denial or rules it can no longer meet end it)."""
    with Session(ex.engine) as s:
        row = _load(s, actor, sid)
        snap, state, expires = _snap(row), row.state, row.expires_at
    if state not in _TERMINAL and expires <= _now():
        _end(ex, snap, "expired", "session_expired")
        raise _expired_error()
    if state in _TERMINAL:
        raise ConflictError(f"the PSI session is {state}", reason="session_over")
    if snap.step != ready:
        raise ConflictError(f"{step} is not ready: upload A first", reason="out_of_order")
    try:
        _authorize(ex, actor, snap, step)
        _terms(ex, snap, encrypted=True)
    except DeniedError as exc:
        _end(ex, snap, "failed", f"denied:{exc.reason}")
        exc.ledgered = True  # psi.session_failed
        raise
    except InvalidInputError as exc:  # the session can no longer comply with the rules
        _end(ex, snap, "failed", str(exc.extra.get("reason", exc.code)))
        exc.ledgered = True  # psi.session_failed
        raise
    return snap


# -- step 4: B^c ----------------------------------------------------------------------------


def put_bc_points(
    ex: Exchange, actor: Principal, sid: str, offset: int, body: bytes
) -> dict[str, Any]:
    """Receive one batch of B^c = c·B, in B's order. The exchange only compares these points
    (it never multiplies them), so a bad point can only fail to match."""
    with _step(ex, actor, sid, ("b_ready",)) as snap:
        _authorize(ex, actor, snap, "bc")
        _terms(ex, snap, encrypted=True)
        if offset != snap.bc_received:
            raise ConflictError(
                f"expected the batch at offset {snap.bc_received}, got {offset}",
                reason="out_of_order",
            )
        points = _points(body, "B^c")
        y = snap.y_count or 0
        if offset + len(points) > y:
            raise InvalidInputError(f"B has only {y} points", reason="too_many_points")
        repeat = _first_repeat(points, offset)
        if repeat is not None:
            raise InvalidInputError(repeat, reason="duplicate_point")
        folder = _session_dir(ex, sid)
        _append(folder / "bc.bin", offset, points)
        received = offset + len(points)
        if received < y:
            _release(ex, sid, bc_received=received)
            return {"received": received, "complete": False}
        _check_whole(_read_points(folder / "bc.bin"), y, "B^c")
        digests = {**snap.digests, "bc": _file_digest(folder / "bc.bin")}
        _release(ex, sid, bc_received=received, step="bc_done", digests=digests)
    return {"received": received, "complete": True}


# -- step 5: the result -----------------------------------------------------------------------


def finish_session(ex: Exchange, actor: Principal, sid: str) -> dict[str, Any]:
    """Match, release what the mode allows with a receipt, and delete the session's data."""
    with _step(ex, actor, sid, ("bc_done", "f_done")) as snap:
        auth = _authorize(ex, actor, snap, "result")
        # the rules in force at release apply, whatever they were when the session opened
        terms = _terms(ex, snap, encrypted=True)
        a_mask, b_mask = _masks(ex, snap, auth.digest)
        if snap.mode == "members":
            mask = "".join("1" if m else "0" for m in a_mask)
            released: dict[str, Any] = {"members": mask.count("1"), "mask": mask}
            eps = Decimal(0)
        else:
            if snap.mode == "cardinality":
                released, eps = _cardinality(terms, sum(b_mask))
            else:
                released, eps = _aggregate(ex, snap, terms, b_mask)
        response = _receipt(ex, actor, snap, terms, auth, released, eps)
        with Session(ex.engine) as s, s.begin():
            s.execute(
                update(PsiSessionRow)
                .where(PsiSessionRow.id == sid)
                .values(state="done", step="result", updated_at=_now())
            )
        _cleanup(ex, snap.zone, sid)
    return response


def _masks(ex: Exchange, snap: _Snap, snapshot: str) -> tuple[list[int], list[int]]:
    """Which positions of A, and which of B, matched. Nothing is matched but whole lists of
    distinct points, as long as what they answer; in epoch mode F is looked up in the epoch's
    image and the second mask is over I's order (:func:`.psi_epoch.match`)."""
    folder = _session_dir(ex, snap.id)
    a_prime = _read_points(folder / "a_prime.bin")
    _check_whole(a_prime, snap.x_count, "A")
    if snap.params.get("epoch"):
        from exchange.server.compute import psi_epoch

        return psi_epoch.match(ex, snap, snapshot)
    bc = _read_points(folder / "bc.bin")
    _check_whole(bc, snap.y_count or 0, "B^c")
    in_a, in_b = set(a_prime), set(bc)
    return [1 if p in in_b else 0 for p in a_prime], [1 if p in in_a else 0 for p in bc]


def _cardinality(terms: _Terms, count: int) -> tuple[dict[str, Any], Decimal]:
    eps = terms.epsilon
    if eps is None:
        return {"intersection": count, "noised": False}, Decimal(0)
    # one subject moves the count by at most 1 (both sides are de-duplicated)
    return {"intersection": dp.laplace_count(count, eps), "noised": True}, eps


def _aggregate(
    ex: Exchange, snap: _Snap, terms: _Terms, b_mask: list[int]
) -> tuple[dict[str, Any], Decimal]:
    matched = sum(b_mask)
    k, eps, plan, limit = terms.k, terms.epsilon, terms.plan, terms.max_rows
    bounds = {p["column"]: [p["lower"], p["upper"]] for p in plan}
    share = None
    if eps is None:
        # the exact path (the provider's exact_release at L3, or L1/L2): the gate is exact
        if matched < k:
            raise InvalidInputError(
                f"the intersection is smaller than k = {k}; nothing is released",
                reason="below_k",
                fatal=True,
            )
        count = matched
    else:
        share = dp.split_epsilon(eps, 1 + len(plan))
        # the gate reads the noisy COUNT that is released anyway: deciding on it is
        # post-processing and costs no ε beyond COUNT's share. The intersection is one group
        # that always exists (its size may be 0), so the threshold is k and no δ is spent.
        gate = dp.Gate(k, share)
        count = gate.noisy(matched)
        if count < gate.threshold:
            # a closed gate is a release like any other: receipted and charged the whole ε
            # (the consumer learns only that the noisy count fell below k)
            return {
                "count": None,
                "suppressed": True,
                "noised": True,
                "sums": {},
                "bounds": bounds,
                "he_context": snap.context_digest,
            }, eps
    assert snap.context_digest is not None
    ctx = load_context(ex, snap.context_digest, expected=he.BFV_DEFAULT)
    slots = he.slot_count(he.BFV_DEFAULT)
    masks = [b_mask[i : i + slots] for i in range(0, len(b_mask), slots)]
    folder = _session_dir(ex, snap.id)
    sums: dict[str, str] = {}
    for j, p in enumerate(plan):
        chunks = [(folder / f"sum{j}.{c}.ct").read_bytes() for c in range(len(masks))]
        lo, hi = _int_bounds(Decimal(p["lower"]), Decimal(p["upper"]))
        noise = 0
        if share is not None:
            # noise for a true value of 0, rounded: BFV adds integers inside the ciphertext
            drawn = dp.laplace_sum(0, Decimal(lo), Decimal(hi), share, contributions=limit)
            noise = int(drawn.to_integral_value(rounding=ROUND_HALF_EVEN))
        try:
            total = he.masked_total(
                ctx, chunks, masks, noise, bounds=_subject_bounds(p["lower"], p["upper"], limit)
            )
        except CryptoError as exc:
            raise InvalidInputError(
                f"cannot sum column {p['column']!r}: {exc}", fatal=True
            ) from exc
        sums[p["column"]] = b64url_encode(total)
    released = {
        "count": count,
        "suppressed": False,
        "noised": share is not None,
        "sums": sums,
        "bounds": bounds,
        "he_context": snap.context_digest,
    }
    return released, eps or Decimal(0)


def _receipt(
    ex: Exchange,
    actor: Principal,
    snap: _Snap,
    terms: _Terms,
    auth: access.Authorization,
    released: dict[str, Any],
    eps: Decimal,
) -> dict[str, Any]:
    result_doc = {
        "zone": snap.zone,
        "dataset": snap.dataset,
        "mode": snap.mode,
        "session": snap.id,
        "x_count": snap.x_count,
        "y_count": snap.y_count or 0,
        "k": terms.k,
        "epsilon": str(eps),
        "level": auth.level.value,
        **released,
    }
    query = {
        "operation": snap.operation.value,
        "zone": snap.zone,
        "dataset": snap.dataset,
        "purpose": auth.request.purpose,
        "session": snap.id,
        "x_count": snap.x_count,
        "sums": [p["column"] for p in snap.params.get("sums", [])],
        "epsilon": snap.params.get("epsilon"),
        "he_context": snap.context_digest,
    }
    statement: dict[str, Any] = {
        "consumer": actor.key_id,
        "zones": [snap.zone],
        "datasets": [{"zone": snap.zone, "name": snap.dataset, "snapshot": auth.digest}],
        "query_digest": hashlib.sha256(canonicalize(query)).hexdigest(),
        "rules_version": terms.rules_version,
        "grant": auth.decision.rule,
        "policy_version": auth.decision.policy_version,
        "purpose": auth.request.purpose,
        "k": terms.k,
        "epsilon": str(eps),
        "output_level": auth.level.value,
    }
    if snap.context_digest is not None:
        statement["he_context"] = snap.context_digest
    apply = None
    rules = terms.rules
    if eps > 0:

        def apply(session: Session, draft: EntryDraft) -> None:
            state = charge(
                session,
                actor.key_id,
                snap.zone,
                snap.dataset,
                eps,
                rules.epsilon_budget,
                rules.refresh_seconds,
            )
            draft.attrs.update(charge_attrs(state))

    node = _node_result(ex, snap)
    node_attrs: dict[str, str | int] = {}
    if node is not None:
        node_attrs = {
            "node_task": str(node.payload["task"]),
            "node_result": hashlib.sha256(canonicalize(node.envelope)).hexdigest(),
        }
    receipt, _ = record_computation(
        ex,
        kind=snap.operation.value,
        actor=actor.key_id,
        statement=statement,
        result=result_doc,
        refs={"zone": snap.zone, "dataset": snap.dataset, "session": snap.id},
        attrs={
            **auth.attrs(),
            "x_count": snap.x_count,
            "y_count": snap.y_count or 0,
            # provider subject values that were no usable id (counted, never echoed)
            "y_skipped": int(snap.digests.get("y_skipped", 0)),
            "epsilon": str(eps),
            **node_attrs,
        },
        apply=apply,
        node=node,
    )
    return {"result": result_doc, "receipt": receipt}
