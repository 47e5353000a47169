"""Privacy budgets: ε spent per consumer, dataset and refresh window, charged exactly.

A window is ``[k·refresh, (k+1)·refresh)`` seconds since the Unix epoch; a new window starts
with nothing spent. :func:`charge` runs inside the ledger batch that records the release (the
batch holds the ledger-head lock, so charges from every process and thread serialize) and
refuses with :class:`BudgetExhaustedError` if the charge would overspend: the release and its
charge commit together or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Row, insert, select, update
from sqlalchemy.orm import Session

from exchange.errors import BudgetExhaustedError
from exchange.server.models import BudgetRow

__all__ = ["BudgetState", "charge", "charge_attrs", "remaining", "window_start"]


@dataclass(frozen=True)
class BudgetState:
    zone: str
    dataset: str
    budget: Decimal
    spent: Decimal
    window_start: datetime
    window_end: datetime
    #: δ spent in the window by gates over groups found in the data
    delta_spent: Decimal = Decimal(0)

    @property
    def remaining(self) -> Decimal:
        return max(Decimal(0), self.budget - self.spent)


def charge_attrs(state: BudgetState) -> dict[str, str | int]:
    """Ledger attrs of a charge, for the computation entry that made it: the window's ε spent
    after the charge (``spent.<zone>/<dataset>``) and the window's start
    (``window.<zone>/<dataset>``, RFC 3339 UTC), so an auditor can check every window's total
    against the releases and the budget offline (``docs/wire-formats-ledger.md``)."""
    key = f"{state.zone}/{state.dataset}"
    spent = format(state.spent.normalize(), "f")
    start = state.window_start.astimezone(UTC)
    return {
        f"spent.{key}": "0" if spent in ("-0", "0") else spent,
        f"window.{key}": start.strftime("%Y-%m-%dT%H:%M:%S.") + f"{start.microsecond // 1000:03d}Z",
    }


def window_start(now: datetime, refresh_seconds: int) -> int:
    ts = int(now.timestamp())
    return ts - ts % max(1, refresh_seconds)


#: one window's row: (id, spent, δ spent), read as plain columns (no ORM object to keep fresh)
_WINDOW = select(BudgetRow.id, BudgetRow.spent, BudgetRow.delta_spent)


def _row(
    session: Session, consumer: str, zone: str, dataset: str, start: int
) -> Row[int, str, str] | None:
    return session.execute(
        _WINDOW.where(
            BudgetRow.consumer == consumer,
            BudgetRow.zone == zone,
            BudgetRow.dataset == dataset,
            BudgetRow.window_start == start,
        )
    ).first()


def remaining(
    session: Session,
    consumer: str,
    zone: str,
    dataset: str,
    budget: Decimal,
    refresh_seconds: int,
    now: datetime | None = None,
) -> BudgetState:
    moment = now or datetime.now(UTC)
    start = window_start(moment, refresh_seconds)
    row = _row(session, consumer, zone, dataset, start)
    spent = Decimal(row.spent) if row is not None else Decimal(0)
    return BudgetState(
        zone,
        dataset,
        budget,
        spent,
        datetime.fromtimestamp(start, UTC),
        datetime.fromtimestamp(start + refresh_seconds, UTC),
        Decimal(row.delta_spent) if row is not None else Decimal(0),
    )


def charge(
    session: Session,
    consumer: str,
    zone: str,
    dataset: str,
    epsilon: Decimal,
    budget: Decimal,
    refresh_seconds: int,
    now: datetime | None = None,
    *,
    delta: Decimal = Decimal(0),
) -> BudgetState:
    """Add ``epsilon`` (and ``delta``) to this window's spend, or raise if ε would exceed
    ``budget``. δ is accounted, not capped here: every release spends at least the ε floor, so
    a window holds at most ``budget / floor`` releases and δ at most that many times the
    rules' per-release δ (``docs/privacy.md``)."""
    if epsilon < 0 or delta < 0:
        raise ValueError("a charge is never negative")
    moment = now or datetime.now(UTC)
    start = window_start(moment, refresh_seconds)
    row = _row(session, consumer, zone, dataset, start)
    spent = Decimal(row.spent) if row is not None else Decimal(0)
    if spent + epsilon > budget:
        raise BudgetExhaustedError(
            f"privacy budget for {zone}/{dataset} exhausted: {spent} of {budget} spent, "
            f"{epsilon} asked; it refreshes at "
            f"{datetime.fromtimestamp(start + refresh_seconds, UTC).isoformat()}",
            remaining=str(max(Decimal(0), budget - spent)),
        )
    delta_spent = (Decimal(row.delta_spent) if row is not None else Decimal(0)) + delta
    # plain statements in the caller's transaction (the ledger batch's): no unit of work to flush
    if row is None:
        session.execute(
            insert(BudgetRow).values(
                consumer=consumer,
                zone=zone,
                dataset=dataset,
                window_start=start,
                spent=str(epsilon),
                delta_spent=str(delta),
            )
        )
    else:
        session.execute(
            update(BudgetRow)
            .where(BudgetRow.id == row.id)
            .values(spent=str(spent + epsilon), delta_spent=str(delta_spent))
        )
    return BudgetState(
        zone,
        dataset,
        budget,
        spent + epsilon,
        datetime.fromtimestamp(start, UTC),
        datetime.fromtimestamp(start + refresh_seconds, UTC),
        delta_spent,
    )
