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
3. **The requester** decrypts only the total (:mod:`exchange.client.he`).

The sum goes through the same checker as an aggregate
(:func:`exchange.server.compute.aggregate.prepare`) and inherits its privacy defaults: it is
differentially private when any zone's query is (at L3 and above unless every dataset read opted
out with ``exact_release``; always at L4 and above) or the requester asked (``epsilon``). Then each
zone's gate is noisy (:class:`exchange.node.dp.Gate` at the zone's k, on the cell's
distinct-subject count): the cells are named by the requester, fixed in advance, so the gate spends
a share of ε and no δ. A cell that fails it contributes zeros, no zone refuses on k, the
contributions carry no count of zeroed or missing cells, and the computation is charged whatever
the gates decided. The query's ε is split equally between the summed values and the gate. Exact
sums keep the exact k gate: a zone with no named cell at k refuses (``zone_refused``).

Failure is all or nothing: a zone that is denied, refuses, fails, or signs with another key
makes the whole computation fail with no partial total, and nothing is ledgered as computed. DP
noise is calibrated to the largest per-subject sensitivity over the zones (each zone's clamping
bounds and rows per subject) and drawn by :mod:`exchange.node.dp` (OpenDP).

A zone hosted on its own node (``zonex node serve``) contributes there: the exchange dispatches
a ``secure_sum`` task (:mod:`exchange.node.secure_sum`) naming the computation, the canonical
query, the snapshots and rules, the cells, the context (a task input) and, under DP, the gate's
share of ε. The node checks the query again under its veto, runs it, gates and encrypts the
cells with the same code as an in-process zone (:mod:`exchange.node.engine`), uploads the
ciphertext and signs the contribution with its key, which is the zone's registered key. The
exchange verifies it exactly as an in-process zone's, and checks the upload against the digest
in both the contribution and the node's signed result. An offline node is 503
``zone_unavailable``, a refusal 409 ``node_refused``: the whole computation fails.

The receipt names each zone's node (key id and public key; none for a zone hosted in-process)
and embeds every node's signed result (``node_results``, :mod:`crypto.receipt`): a consumer
checks offline that each node-hosted zone's own key signed the contribution whose digest the
receipt commits to, not only the exchange's word for it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
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
from exchange.domain import Principal
from exchange.errors import (
    BudgetExhaustedError,
    InvalidInputError,
    ZoneUnavailableError,
    ZonexError,
)
from exchange.keyfile import load_private_key
from exchange.node import dp
from exchange.node.engine import (
    CONTRIBUTION_TYPE,
    CONTRIBUTION_VERSION,
    cell_vector,
    cells_digest,
    check_cells,
    contribution_payload,
    parse_cells,
    sum_layout,
)
from exchange.server import access, budget, dispatch
from exchange.server.compute import aggregate, contexts
from exchange.server.compute.aggregate import Prepared, default_epsilon, release_epsilon
from exchange.server.ledger import EntryDraft
from exchange.server.models import NodeRow
from exchange.server.receipts import record_computation
from exchange.server.runtime import Exchange
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

#: the task kind a node-hosted zone's contribution runs as (and a veto file refuses)
NODE_TASK_KIND = "secure_sum"


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
        return cells_digest(self.cells)


@dataclass(frozen=True)
class Contribution:
    """One zone's signed, encrypted part (and, for the exchange's bookkeeping, what it ran)."""

    zone: str
    envelope: Envelope
    ciphertext: bytes
    prepared: Prepared
    values: tuple[str, ...]
    #: the zone's node's verified answer (None for a zone the exchange hosts in-process)
    node: dispatch.NodeResult | None = None


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
        cells=parse_cells(cells, he.slot_count(params)),
        epsilon=release_epsilon(ex, epsilon),
    )


