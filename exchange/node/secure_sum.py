"""A zone's part of a secure sum, run on the zone's own node (task kind ``secure_sum``).

When a zone is hosted on a node, the exchange keeps the computation's own work (planning, the
checks and authorization, the DP noise on the total, adding the ciphertexts, the receipt:
:mod:`exchange.server.compute.secure_sum`) and hands the zone's part to the node as one task:

1. the node checks the task against its local veto (``secure_sum`` among the refused kinds, the
   largest ε, the smallest k) and that it still holds the snapshots the task names;
2. it checks the query again with the same checker (``named_groups``: the requester names the
   cells), on its own copy of the columns and levels, under the task's rules tightened by its
   veto, and runs it where the rows are;
3. it gates every named cell as an in-process zone does (:func:`exchange.node.engine.cell_vector`):
   under DP on a noisy distinct-subject count (a :class:`exchange.node.dp.Gate` it builds from its
   own check of the query and the share of ε the task names), else on the exact k, refusing
   (``zone_refused``) when no named cell reaches k;
4. it fetches the requester's public HE context (the task input ``context``, checked against the
   digest in the task), encrypts the cell vector, uploads it (the output ``ciphertext``), and
   signs the contribution (the payload an in-process zone signs) with its key, which the
   operator's approval made the zone's registered key. The contribution travels inside the
   node's signed result, next to the upload's SHA-256 and size.

The exchange sees the ciphertext and the signed contribution, as it does for an in-process zone;
it never reads the rows and never sees a cell's value or count before it is encrypted.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from crypto import he
from crypto.envelope import Envelope, sign_envelope
from crypto.errors import CryptoError
from exchange.errors import InvalidInputError
from exchange.node import dp
from exchange.node.engine import (
    CONTRIBUTION_TYPE,
    cell_vector,
    cells_digest,
    contribution_payload,
    parse_cells,
    plain,
    sum_layout,
)
from exchange.node.psi import _upload, fetch_context
from exchange.tasks import TaskRefused, sign_result

if TYPE_CHECKING:
    from exchange.node.agent import NodeAgent

__all__ = ["KIND", "run_secure_sum"]

#: the task kind, also the name a veto file refuses it by (``refuse = ["secure_sum"]``)
KIND = "secure_sum"


def _text(task: dict[str, Any], name: str) -> str:
    value = task.get(name)
    if not isinstance(value, str):
        raise TaskRefused("malformed", f"the task's {name!r} is missing or not text")
    return value


def _decimal(value: object, what: str) -> Decimal:
    try:
        out = Decimal(str(value))
    except InvalidOperation as exc:
        raise TaskRefused("malformed", f"the task's {what} is not a decimal") from exc
    if not out.is_finite() or out <= 0:
        raise TaskRefused("malformed", f"the task's {what} is not positive")
    return out


def run_secure_sum(agent: NodeAgent, task: dict[str, Any]) -> Envelope:
    """Check, run, gate, encrypt and sign this zone's part of one secure sum."""
    from exchange.node.agent import _DIALECTS

    home = agent.home
    computation = _text(task, "computation")
    context = _text(task, "context")
    params = he.PARAMETER_SETS.get(_text(task, "parameter_set"))
    if params is None:
        raise TaskRefused("unsupported", "this node does not know the task's HE parameters")
    io = task.get("io")
    chunk = io.get("chunk_bytes") if isinstance(io, dict) else None
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise TaskRefused("malformed", "the task names no upload chunk size")
    if task.get("named_groups") is not True:
        raise TaskRefused("malformed", "a secure sum's cells are named by the requester")
    dp_task = task.get("dp")
    if not isinstance(dp_task, bool):
        raise TaskRefused("malformed", "the task's dp flag is not a boolean")
    epsilon = _decimal(task.get("epsilon"), "epsilon") if dp_task else None
    slots = he.slot_count(params)
    try:
        cells = parse_cells(task.get("cells"), slots)
    except InvalidInputError as exc:
        raise TaskRefused("malformed", exc.detail) from exc

    veto = home.veto()
    veto.check(KIND, epsilon)
    tables = agent.tables(task, veto.min_k)
    first = home.datasets()[next(iter(tables))]
    with home.source(first) as (engine, _, dialect):
        checked = agent._check(task, tables, _DIALECTS.get(dialect, dialect))
        if checked.dp != dp_task:
            raise TaskRefused(
                "dp_required" if checked.dp else "malformed",
                "the rules here and the task disagree on differential privacy",
            )
        try:
            layout = sum_layout(checked)
        except InvalidInputError as exc:
            raise TaskRefused("query_refused", exc.detail) from exc
        gate: dp.Gate | None = None
        if epsilon is not None:
            # the gate's share of ε, rebuilt from this node's own check of the query: one equal
            # share for each summed value and one for the gate (as the exchange splits it)
            terms = task.get("gate")
            share = _decimal(terms.get("epsilon") if isinstance(terms, dict) else None, "gate")
            if share != dp.split_epsilon(epsilon, len(layout.values) + 1):
                raise TaskRefused("malformed", "the gate's share of epsilon is not the task's")
            gate = dp.Gate(checked.k, share, sensitivity=checked.contributions)
        with engine.connect() as conn:
            raw = [tuple(r) for r in conn.execute(text(checked.sql), dict(checked.params))]
    try:
        vector = cell_vector(checked, raw, cells, params.scheme, slots, gate)
    except InvalidInputError as exc:
        raise TaskRefused("bad_data", exc.detail) from exc
    if gate is None and not any(vector.filled):
        # the exact path only: under DP a refusal would be a free, exact "fewer than k" answer
        raise TaskRefused(
            "zone_refused", f"no named cell has at least k={checked.k} subjects on this node"
        )
    ctx = fetch_context(agent._http, task["id"], context, params)
    try:
        ciphertext = he.encrypt_vector(ctx, vector.values)
    except CryptoError as exc:
        raise TaskRefused("bad_data", f"cannot encrypt the cells: {exc}") from exc
    _upload(agent._http, task["id"], "ciphertext", ciphertext, chunk)
    snapshots = {name: str(task["datasets"][name]) for name in checked.datasets}
    payload = contribution_payload(
        computation=computation,
        consumer=str(task["consumer"]),
        zone=home.zone,
        context=context,
        checked=checked,
        cells=cells_digest(cells),
        length=len(cells) * len(layout.values),
        ciphertext=ciphertext,
        snapshots=snapshots,
        exact=vector if gate is None else None,
    )
    contribution = sign_envelope(CONTRIBUTION_TYPE, payload, [home.key])
    body: dict[str, Any] = {
        "computation": computation,
        "query": checked.digest,
        "datasets": {name: str(snapshot) for name, snapshot in task["datasets"].items()},
        "k": checked.k,
        "epsilon": None if epsilon is None else str(task["epsilon"]),
        "gate": None
        if gate is None
        else {
            "k": gate.k,
            "threshold": gate.threshold,
            "epsilon": plain(gate.epsilon),
            "sensitivity": str(gate.sensitivity),
            "scale": plain(gate.scale),
        },
        "contribution": contribution.model_dump(mode="json"),
        "outputs": {
            "ciphertext": {
                "sha256": hashlib.sha256(ciphertext).hexdigest(),
                "bytes": len(ciphertext),
            }
        },
    }
    return sign_result(home.key, task, body)
