"""The zone's role of a private join, run on the zone's own node (task kind ``psi_zone``).

When a dataset is hosted on a node, the exchange keeps its part of the protocol (``docs/psi.md``:
matching doubly blinded points, the masked HE sum, DP, the gates and the receipt) and hands the
zone's part to the node as one task, sent when the consumer's list A is complete:

1. the node checks the task against its local veto (``psi_zone`` among the refused kinds, the
   largest ε, the smallest k) and that it still holds the snapshot the task names;
2. it draws the session's scalar p here, in memory (it is never written anywhere and is gone
   when the task ends), fetches A (``GET /v1/node/tasks/{id}/inputs/a``), checks its digest and
   computes A' = p·A, every point checked;
3. it reads Y where the rows live, normalizes, de-duplicates, shuffles and computes
   B = p·H(y), and for ``aggregate`` each subject's clipped totals encrypted under the consumer's
   public context (fetched as the input ``context``, checked against the digest in the task),
   in B's order: the functions the exchange uses for an in-process zone
   (:mod:`exchange.psi_protocol`);
4. it uploads A', B and the framed ciphertexts (``PUT /v1/node/tasks/{id}/outputs/{name}``) and
   signs a result naming each output's SHA-256 and size, |X|, |Y| and the parameters it worked
   under. The exchange checks the uploads against those digests before it uses them.

The exchange sees A, A', B and ciphertexts, as it does for an in-process zone; it never holds p,
never reads Y and never sees a value before it is encrypted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from crypto import he
from crypto import psi as cpsi
from crypto.envelope import Envelope
from crypto.errors import CryptoError, VerificationError
from exchange.errors import InvalidInputError
from exchange.node.home import HostedDataset, NodeHome
from exchange.psi_protocol import (
    LABEL,
    MAX_SUM_COLUMNS,
    MODES,
    NORMALIZATION,
    encrypt_columns,
    read_y,
)
from exchange.tasks import TaskRefused, sign_result

__all__ = ["KIND", "run_psi_zone"]

#: the task kind, also the name a veto file refuses it by (``refuse = ["psi_zone"]``)
KIND = "psi_zone"
_P = cpsi.POINT_BYTES
#: bytes asked for per input request
_READ_BYTES = 8 << 20


def _field(task: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = task.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TaskRefused("malformed", f"the task's {name!r} is missing or of the wrong type")
    return value


def _epsilon(task: dict[str, Any]) -> Decimal | None:
    raw = task.get("epsilon")
    if raw is None:
        return None
    try:
        value = Decimal(str(raw))
    except InvalidOperation as exc:
        raise TaskRefused("malformed", "the task's epsilon is not a decimal") from exc
    if not value.is_finite() or value <= 0:
        raise TaskRefused("malformed", "the task's epsilon is not positive")
    return value


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return (
        str(body.get("detail") or body.get("title") or body)[:200] if isinstance(body, dict) else ""
    )


def _fetch(http: httpx.Client, task_id: str, name: str, size: int) -> bytes:
    """The task's input ``name``, exactly ``size`` bytes, in slices."""
    out = bytearray()
    while len(out) < size:
        response = http.get(
            f"/v1/node/tasks/{task_id}/inputs/{name}",
            params={"offset": len(out), "limit": min(_READ_BYTES, size - len(out))},
        )
        if response.status_code != 200:
            raise TaskRefused("input_unavailable", f"could not fetch {name}: {_problem(response)}")
        if not response.content:
            break
        out += response.content
    if len(out) != size:
        raise TaskRefused("bad_input", f"the input {name} is not {size} bytes")
    return bytes(out)


def put_chunks(http: httpx.Client, url: str, data: bytes, chunk: int) -> httpx.Response | None:
    """PUT ``data`` to ``url`` in chunks of at most ``chunk`` bytes, each at its ``offset``
    (one empty chunk for empty data); the answer that refused one, or None."""
    offset = 0
    while True:
        part = data[offset : offset + chunk]
        response = http.put(
            url,
            params={"offset": offset},
            content=part,
            headers={"content-type": "application/octet-stream"},
        )
        if response.status_code != 200:
            return response
        offset += len(part)
        if offset >= len(data):
            return None