def _shape(prepared: Prepared) -> tuple[list[int], list[int], tuple[str, ...]]:
    """Result-column indexes of the dimensions and of the additive values, and value names."""
    layout = sum_layout(prepared.checked)
    return list(layout.dims), list(layout.values), layout.names


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
    ex: Exchange,
    plan: Plan,
    prepared: Prepared,
    gate: dp.Gate | None = None,
    *,
    epsilon: Decimal | None = None,
) -> Contribution:
    """The zone's part: its own k, its cells, encrypted under the requester's key, signed.

    With ``gate`` (a differentially private sum) each named cell opens on the gate's noisy
    distinct-subject count, a cell that stays shut contributes zeros, and nothing is refused or
    counted; without it the exact k gate applies and a zone with no cell at k refuses.

    A zone hosted on a node contributes there (:func:`_node_contribution`); ``epsilon`` is the
    whole computation's ε, which the node's veto is checked against."""
    zone = prepared.zone
    checked = prepared.checked
    slots = he.slot_count(plan.params)
    layout = sum_layout(checked)
    length = check_cells(layout, plan.cells, slots)
    node = _zone_node(ex, prepared)
    if node is not None:
        if checked.dp and epsilon is None:
            epsilon = plan.epsilon or default_epsilon(ex)
        return _node_contribution(ex, plan, prepared, gate, node, epsilon)
    cells = cell_vector(
        checked, aggregate.execute(ex, prepared), plan.cells, plan.params.scheme, slots, gate
    )
    if gate is None and not any(cells.filled):
        # the exact path only: under DP a refusal would be a free, exact "fewer than k" answer
        raise InvalidInputError(
            f"zone {zone!r} has no named cell with at least k={checked.k} subjects",
            reason="zone_refused",
            zone=zone,
        )
    ctx = contexts.load_context(ex, plan.context, expected=plan.params)
    try:
        ciphertext = he.encrypt_vector(ctx, cells.values)
    except CryptoError as exc:
        raise InvalidInputError(f"zone {zone!r} cannot encrypt its part: {exc}") from exc
    payload = contribution_payload(
        computation=plan.id,
        consumer=plan.consumer,
        zone=zone,
        context=plan.context,
        checked=checked,
        cells=plan.cells_digest,
        length=length,
        ciphertext=ciphertext,
        snapshots={name: auth.digest for name, auth in prepared.auths.items()},
        # exact counts of zeroed and absent cells: exact sums only
        exact=cells if gate is None else None,
    )
    # the zone signs with its own key, kept in its directory (a zone node holds its own)
    signer = load_private_key(ex.zones_dir / zone / "zone.key")
    envelope = sign_envelope(CONTRIBUTION_TYPE, payload, [signer])
    return Contribution(zone, envelope, ciphertext, prepared, layout.names)


# -- a node-hosted zone's contribution ----------------------------------------------------------


def _zone_node(ex: Exchange, prepared: Prepared) -> NodeRow | None:
    """The zone's active node, or None when the exchange hosts the zone's datasets itself."""
    with Session(ex.engine) as session:
        node = dispatch.node_for_zone(session, prepared.zone)
    if node is None and any(r.source == "node" for r in prepared.rows.values()):
        raise ZoneUnavailableError(
            f"zone {prepared.zone!r} is hosted on a node that is not active", zone=prepared.zone
        )
    return node


def _check_nodes_online(ex: Exchange, prepared: Sequence[Prepared]) -> None:
    """Before any zone works: every node-hosted zone's node is online (else 503)."""
    hosted = dispatch.availability(ex)
    for p in prepared:
        where = hosted.get(p.zone)
        if where is not None and not where["online"]:
            raise ZoneUnavailableError(
                f"zone {p.zone!r} is hosted on a node that is offline; retry when the catalog "
                "shows it online",
                zone=p.zone,
            )


def _node_mismatch(zone: str, what: str) -> dispatch.NodeRefusedError:
    return dispatch.NodeRefusedError(
        f"the node of zone {zone!r} answered {what} other than asked; nothing was released",
        reason="node_mismatch",
        zone=zone,
    )


def _node_contribution(
    ex: Exchange,
    plan: Plan,
    prepared: Prepared,
    gate: dp.Gate | None,
    node: NodeRow,
    epsilon: Decimal | None,
) -> Contribution:
    """The zone's part computed on its node (:mod:`exchange.node.secure_sum`): the task names
    the terms, the context travels as the task input ``context`` and the ciphertext comes back
    as the output ``ciphertext``; the node signs the contribution with its (the zone's) key and
    puts it in its signed result with the upload's digest."""
    zone = prepared.zone
    checked = prepared.checked
    snapshots = {name: prepared.auths[name].digest for name in checked.datasets}
    fields: dict[str, Any] = {
        "consumer": plan.consumer,
        "purpose": prepared.purpose,
        "computation": plan.id,
        # the aggregate task's shape (exchange.server.compute.aggregate.host_release)
        "datasets": snapshots,
        "sql": checked.canonical,
        "dp": checked.dp,
        "epsilon": _plain(epsilon) if checked.dp and epsilon is not None else None,
        "named_groups": True,
        "rules": {name: ruleset.to_json() for name, (ruleset, _) in prepared.rules.items()},
        "cells": [list(c) for c in plan.cells],
        "context": plan.context,
        "parameter_set": contexts.context_info(ex, plan.context).parameter_set,
        "gate": None if gate is None else {"epsilon": _plain(gate.epsilon)},
    }
    work = ex.settings.data_dir / "secure_sum" / f"{plan.id}-{secrets.token_hex(4)}"
    work.mkdir(mode=0o700, parents=True)
    out = work / "ciphertext"
    files = dispatch.TaskFiles(
        inputs={"context": ex.settings.data_dir / "contexts" / plan.context},
        outputs={"ciphertext": (out, he.max_ciphertext_bytes(plan.params))},
    )
    try:
        answer = dispatch.dispatch(ex, node, NODE_TASK_KIND, fields, files=files)
        ciphertext = out.read_bytes() if out.exists() else b""
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = answer.payload
    claim = (body.get("outputs") or {}).get("ciphertext") or {}
    if claim.get("sha256") != hashlib.sha256(ciphertext).hexdigest():
        raise _node_mismatch(zone, "a ciphertext of another digest")
    want_gate = None if gate is None else _plain(gate.epsilon)
    got_gate = body.get("gate")
    k = body.get("k")
    if (
        body.get("computation") != plan.id
        or body.get("query") != checked.digest
        or body.get("datasets") != snapshots
        or body.get("epsilon") != fields["epsilon"]
        or not isinstance(k, int)
        or isinstance(k, bool)
        or k < checked.k
        or (want_gate is None) != (got_gate is None)
        or (
            got_gate is not None
            and (
                not isinstance(got_gate, dict)
                or got_gate.get("epsilon") != want_gate
                or got_gate.get("k") != k
            )
        )
    ):
        raise _node_mismatch(zone, "for other terms")
    try:
        envelope = Envelope.model_validate(body.get("contribution"))
    except ValueError as exc:
        raise _node_mismatch(zone, "a contribution that does not parse") from exc
    names = sum_layout(checked).names
    return Contribution(zone, envelope, ciphertext, prepared, names, node=answer)


