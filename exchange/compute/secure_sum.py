"""``secure_sum``: one aggregate vector summed over several zones, readable by the requester only.

The requester (say a statistics bureau) names zones, one SQL aggregate that each zone runs over
its own datasets (``GROUP BY`` plaintext dimensions; ``COUNT`` and clamped ``SUM`` only, the
outputs that add across zones), the **cells** (the group keys it wants, in its order) and its
public HE context (BFV for exact integers, CKKS for decimals). Then:

1. **Each zone** (:func:`contribute`) runs the query through the aggregate pipeline under its
   own analysis rules (``secure_sum`` authorized per dataset, its own k), zeroes every cell whose
   group fails its k gate (and every cell it has no group for), encrypts the cell-major vector
   under the requester's key and signs a contribution (DSSE, payload type
   :data:`CONTRIBUTION_TYPE`) with the zone key: the computation id, the context, the query and
   cells digests, the ciphertext's SHA-256, k and (exact sums only) how many cells it zeroed.
2. **The exchange** (:func:`combine`) verifies every contribution against the zone's registered
   public key and the computation's terms, adds the ciphertexts it cannot read, adds DP noise
   when the sum is differentially private, re-randomizes, and signs a receipt. The ε is charged
   to every dataset of every zone in the receipt's ledger transaction; an overspend aborts it
   and nothing is released.
3. **The requester** decrypts only the total (:mod:`exchange.he_client`).

The sum goes through the same checker as an aggregate (:func:`exchange.compute.aggregate.prepare`)
and inherits its privacy defaults: it is differentially private when any zone's query is (at
L3 and above unless every dataset read opted out with ``exact_release``; always at L4 and
above) or the requester asked (``epsilon``). Then each zone's gate is noisy
(:class:`exchange.dp.Gate` at the zone's k, on the cell's distinct-subject count): the cells are
named by the requester, fixed in advance, so the gate spends a share of ε and no δ. A cell that
fails it contributes zeros, no zone refuses on k, the contributions carry no count of zeroed or
missing cells, and the computation is charged whatever the gates decided. The query's ε is
split equally between the summed values and the gate. Exact sums keep the exact k gate: a zone
with no named cell at k refuses (``zone_refused``).

Failure is all or nothing: a zone that is denied, refuses, fails, or signs with another key
makes the whole computation fail with no partial total, and nothing is ledgered as computed. DP
noise is calibrated to the largest per-subject sensitivity over the zones (each zone's clamping
bounds and rows per subject) and drawn by :mod:`exchange.dp` (OpenDP).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from crypto import he
from crypto.canonical import canonicalize
from crypto.encoding import b64url_encode
from crypto.envelope import Envelope, sign_envelope, verify_envelope
from crypto.errors import CryptoError
from crypto.keys import VerifyKey
from exchange import access, budget, dp
from exchange.compute import aggregate, contexts
from exchange.compute.aggregate import Prepared, default_epsilon, release_epsilon
from exchange.domain import Principal
from exchange.errors import BudgetExhaustedError, InvalidInputError, ZonexError
from exchange.keyfile import load_private_key
from exchange.ledger import EntryDraft
from exchange.receipts import record_computation
from exchange.runtime import Exchange
from policy import Operation
from policy.levels import max_level

__all__ = [
    "CONTRIBUTION_TYPE",
    "Contribution",
    "Plan",
    "combine",
    "contribute",
    "plan_sum",
    "run_secure_sum",
]

log = logging.getLogger("zonex.secure_sum")

CONTRIBUTION_TYPE = "application/vnd.zonex.secure-sum-contribution+json"
CONTRIBUTION_VERSION = "zonex.secure-sum-contribution.v1"
#: the outputs that add up across zones
_ADDITIVE = ("count", "sum")


@dataclass(frozen=True)
class Plan:
    """The terms every zone and the exchange agree on for one computation."""

    id: str
    consumer: str
    zones: tuple[str, ...]
    sql: str
    purpose: str
    context: str
    params: he.ParameterSet
    cells: tuple[tuple[str, ...], ...]
    epsilon: Decimal | None

    @property
    def cells_digest(self) -> str:
        return hashlib.sha256(canonicalize([list(c) for c in self.cells])).hexdigest()


@dataclass(frozen=True)
class Contribution:
    """One zone's signed, encrypted part (and, for the exchange's bookkeeping, what it ran)."""

    zone: str
    envelope: Envelope
    ciphertext: bytes
    prepared: Prepared
    values: tuple[str, ...]


def _cells(raw: object, slots: int) -> tuple[tuple[str, ...], ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidInputError("cells is a non-empty list of group keys")
    cells: list[tuple[str, ...]] = []
    for cell in raw:
        if not isinstance(cell, list) or any(not isinstance(v, str) or len(v) > 200 for v in cell):
            raise InvalidInputError("each cell is a list of group values (strings)")
        cells.append(tuple(cell))
    if len(set(cells)) != len(cells):
        raise InvalidInputError("each cell may be named once")
    if len({len(c) for c in cells}) != 1:
        raise InvalidInputError("every cell names one value per GROUP BY column")
    if len(cells) > slots:
        raise InvalidInputError(f"at most {slots} cells fit one ciphertext")
    return tuple(cells)


def plan_sum(
    ex: Exchange,
    actor: Principal,
    *,
    zones: Sequence[str],
    sql: str,
    purpose: str,
    context: str,
    cells: object,
    epsilon: object = None,
) -> Plan:
    """Check the request's shape and fix its terms (no data is touched)."""
    names = list(zones)
    limit = ex.settings.max_secure_sum_zones
    if not 1 <= len(names) <= limit or len(set(names)) != len(names):
        raise InvalidInputError(f"name 1..{limit} distinct zones")
    ctx = contexts.load_context(ex, context)
    params = he.parameters_of(ctx)
    return Plan(
        id="ss-" + secrets.token_hex(12),
        consumer=actor.key_id,
        zones=tuple(names),
        sql=sql,
        purpose=purpose,
        context=context,
        params=params,
        cells=_cells(cells, he.slot_count(params)),
        epsilon=release_epsilon(ex, epsilon),
    )


