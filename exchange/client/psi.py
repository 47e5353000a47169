"""The consumer's side of a private join. Runs on the consumer's machine: its ids, its PSI
scalar and its HE secret key never leave this process.

:func:`run` drives one session through the exchange (``docs/psi.md``):

1. normalize the ids (:func:`exchange.server.compute.psi.normalize_id`), drop empty ones and
   de-duplicate (equal ids would give equal points, and the exchange refuses repeats); an id
   with a control or format character, or too long, stops the run naming its row
   (:class:`BadIdError`);
2. for ``aggregate``, make a fresh BFV key pair and upload the public context only;
3. open the session, shuffle the distinct ids with a secret permutation, blind them with a
   fresh scalar c and upload A = c·H(x) in ordered batches;
4. download B = p·H(y), re-blind it (every point is checked: a provider cannot probe c with a
   crafted point) and upload B^c;
   In epoch mode (``docs/psi.md``, "Epoch mode": chosen by the exchange for an unbalanced
   join, or asked for with ``protocol="epoch"``) it hashes under the epoch's domain instead,
   downloads A_e = k_e·A (|X| points, checked), and uploads F = c⁻¹·A_e: nothing it
   downloads or computes grows with |Y|;
5. ask for the result and interpret it locally: map a membership mask back through the secret
   permutation to the caller's rows, or decrypt the sums and compute averages. A
   differentially private ``aggregate`` whose noisy count fell below k comes back
   ``suppressed``: no count, no sums, ε spent all the same (``docs/psi.md``).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crypto import he
from crypto import psi as cpsi
from crypto.encoding import b64url_decode
from exchange.errors import InvalidInputError
from exchange.psi_epoch import epoch_domain
from exchange.psi_protocol import LABEL, MODES, id_bytes, normalize_id

if TYPE_CHECKING:
    from exchange.client.sdk import Client

__all__ = [
    "DEFAULT_BATCH_POINTS",
    "BadIdError",
    "Prepared",
    "Progress",
    "prepare_ids",
    "read_ids",
    "run",
]

#: points per upload or download batch (2 MiB of points)
DEFAULT_BATCH_POINTS = 65_536

#: ``progress(phase, done, total)``; phases: blind, send A, zone, receive B, send B^c (receive
#: A_e, send F in epoch mode), result
Progress = Callable[[str, int, int], None]


def _no_progress(phase: str, done: int, total: int) -> None:
    return None


def read_ids(path: Path, column: str) -> list[str]:
    """The raw cells of ``column`` in a UTF-8 CSV file with a header row (a BOM is ignored)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ValueError(f"{path}: no column {column!r} in the header")
        return [row[column] for row in reader]


@dataclass(frozen=True)
class Prepared:
    """The caller's ids, normalized and de-duplicated: ``distinct[row_of[i]]`` is row ``i``'s id
    (``row_of[i]`` is ``None`` for a row without an id)."""

    distinct: list[str]
    row_of: list[int | None] = field(repr=False)

    @property
    def skipped(self) -> int:
        return sum(1 for r in self.row_of if r is None)


class BadIdError(ValueError):
    """An id that is no usable id (a control or format character, too long). ``row`` counts
    from 1; the message names the row, never the value."""

    def __init__(self, row: int, detail: str) -> None:
        super().__init__(f"row {row}: {detail}")
        self.row = row


def prepare_ids(ids: Iterable[object]) -> Prepared:
    """Normalize and de-duplicate ``ids``, refusing (before anything is sent) the first one
    that is no usable id."""
    index: dict[str, int] = {}
    row_of: list[int | None] = []
    for n, value in enumerate(ids, start=1):
        try:
            ident = normalize_id(value)
            if ident is not None:
                id_bytes(ident)
        except InvalidInputError as exc:
            raise BadIdError(n, exc.detail) from None
        if ident is None:
            row_of.append(None)
            continue
        row_of.append(index.setdefault(ident, len(index)))
    return Prepared(list(index), row_of)