def _check_node_payload(item: Contribution, payload: dict[str, Any]) -> None:
    """A node's verified contribution was made under the terms its signed result names: the
    authorized query and snapshots, the node's k (at least the authorized one), and counts of
    zeroed cells exactly when the sum is exact."""
    assert item.node is not None
    checked = item.prepared.checked
    snapshots = [
        {"name": name, "snapshot": item.prepared.auths[name].digest} for name in checked.datasets
    ]
    exact = item.node.payload.get("gate") is None
    if (
        payload.get("query") != checked.digest
        or sorted(payload.get("datasets") or [], key=str) != sorted(snapshots, key=str)
        or payload.get("k") != item.node.payload.get("k")
        or ("suppressed" in payload) != exact
        or ("missing" in payload) != exact
    ):
        raise _node_mismatch(item.zone, "a contribution")


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
    for item, payload in zip(items, payloads, strict=True):
        if item.node is not None:
            _check_node_payload(item, payload)
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
    _check_nodes_online(ex, prepared)
    items: list[Contribution] = []
    for p in prepared:
        try:
            items.append(contribute(ex, plan, p, gates.get(p.zone), epsilon=epsilon))
        except ZonexError as exc:
            exc.extra.setdefault("zone", p.zone)
            raise
    noise, noise_info = _noise(plan, items, share) if share is not None else (None, [])
    total = combine(ex, plan, items, noise)

    checked = [p.checked for p in prepared]
    level = max_level(c.output_level for c in checked)
    # a node's k (its veto may raise it) and the gate it built, as it signed them
    ks = {c.zone: int(c.node.payload["k"]) if c.node else c.prepared.checked.k for c in items}
    gate_info = {
        zone: {
            "zone": zone,
            "k": gate.k,
            "threshold": gate.threshold,
            "epsilon": _plain(gate.epsilon),
            "sensitivity": str(gate.sensitivity),
            "scale": _plain(gate.scale),
        }
        for zone, gate in gates.items()
    }
    for c in items:
        if c.node is not None and c.zone in gate_info:
            signed = c.node.payload["gate"]
            gate_info[c.zone] = {
                "zone": c.zone,
                **{f: signed.get(f) for f in ("k", "threshold", "epsilon", "sensitivity", "scale")},
            }
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
        "k": ks,
        "epsilon": eps_text,
        # the cells are named in advance: the gates spend no δ
        "delta": "0",
        "noise": noise_info,
        "gates": [gate_info[zone] for zone in gates],
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
                state = budget.charge(
                    session, actor.key_id, zone, name, epsilon, total_budget, refresh
                )
                draft.attrs.update(budget.charge_attrs(state))

    attrs: dict[str, str | int] = {
        **auths[0][1].attrs(),
        "zones": len(plan.zones),
        "epsilon": eps_text,
    }
    for zone, auth in auths:
        attrs[f"rule.{zone}.{auth.request.dataset}"] = auth.decision.rule or ""
    for c in items:
        if c.node is not None:
            attrs[f"node_task.{c.zone}"] = str(c.node.payload["task"])
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
            "k": min(ks.values()),
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
        # every node's signed result (carrying its signed contribution), for offline checks
        nodes=[(c.zone, c.node) for c in items],
    )
    return {
        "result": result,
        "receipt": receipt,
        "ciphertext": b64url_encode(total),
        "contributions": envelopes,
    }