def _key(value: object) -> str | None:
    """A group value as the text a requester names it by."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        text = format(value.normalize(), "f")
        return "0" if text in ("-0", "0") else text
    return str(value)


def _value(value: object, scheme: str, what: str) -> int | float:
    if value is None:
        return 0
    if scheme == "ckks":
        return float(value)  # type: ignore[arg-type]
    exact = value if isinstance(value, int) else Decimal(str(value))
    if isinstance(exact, Decimal):
        if exact != exact.to_integral_value():
            raise InvalidInputError(
                f"{what} is fractional: a BFV context sums integers exactly; use a CKKS context"
            )
        return int(exact)
    return exact


def _shape(prepared: Prepared) -> tuple[list[int], list[int], tuple[str, ...]]:
    """Result-column indexes of the dimensions and of the additive values, and value names."""
    checked = prepared.checked
    dims: list[int] = []
    values: list[int] = []
    names: list[str] = []
    for output, sources in zip(checked.outputs, checked.layout, strict=True):
        if output.kind == "dimension":
            dims.append(sources[0])
        elif output.kind in _ADDITIVE:
            values.append(sources[0])
            names.append(output.name)
        else:
            raise InvalidInputError(
                f"{output.kind.upper()} does not add up across zones; use COUNT and SUM",
                reason="not_additive",
            )
    if not values:
        raise InvalidInputError("select at least one COUNT or SUM")
    return dims, values, tuple(names)


def _prepare(ex: Exchange, actor: Principal, plan: Plan, zone: str, with_dp: bool) -> Prepared:
    return aggregate.prepare(
        ex,
        actor,
        zone,
        plan.sql,
        plan.purpose,
        operation=Operation.SECURE_SUM,
        with_dp=with_dp,
        named_groups=True,  # the requester names the cells: no group is found in the data
        step="secure_sum",
    )


def contribute(
    ex: Exchange, plan: Plan, prepared: Prepared, gate: dp.Gate | None = None
) -> Contribution:
    """The zone's part: its own k, its cells, encrypted under the requester's key, signed.

    With ``gate`` (a differentially private sum) each named cell opens on the gate's noisy
    distinct-subject count, a cell that stays shut contributes zeros, and nothing is refused or
    counted; without it the exact k gate applies and a zone with no cell at k refuses."""
    zone = prepared.zone
    checked = prepared.checked
    dims, value_columns, names = _shape(prepared)
    if len(dims) != len(plan.cells[0]):
        raise InvalidInputError(
            f"the query groups by {len(dims)} columns; cells name {len(plan.cells[0])} values"
        )
    width = len(value_columns)
    length = len(plan.cells) * width
    slots = he.slot_count(plan.params)
    if length > slots:
        raise InvalidInputError(f"{len(plan.cells)} cells × {width} values exceed {slots} slots")
    index = {cell: i for i, cell in enumerate(plan.cells)}
    vector: list[int | float] = [0] * length
    filled = [False] * len(plan.cells)
    suppressed = 0
    for row in aggregate.execute(ex, prepared):
        key = tuple(_key(row[d]) for d in dims)
        cell = index.get(key)  # type: ignore[arg-type]
        if cell is None:
            continue  # a group the requester did not name is never released
        distinct = 0 if row[-1] is None else int(row[-1])
        if not (gate.opens(distinct) if gate is not None else distinct >= checked.k):
            suppressed += 1
            continue
        filled[cell] = True
        for v, column in enumerate(value_columns):
            vector[cell * width + v] = _value(row[column], plan.params.scheme, names[v])
    missing = filled.count(False) - suppressed
    if gate is None and not any(filled):
        # the exact path only: under DP a refusal would be a free, exact "fewer than k" answer
        raise InvalidInputError(
            f"zone {zone!r} has no named cell with at least k={checked.k} subjects",
            reason="zone_refused",
            zone=zone,
        )
    ctx = contexts.load_context(ex, plan.context, expected=plan.params)
    try:
        ciphertext = he.encrypt_vector(ctx, vector)
    except CryptoError as exc:
        raise InvalidInputError(f"zone {zone!r} cannot encrypt its part: {exc}") from exc
    payload: dict[str, Any] = {
        "type": CONTRIBUTION_VERSION,
        "computation": plan.id,
        "consumer": plan.consumer,
        "zone": zone,
        "context": plan.context,
        "query": checked.digest,
        "cells": plan.cells_digest,
        "length": length,
        "ciphertext": hashlib.sha256(ciphertext).hexdigest(),
        "datasets": [
            {"name": name, "snapshot": prepared.auths[name].digest} for name in checked.datasets
        ],
        "k": checked.k,
    }
    if gate is None:
        # exact counts of zeroed and absent cells: exact sums only
        payload |= {"suppressed": suppressed, "missing": missing}
    # the zone signs with its own key, kept in its directory (a separate node would hold it)
    signer = load_private_key(ex.zones_dir / zone / "zone.key")
    envelope = sign_envelope(CONTRIBUTION_TYPE, payload, [signer])
    return Contribution(zone, envelope, ciphertext, prepared, names)


def _verify(ex: Exchange, plan: Plan, item: Contribution, length: int) -> dict[str, Any]:
    """The contribution's payload if the zone's registered key signed it for this computation;
    otherwise one collapsed refusal (the reason goes to the log and the ledger)."""
    with Session(ex.engine) as session:
        raw_key = access._zone(session, item.zone).public_key
    why = ""
    payload: Any = None
    try:
        key = VerifyKey(raw_key)
        payload = verify_envelope(item.envelope, CONTRIBUTION_TYPE, {key.key_id: key})
    except CryptoError as exc:
        why = f"signature: {exc}"
    if not why:
        expected = {
            "type": CONTRIBUTION_VERSION,
            "computation": plan.id,
            "consumer": plan.consumer,
            "zone": item.zone,
            "context": plan.context,
            "cells": plan.cells_digest,
            "length": length,
            "ciphertext": hashlib.sha256(item.ciphertext).hexdigest(),
        }
        bad = [
            k for k, v in expected.items() if not isinstance(payload, dict) or payload.get(k) != v
        ]
        why = f"mismatched {', '.join(bad)}" if bad else ""
    if why:
        log.warning("secure_sum %s: contribution of zone %s refused: %s", plan.id, item.zone, why)
        ex.ledger.append(
            EntryDraft(
                kind="he.secure_sum_refused",
                actor=plan.consumer,
                refs={"zone": item.zone, "computation": plan.id},
                attrs={"reason": "contribution_unverified"},
            )
        )
        refused = InvalidInputError(
            f"the contribution of zone {item.zone!r} does not verify",
            reason="contribution_unverified",
            zone=item.zone,
        )
        refused.ledgered = True  # he.secure_sum_refused above
        raise refused
    assert isinstance(payload, dict)
    return payload


def _share(prepared: Prepared, epsilon: Decimal) -> Decimal:
    """One equal share of ``epsilon`` for each summed value and for the gate."""
    _, value_columns, _ = _shape(prepared)
    return dp.split_epsilon(epsilon, len(value_columns) + 1)


def _noise(
    plan: Plan, items: Sequence[Contribution], share: Decimal
) -> tuple[list[int | float], list[dict[str, str]]]:
    """Laplace noise for every cell and value, at the largest sensitivity over the zones."""
    first = items[0]
    _, value_columns, names = _shape(first.prepared)
    contributions = max(c.prepared.checked.contributions for c in items)
    per_value: list[tuple[str, Decimal, Decimal]] = []  # kind, bound, sensitivity
    info: list[dict[str, str]] = []
    for v, column in enumerate(value_columns):
        kind: str = first.prepared.checked.columns[column].kind
        if kind == "sum":
            bound = Decimal(0)
            for c in items:
                _, cols, _ = _shape(c.prepared)
                rc = c.prepared.checked.columns[cols[v]]
                assert rc.lower is not None and rc.upper is not None
                bound = max(bound, abs(rc.lower), abs(rc.upper))
            sensitivity = dp.sum_sensitivity(-bound, bound, contributions)
            mechanism = "laplace"
        else:
            bound, sensitivity, mechanism = Decimal(0), Decimal(contributions), "discrete_laplace"
        per_value.append((kind, bound, sensitivity))
        info.append(
            {
                "value": names[v],
                "mechanism": mechanism,
                "sensitivity": _plain(sensitivity),
                "scale": _plain(dp.scale_for(share, sensitivity)),
                "epsilon": _plain(share),
            }
        )
    noise: list[int | float] = []
    for _ in plan.cells:
        for kind, bound, _ in per_value:
            if kind == "sum":
                drawn = dp.laplace_sum(0, -bound, bound, share, contributions=contributions)
                # rounding the noise of an integer total is post-processing of the release
                noise.append(
                    int(drawn.to_integral_value()) if plan.params.scheme == "bfv" else float(drawn)
                )
            else:
                noise.append(dp.laplace_count(0, share, sensitivity=contributions))
    return noise, info


def _plain(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def combine(
    ex: Exchange, plan: Plan, items: Sequence[Contribution], noise: Sequence[int | float] | None
) -> bytes:
    """Verify every zone's contribution, then add the ciphertexts (and the noise)."""
    if [c.zone for c in items] != list(plan.zones):
        raise InvalidInputError("a contribution is missing or out of order")
    length = len(plan.cells) * len(items[0].values)
    payloads = [_verify(ex, plan, c, length) for c in items]
    if len({p["query"] for p in payloads}) != 1:
        raise InvalidInputError("the zones ran different queries", reason="contribution_unverified")
    ctx = contexts.load_context(ex, plan.context, expected=plan.params)
    try:
        return he.sum_ciphertexts(ctx, [c.ciphertext for c in items], noise)
    except CryptoError as exc:
        raise InvalidInputError(f"cannot add the contributions: {exc}") from exc