def _batches(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def run(
    client: Client,
    *,
    zone: str,
    dataset: str,
    mode: str,
    ids: Sequence[object],
    purpose: str,
    sums: Sequence[str] = (),
    epsilon: Decimal | str | None = None,
    batch_points: int = DEFAULT_BATCH_POINTS,
    progress: Progress | None = None,
    workers: int | None = None,
    protocol: str | None = None,
) -> dict[str, Any]:
    """One private join; returns ``{"result", "receipt", "local"}``.

    ``protocol`` (``session`` or ``epoch``) overrides the exchange's choice (``epoch`` for an
    unbalanced join with a prepared epoch).

    ``result`` and ``receipt`` are the exchange's signed answer (``zonex receipt verify``
    checks them); ``local`` is what only this machine can read: for ``members`` one boolean per
    input row, for ``aggregate`` the decrypted sums and averages.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    report = progress or _no_progress
    prepared = prepare_ids(ids)
    if not prepared.distinct:
        raise ValueError("no ids to join (every cell is empty)")
    secret_ctx = None
    context = None
    if mode == "aggregate":
        secret_ctx = he.new_context(he.BFV_DEFAULT)
        context = client.upload_context(he.public_context_bytes(secret_ctx))["digest"]
    session = client.psi_create(
        zone=zone,
        dataset=dataset,
        mode=mode,
        purpose=purpose,
        x_count=len(prepared.distinct),
        sums=list(sums),
        epsilon=None if epsilon is None else str(epsilon),
        context=context,
        **({} if protocol is None else {"protocol": protocol}),
    )
    sid = session["session"]
    size = max(1, min(batch_points, int(session["max_batch_points"])))
    key = cpsi.PsiKey.generate()
    epoch = session.get("epoch") if session.get("protocol") == "epoch" else None
    domain = epoch_domain(epoch) if epoch else cpsi.session_domain(sid, LABEL)
    # a secret order: positions in A say nothing about the ids (they may arrive sorted)
    order = cpsi.shuffled(range(len(prepared.distinct)))
    n = len(order)
    answer: dict[str, Any] = {}
    for start, end in _batches(n, size):
        items = [prepared.distinct[i].encode("utf-8") for i in order[start:end]]
        points = cpsi.blind(key, domain, items, workers=workers)
        report("blind", end, n)
        if end == n:
            report("zone", 0, 1)
        answer = client.psi_put_a(sid, start, b"".join(points))
        report("send A", end, n)
    report("zone", 1, 1)
    if epoch:
        _epoch_exchange(client, sid, key, n, size, report, workers)
    else:
        _session_exchange(client, sid, key, int(answer.get("y_count", 0)), size, report, workers)
    response: dict[str, Any] = client.psi_result(sid)
    report("result", 1, 1)
    response["local"] = _interpret(response["result"], prepared, order, secret_ctx)
    return response


def _session_exchange(
    client: Client,
    sid: str,
    key: cpsi.PsiKey,
    y: int,
    size: int,
    report: Progress,
    workers: int | None,
) -> None:
    """The per-session protocol: download B = p·H(y) and upload B^c = c·B (every point of B is
    checked before it is multiplied)."""
    for start, end in _batches(y, size):
        data = client.psi_get_b(sid, start, end - start)
        report("receive B", end, y)
        b = [data[i : i + cpsi.POINT_BYTES] for i in range(0, len(data), cpsi.POINT_BYTES)]
        if len(b) != end - start:
            raise ValueError("the exchange sent a short batch of B")
        client.psi_put_bc(sid, start, b"".join(cpsi.reblind(key, b, workers=workers)))
        report("send B^c", end, y)


def _epoch_exchange(
    client: Client,
    sid: str,
    key: cpsi.PsiKey,
    n: int,
    size: int,
    report: Progress,
    workers: int | None,
) -> None:
    """Epoch mode: download A_e = k_e·A and upload F = c⁻¹·A_e, both |X| points in A's order
    (every point of A_e is checked before it is multiplied)."""
    for start, end in _batches(n, size):
        data = client.psi_get_ae(sid, start, end - start)
        report("receive A_e", end, n)
        a_e = [data[i : i + cpsi.POINT_BYTES] for i in range(0, len(data), cpsi.POINT_BYTES)]
        if len(a_e) != end - start:
            raise ValueError("the exchange sent a short batch of A_e")
        client.psi_put_f(sid, start, b"".join(cpsi.unblind(key, a_e, workers=workers)))
        report("send F", end, n)


def _interpret(
    result: dict[str, Any], prepared: Prepared, order: Sequence[int], secret_ctx: Any
) -> dict[str, Any]:
    mode = result["mode"]
    local: dict[str, Any] = {"ids": len(prepared.row_of), "distinct": len(prepared.distinct)}
    local["skipped_empty"] = prepared.skipped
    if mode == "cardinality":
        local["intersection"] = result["intersection"]
    elif mode == "members":
        mask = result["mask"]
        if len(mask) != len(order):
            raise ValueError("the membership mask does not match the ids sent")
        member = [False] * len(order)
        for position, i in enumerate(order):
            member[i] = mask[position] == "1"
        local["members"] = [r is not None and member[r] for r in prepared.row_of]
        local["intersection"] = sum(member)
    elif result.get("suppressed"):
        # the noisy count fell below k: nothing but that fact was released
        local.update(suppressed=True, count=None, sums={}, averages={})
    else:
        count = int(result["count"])
        local["suppressed"] = False
        totals = {
            name: he.decrypt_total(secret_ctx, b64url_decode(blob))
            for name, blob in result["sums"].items()
        }
        local["count"] = count
        local["sums"] = totals
        local["averages"] = {
            name: (str(Decimal(total) / Decimal(count)) if count > 0 else None)
            for name, total in totals.items()
        }
    return local
