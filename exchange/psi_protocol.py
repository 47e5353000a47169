"""What every party of a private join computes the same way (``docs/psi.md``).

The consumer (:mod:`exchange.client.psi`), the zone's role hosted by the exchange
(:mod:`exchange.server.compute.psi`) and the zone's role on a zone node (:mod:`exchange.node.psi`)
import this one module, so an id is normalized, a subject's values are clipped and summed, and
Y is read identically wherever the zone runs. Nothing here touches the exchange's database or
its files: only the arguments (an engine and a relation to read, a public HE context).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from crypto import he
from crypto.errors import CryptoError
from exchange.errors import InvalidInputError
from exchange.subjects import MAX_SUBJECT_ID, check_subject_id
from policy import Operation

if TYPE_CHECKING:  # the consumer imports this module without the node's database stack
    from sqlalchemy import Engine, TableClause

__all__ = [
    "LABEL",
    "MAX_ID_CHARS",
    "MAX_SUM_COLUMNS",
    "MODES",
    "NORMALIZATION",
    "clip",
    "encrypt_columns",
    "id_bytes",
    "int_bounds",
    "normalize_id",
    "read_y",
    "subject_bounds",
]

#: the label hashed into every session's domain (both sides use it)
LABEL = "ids"
MODES: dict[str, Operation] = {
    "cardinality": Operation.PSI_CARDINALITY,
    "members": Operation.PSI_MEMBERS,
    "aggregate": Operation.PSI_AGGREGATE,
}
#: the most numeric columns one ``psi_aggregate`` may sum (one ciphertext each)
MAX_SUM_COLUMNS = 8
#: the most characters of one normalized id (longer ones are refused on both sides)
MAX_ID_CHARS = MAX_SUBJECT_ID
#: the id normalization :func:`normalize_id` applies, named in every task a zone node runs, so
#: a node that normalizes otherwise refuses rather than silently matching nothing
NORMALIZATION: dict[str, Any] = {
    "version": "zonex.psi-id.v1",
    "unicode": "NFC",
    "strip": "unicode-whitespace",
    "case": "kept",
    "max_chars": MAX_ID_CHARS,
    "encoding": "utf-8",
}
_READ_BATCH = 50_000


def normalize_id(value: object) -> str | None:
    """The form in which both sides hash an identifier, or ``None`` for no identifier.

    Text is Unicode NFC with surrounding whitespace (Unicode ``str.strip``) removed; case is
    kept (``ABC`` and ``abc`` are different ids); inner whitespace is kept. A non-text value
    (an integer subject column) is taken as ``str(value)``. Empty results and ``None`` are no
    identifier. The provider's subject values and the consumer's CSV cells pass through this
    same function.

    What is left must be a usable subject id (:func:`exchange.subjects.check_subject_id`, the
    one definition: at most :data:`MAX_ID_CHARS` characters, no control or format character):
    otherwise it is refused (:class:`InvalidInputError`) rather than guessed at. The consumer's
    side names the row, the zone skips the value and counts it; the message never repeats it.
    """
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    text = unicodedata.normalize("NFC", text).strip()
    return check_subject_id(text, what="the id") if text else None


def id_bytes(normalized: str) -> bytes:
    """The bytes hashed for a normalized id: UTF-8."""
    if len(normalized) > MAX_ID_CHARS:
        raise InvalidInputError(f"an id is at most {MAX_ID_CHARS} characters")
    return normalized.encode("utf-8")


def int_bounds(lower: Decimal, upper: Decimal) -> tuple[int, int]:
    """Integer bounds every clipped-and-rounded value lies in."""
    return math.floor(lower), math.ceil(upper)


def subject_bounds(lower: str, upper: str, limit: int) -> tuple[int, int]:
    """Bounds of one subject's total over at most ``limit`` rows clipped to [lower, upper]."""
    lo, hi = int_bounds(Decimal(lower), Decimal(upper))
    return min(lo, limit * lo), max(hi, limit * hi)


def clip(value: object, lower: Decimal, upper: Decimal) -> int:
    """A provider value clipped to the declared bounds and rounded to an integer (BFV sums
    integers; a null contributes 0)."""
    if value is None:
        return 0
    try:
        d = Decimal(str(value))
    except InvalidOperation as exc:
        raise InvalidInputError("a summed column holds a non-numeric value") from exc
    if not d.is_finite():
        return 0
    d = min(max(d, lower), upper)
    return int(d.to_integral_value(rounding=ROUND_HALF_EVEN))


def read_y(
    engine: Engine,
    relation: TableClause,
    subject: str,
    plan: Sequence[dict[str, str]],
    limit: int,
    max_items: int,
) -> tuple[list[str], list[list[int]], int]:
    """The dataset's distinct normalized subject ids, per sum column each subject's clipped
    total over at most ``limit`` rows (further rows are dropped), and how many distinct subject
    values were skipped as no usable id (a control or format character, too long): counted,
    never echoed. More than ``max_items`` subjects is refused."""
    from sqlalchemy import select  # the node's side only

    bounds = [(Decimal(p["lower"]), Decimal(p["upper"])) for p in plan]
    index: dict[str, int] = {}
    rows_of: list[int] = []
    totals: list[list[int]] = [[] for _ in plan]
    unusable: set[str] = set()

    def usable(value: object) -> str | None:
        try:
            return normalize_id(value)
        except InvalidInputError:
            unusable.add(str(value))
            return None

    with engine.connect() as conn:
        cols = [relation.c[subject], *(relation.c[p["column"]] for p in plan)]
        if not plan:
            # cardinality and members need the distinct subjects only: let the engine dedupe
            query = select(cols[0]).distinct()
            result = conn.execution_options(yield_per=_READ_BATCH).execute(query)
            for part in result.partitions():
                for (value,) in part:
                    ident = usable(value)
                    if ident is None or ident in index:
                        continue
                    if len(index) >= max_items:
                        raise InvalidInputError(
                            "the dataset has too many subjects for a private join"
                        )
                    index[ident] = len(index)
            return list(index), totals, len(unusable)
        result = conn.execution_options(yield_per=_READ_BATCH).execute(select(*cols))
        for part in result.partitions():
            for record in part:
                ident = usable(record[0])
                if ident is None:
                    continue
                i = index.get(ident)
                if i is None:
                    if len(index) >= max_items:
                        raise InvalidInputError(
                            "the dataset has too many subjects for a private join"
                        )
                    i = index[ident] = len(index)
                    rows_of.append(0)
                    for t in totals:
                        t.append(0)
                if rows_of[i] >= limit:
                    continue
                rows_of[i] += 1
                for j, (lo, hi) in enumerate(bounds):
                    totals[j][i] += clip(record[1 + j], lo, hi)
    return list(index), totals, len(unusable)


def encrypt_columns(
    ctx: Any,
    plan: Sequence[dict[str, str]],
    totals: Sequence[Sequence[int]],
    order: Sequence[int],
    limit: int,
) -> list[list[bytes]]:
    """Per sum column, its per-subject totals in B's ``order`` encrypted under the consumer's
    public context ``ctx``, one value per slot (:func:`crypto.he.encrypt_column_chunks`)."""
    out: list[list[bytes]] = []
    for j, p in enumerate(plan):
        values = [totals[j][i] for i in order]
        bounds = subject_bounds(p["lower"], p["upper"], limit)
        try:
            out.append(he.encrypt_column_chunks(ctx, values, bounds=bounds))
        except CryptoError as exc:
            raise InvalidInputError(
                f"cannot encrypt column {p['column']!r}: {exc}", fatal=True
            ) from exc
    return out