def _check_budget(ex: Exchange, consumer: str, terms: Sequence[Any], epsilon: Decimal) -> None:
    with Session(ex.engine) as session:
        for zone, name, total, refresh in terms:
            state = budget.remaining(session, consumer, zone, name, total, refresh)
            if state.spent + epsilon > total:
                raise BudgetExhaustedError(
                    f"privacy budget for {zone}/{name} exhausted: {state.spent} of {total} "
                    f"spent, {epsilon} asked; it refreshes at {state.window_end.isoformat()}",
                    remaining=str(state.remaining),
                )


def run_secure_sum(
    ex: Exchange,
    actor: Principal,
    *,
    zones: Sequence[str],
    sql: str,
    purpose: str,
    context: str,
    cells: object,
    epsilon: object = None,
) -> dict[str, Any]:
    """Plan, collect every zone's contribution, combine, receipt (module docstring)."""
    plan = plan_sum(
        ex,
        actor,
        zones=zones,
        sql=sql,
        purpose=purpose,
        context=context,
        cells=cells,
        epsilon=epsilon,
    )
    asked = plan.epsilon is not None
    prepared: list[Prepared] = []
    for zone in plan.zones:
        try:
            prepared.append(_prepare(ex, actor, plan, zone, asked))
        except ZonexError as exc:
            exc.extra.setdefault("zone", zone)
            raise
    with_dp = asked or any(p.checked.dp for p in prepared)
    if with_dp and not all(p.checked.dp for p in prepared):
        # one zone's rules require noise: every zone bounds rows per subject for it
        prepared = [_prepare(ex, actor, plan, zone, True) for zone in plan.zones]
    epsilon = (plan.epsilon or default_epsilon(ex)) if with_dp else None
    shapes = {_shape(p)[2] for p in prepared}
    if len(shapes) != 1:
        raise InvalidInputError("the query's outputs differ between zones")
    terms: list[tuple[str, str, Decimal, int]] = []
    if epsilon is not None:
        terms = [
            (p.zone, name, ruleset.epsilon_budget, ruleset.refresh_seconds)
            for p in prepared
            for name, (ruleset, _) in p.rules.items()
        ]
        _check_budget(ex, actor.key_id, terms, epsilon)

    share = _share(prepared[0], epsilon) if epsilon is not None else None
    gates = {
        p.zone: dp.Gate(p.checked.k, share, sensitivity=p.checked.contributions)
        for p in prepared
        if share is not None
    }
    items: list[Contribution] = []
    for p in prepared:
        try:
            items.append(contribute(ex, plan, p, gates.get(p.zone)))
        except ZonexError as exc:
            exc.extra.setdefault("zone", p.zone)
            raise
    noise, noise_info = _noise(plan, items, share) if share is not None else (None, [])
    total = combine(ex, plan, items, noise)

    checked = [p.checked for p in prepared]
    level = max_level(c.output_level for c in checked)
    envelopes = [c.envelope.model_dump(mode="json") for c in items]
    contributions = [
        {
            "zone": c.zone,
            "envelope": hashlib.sha256(canonicalize(e)).hexdigest(),
            "ciphertext": hashlib.sha256(c.ciphertext).hexdigest(),
        }
        for c, e in zip(items, envelopes, strict=True)
    ]
    eps_text = _plain(epsilon) if epsilon is not None else "0"
    result = {
        "computation": plan.id,
        "zones": list(plan.zones),
        "sql": checked[0].canonical,
        "cells": [list(c) for c in plan.cells],
        "values": list(items[0].values),
        "length": len(plan.cells) * len(items[0].values),
        "scheme": plan.params.scheme,
        "context": plan.context,
        "ciphertext": hashlib.sha256(total).hexdigest(),
        "contributions": contributions,
        "k": {p.zone: p.checked.k for p in prepared},
        "epsilon": eps_text,
        # the cells are named in advance: the gates spend no δ
        "delta": "0",
        "noise": noise_info,
        "gates": [
            {
                "zone": zone,
                "k": gate.k,
                "threshold": gate.threshold,
                "epsilon": _plain(gate.epsilon),
                "sensitivity": str(gate.sensitivity),
                "scale": _plain(gate.scale),
            }
            for zone, gate in gates.items()
        ],
        "level": level.value,
    }
    query = {
        "operation": "secure_sum",
        "zones": list(plan.zones),
        "sql": checked[0].canonical,
        "cells": plan.cells_digest,
        "purpose": plan.purpose,
        "context": plan.context,
        "epsilon": eps_text,
    }
    auths = [(p.zone, a) for p in prepared for a in p.auths.values()]

    def apply(session: Session, draft: EntryDraft) -> None:
        if epsilon is not None:
            for zone, name, total_budget, refresh in terms:
                budget.charge(session, actor.key_id, zone, name, epsilon, total_budget, refresh)

    attrs: dict[str, str | int] = {**auths[0][1].attrs(), "zones": len(plan.zones)}
    for zone, auth in auths:
        attrs[f"rule.{zone}.{auth.request.dataset}"] = auth.decision.rule or ""
    receipt, _ = record_computation(
        ex,
        kind="secure_sum",
        actor=actor.key_id,
        statement={
            "consumer": actor.key_id,
            "zones": list(plan.zones),
            "datasets": [
                {"zone": zone, "name": a.request.dataset, "snapshot": a.digest} for zone, a in auths
            ],
            "query_digest": hashlib.sha256(canonicalize(query)).hexdigest(),
            "rules_version": {
                f"{p.zone}/{name}": version
                for p in prepared
                for name, (_, version) in p.rules.items()
            },
            "grant": ",".join(sorted({a.decision.rule or "" for _, a in auths})),
            "policy_version": max(a.decision.policy_version for _, a in auths),
            "purpose": prepared[0].purpose,
            "k": min(c.k for c in checked),
            "epsilon": eps_text,
            "delta": "0",
            "output_level": level.value,
            "context": plan.context,
            "contributions": [c["envelope"] for c in contributions],
        },
        result=result,
        refs={"computation": plan.id, "zone": ",".join(plan.zones)[:200]},
        attrs=attrs,
        apply=apply,
    )
    return {
        "result": result,
        "receipt": receipt,
        "ciphertext": b64url_encode(total),
        "contributions": envelopes,
    }