def _upload(http: httpx.Client, task_id: str, name: str, data: bytes, chunk: int) -> None:
    """Send a task's output in chunks of at most ``chunk`` bytes."""
    refused = put_chunks(http, f"/v1/node/tasks/{task_id}/outputs/{name}", data, chunk)
    if refused is not None:
        raise TaskRefused("output_refused", f"the exchange refused {name}: {_problem(refused)}")


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _plan(task: dict[str, Any], mode: str) -> list[dict[str, str]]:
    sums = task.get("sums") or []
    if not isinstance(sums, list) or len(sums) > MAX_SUM_COLUMNS:
        raise TaskRefused("malformed", "the task's sums are not a list of sum columns")
    plan: list[dict[str, str]] = []
    for p in sums:
        if not isinstance(p, dict) or set(p) != {"column", "lower", "upper"}:
            raise TaskRefused("malformed", "a sum column is {column, lower, upper}")
        try:
            lower, upper = Decimal(str(p["lower"])), Decimal(str(p["upper"]))
        except InvalidOperation as exc:
            raise TaskRefused("malformed", "a sum column's bounds are not decimals") from exc
        if not (lower.is_finite() and upper.is_finite()) or lower > upper:
            raise TaskRefused("malformed", "a sum column's bounds are not an interval")
        plan.append(
            {"column": str(p["column"]), "lower": str(p["lower"]), "upper": str(p["upper"])}
        )
    if mode == "aggregate" and not plan:
        raise TaskRefused("malformed", "psi_aggregate names at least one sum column")
    if mode != "aggregate" and plan:
        raise TaskRefused("malformed", "only psi_aggregate sums columns")
    return plan


@dataclass(frozen=True)
class SessionTask:
    """A private-join task's zone role, its fields checked (:func:`session_task`)."""

    mode: str
    session: str
    name: str
    snapshot: str
    dataset: HostedDataset
    k: int
    limit: int
    max_items: int
    a_sha256: object
    x_count: int
    chunk: int
    plan: list[dict[str, str]]
    epsilon: Decimal | None

    def fetch_a(self, http: httpx.Client, task_id: str) -> list[bytes]:
        """The consumer's A (task input ``a``), checked against the task's digest."""
        data = _fetch(http, task_id, "a", self.x_count * _P)
        if hashlib.sha256(data).hexdigest() != self.a_sha256:
            raise TaskRefused("bad_input", "A does not match the digest in the task")
        return [data[i : i + _P] for i in range(0, len(data), _P)]

    def result(self, zone: str, y_count: int) -> dict[str, Any]:
        return {
            "zone": zone,
            "session": self.session,
            "dataset": self.name,
            "mode": self.mode,
            "x_count": self.x_count,
            "y_count": y_count,
        }

    def sign(
        self,
        home: NodeHome,
        http: httpx.Client,
        task: dict[str, Any],
        outputs: dict[str, bytes],
        **fields: Any,
    ) -> Envelope:
        """Upload ``outputs`` and sign the result naming their digests (``fields``: what the
        result adds: the released result, the counts, the epoch)."""
        for output, blob in outputs.items():
            _upload(http, task["id"], output, blob, self.chunk)
        body = {
            "snapshot": self.snapshot,
            "a": {"sha256": self.a_sha256, "count": self.x_count},
            "outputs": {output: _digest(blob) for output, blob in outputs.items()},
            "k": self.k,
            "epsilon": None if self.epsilon is None else str(task.get("epsilon")),
            **fields,
        }
        return sign_result(home.key, task, body)


def session_task(home: NodeHome, task: dict[str, Any], kind: str) -> SessionTask:
    """Check a private-join task (per session or epoch) against this node: its fields, the
    hashing it asks for, the local veto for ``kind``, and the dataset and snapshot it names."""
    mode = _field(task, "mode", str)
    if mode not in MODES:
        raise TaskRefused("malformed", f"unknown private-join mode {mode[:16]!r}")
    session = _field(task, "session", str)
    name = _field(task, "dataset", str)
    snapshot = _field(task, "snapshot", str)
    k = _field(task, "k", int)
    limit = _field(task, "max_rows_per_subject", int)
    max_items = _field(task, "max_items", int)
    a_spec = _field(task, "a", dict)
    io = _field(task, "io", dict)
    if task.get("label") != LABEL or task.get("normalization") != NORMALIZATION:
        raise TaskRefused(
            "unsupported", "the task hashes or normalizes ids otherwise than this node"
        )
    epsilon = _epsilon(task)
    plan = _plan(task, mode)

    veto = home.veto()
    veto.check(kind, epsilon)
    if veto.k(k) > k:
        raise TaskRefused("vetoed", f"this node releases no group smaller than {veto.k(k)}")
    dataset = home.datasets().get(name)
    if dataset is None:
        raise TaskRefused("unknown_dataset", f"this node hosts no dataset {name!r}")
    if dataset.digest != snapshot:
        raise TaskRefused("snapshot_mismatch", f"{name}: the task is for another snapshot")
    columns = {c["name"] for c in dataset.columns}
    if any(p["column"] not in columns for p in plan):
        raise TaskRefused("malformed", f"{name}: a sum column is not in the dataset")

    x_count = a_spec.get("count")
    if not isinstance(x_count, int) or isinstance(x_count, bool) or not 0 < x_count <= max_items:
        raise TaskRefused("malformed", "the task's |A| is not a count")
    chunk = io.get("chunk_bytes")
    if not isinstance(chunk, int) or chunk < _P:
        raise TaskRefused("malformed", "the task names no upload chunk size")
    return SessionTask(
        mode, session, name, snapshot, dataset, k, limit, max_items, a_spec.get("sha256"),
        x_count, chunk, plan, epsilon,
    )  # fmt: skip


def run_psi_zone(home: NodeHome, http: httpx.Client, task: dict[str, Any]) -> Envelope:
    """Run the zone's role of one private-join session and sign what it produced."""
    t = session_task(home, task, KIND)
    mode, plan, limit, max_items, dataset = t.mode, t.plan, t.limit, t.max_items, t.dataset

    # p: drawn here for this session only, held in memory, dropped when the task ends
    key = cpsi.PsiKey.generate()
    try:
        points = t.fetch_a(http, task["id"])
        try:
            a_prime = cpsi.reblind(key, points)
        except VerificationError as exc:
            raise TaskRefused("bad_input", f"A: {exc}") from exc
        with home.source(dataset) as (engine, relation, _):
            try:
                ids, totals, skipped = read_y(
                    engine, relation, dataset.subject_column, plan, limit, max_items
                )
            except InvalidInputError as exc:
                raise TaskRefused("bad_data", exc.detail) from exc
        order = cpsi.shuffled(range(len(ids)))
        domain = cpsi.session_domain(t.session, LABEL)
        b = cpsi.blind(key, domain, [ids[i].encode("utf-8") for i in order])
    finally:
        del key
    outputs: dict[str, bytes] = {"a_prime": b"".join(a_prime), "b": b"".join(b)}
    chunks: list[int] = []
    result = t.result(home.zone, len(ids))
    if mode == "aggregate":
        context = task.get("context")
        if not isinstance(context, str):
            raise TaskRefused("malformed", "psi_aggregate names the consumer's HE context")
        result["bounds"] = {p["column"]: [p["lower"], p["upper"]] for p in plan}
        result["he_context"] = context
        if ids:
            ctx = fetch_context(http, task["id"], context)
            try:
                encrypted = encrypt_columns(ctx, plan, totals, order, limit)
            except InvalidInputError as exc:
                raise TaskRefused("bad_data", exc.detail) from exc
            chunks = [len(c) for c in encrypted]
            outputs["ciphertexts"] = he.pack_ciphertexts([ct for col in encrypted for ct in col])
    counts = {"a_prime": len(a_prime), "b": len(b), "ciphertexts": chunks}
    return t.sign(home, http, task, outputs, result=result, counts=counts, y_skipped=skipped)


def fetch_context(
    http: httpx.Client, task_id: str, digest: str, params: he.ParameterSet = he.BFV_DEFAULT
) -> Any:
    """The consumer's public context (task input ``context``), fetched and checked against the
    task's digest and parameter set (private joins, secure sums and scoring all fetch it)."""
    most = he.max_public_context_bytes(params)
    response = http.get(
        f"/v1/node/tasks/{task_id}/inputs/context", params={"offset": 0, "limit": most + 1}
    )
    if response.status_code != 200:
        raise TaskRefused("input_unavailable", f"could not fetch the context: {_problem(response)}")
    data = response.content
    if len(data) > most or he.context_digest(data) != digest:
        raise TaskRefused("bad_input", "the HE context does not match the digest in the task")
    try:
        return he.load_public_context(data, max_bytes=most, expected=params)
    except CryptoError as exc:
        raise TaskRefused("bad_input", f"unusable HE context: {exc}") from exc
