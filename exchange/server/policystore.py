"""Policy rows in the control-plane database, a Casbin adapter over them, and a per-process cache.

Three tables:

- ``policy_rules``: one row per Casbin policy line, ``ptype`` and ``v0``..``v9``. Every value is
  kept (the stock Casbin SQLAlchemy adapter has six value columns and silently drops the rest; a
  zonex ``p`` row has eight). ``rule`` repeats the row's rule id so a revocation is one indexed
  delete.
- ``policy_state``: a single row whose ``version`` is bumped in the same transaction as every
  change, so a decision can name the exact policy it was made under.
- ``policy_changes``: which rule ids each version touched, so another process catches up by
  reloading those rules only, not the whole policy.

The functions take a :class:`~sqlalchemy.orm.Session` and never commit: the caller's
transaction (typically the ledger batch that records the change) owns the commit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from casbin.persist import Adapter
from sqlalchemy import (
    CheckConstraint,
    Engine,
    Integer,
    String,
    and_,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from exchange.server.db import Base
from exchange.server.storage import WRITE
from policy import Decision, DecisionPoint, DecisionRequest, PolicyRow, PurposeVocabulary, Reason
from policy.errors import InvalidRuleError, UnknownRuleError
from policy.rows import validate_row

__all__ = [
    "PolicyAdapter",
    "PolicyCache",
    "PolicyChangeRow",
    "PolicyRuleRow",
    "PolicyStateRow",
    "add_rules",
    "current_version",
    "load_rules",
    "remove_rules",
]

log = logging.getLogger("zonex.policy")

#: value columns per row; the model needs 8 (p) and 4 (g)
MAX_VALUES = 10
_CHUNK = 500


class PolicyRuleRow(Base):
    __tablename__ = "policy_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ptype: Mapped[str] = mapped_column(String(8))
    rule: Mapped[str] = mapped_column(String(200), index=True)
    #: the policy version that added the row
    added_in: Mapped[int] = mapped_column(Integer)
    v0: Mapped[str | None] = mapped_column(String(255), nullable=True)
    v1: Mapped[str | None] = mapped_column(String(255), nullable=True)
    v2: Mapped[str | None] = mapped_column(String(255), nullable=True)
    v3: Mapped[str | None] = mapped_column(String(255), nullable=True)
    v4: Mapped[str | None] = mapped_column(String(255), nullable=True)
    v5: Mapped[str | None] = mapped_column(String(255), nullable=True)
    v6: Mapped[str | None] = mapped_column(String(255), nullable=True)
    v7: Mapped[str | None] = mapped_column(String(255), nullable=True)
    v8: Mapped[str | None] = mapped_column(String(255), nullable=True)
    v9: Mapped[str | None] = mapped_column(String(255), nullable=True)

    def to_policy_row(self) -> PolicyRow:
        values: list[str] = []
        for i in range(MAX_VALUES):
            value = getattr(self, f"v{i}")
            if value is None:
                break
            values.append(value)
        return PolicyRow(self.ptype, tuple(values))


class PolicyStateRow(Base):
    __tablename__ = "policy_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(Integer, default=0)


class PolicyChangeRow(Base):
    __tablename__ = "policy_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[int] = mapped_column(Integer, index=True)
    action: Mapped[str] = mapped_column(String(8))  # "add" | "remove"
    rule: Mapped[str] = mapped_column(String(200))


# -- functions over a caller's session -------------------------------------------------------


def current_version(session: Session) -> int:
    """The policy version (0 before the first change)."""
    version = session.scalar(select(PolicyStateRow.version).where(PolicyStateRow.id == 1))
    return int(version or 0)


def _bump(session: Session) -> int:
    # the UPDATE takes the row lock: concurrent policy writers serialize and versions follow
    # commit order
    result = session.execute(
        update(PolicyStateRow)
        .where(PolicyStateRow.id == 1)
        .values(version=PolicyStateRow.version + 1)
        .returning(PolicyStateRow.version),
        execution_options={"synchronize_session": False},
    )
    version = result.scalar_one_or_none()
    if version is None:  # the migration seeds the row; tolerate a database without it
        session.add(PolicyStateRow(id=1, version=1))
        session.flush()
        return 1
    return int(version)


def _rows_of(session: Session, rules: Iterable[str]) -> list[PolicyRuleRow]:
    wanted = sorted(set(rules))
    out: list[PolicyRuleRow] = []
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i : i + _CHUNK]
        out.extend(
            session.scalars(
                select(PolicyRuleRow)
                .where(PolicyRuleRow.rule.in_(chunk))
                .order_by(PolicyRuleRow.id)
            )
        )
    out.sort(key=lambda r: r.id)
    return out


def add_rules(
    session: Session, rows: Iterable[PolicyRow], *, vocabulary: PurposeVocabulary | None = None
) -> int:
    """Store ``rows`` (validated, all or none) and return the new policy version.

    Rows already stored are skipped; if every row was already there, nothing changes and the
    current version is returned. Raises :class:`policy.errors.InvalidRuleError` for a malformed
    row, a wildcard in an allow row or an allow row without expiry.
    """
    vocab = vocabulary or PurposeVocabulary.load_default()
    new = list(dict.fromkeys(validate_row(PolicyRow(*r), vocab) for r in rows))
    existing = {r.to_policy_row() for r in _rows_of(session, {r.rule for r in new})}
    new = [r for r in new if r not in existing]
    if not new:
        return current_version(session)
    version = _bump(session)
    # executemany: one statement for the batch, not one ORM object per row
    session.execute(insert(PolicyRuleRow), [_columns(r, version) for r in new])
    session.execute(
        insert(PolicyChangeRow),
        [
            {"version": version, "action": "add", "rule": rule}
            for rule in sorted({r.rule for r in new})
        ],
    )
    return version


def _columns(row: PolicyRow, version: int) -> dict[str, Any]:
    if len(row.values) > MAX_VALUES:
        raise InvalidRuleError(f"a stored row holds at most {MAX_VALUES} values")
    out: dict[str, Any] = {"ptype": row.ptype, "rule": row.rule, "added_in": version}
    out.update({f"v{i}": value for i, value in enumerate(row.values)})
    return out


def _delete(session: Session, stored: Sequence[PolicyRuleRow]) -> int:
    version = _bump(session)
    ids = [r.id for r in stored]
    for i in range(0, len(ids), _CHUNK):
        session.execute(
            delete(PolicyRuleRow).where(PolicyRuleRow.id.in_(ids[i : i + _CHUNK])),
            execution_options={"synchronize_session": False},
        )
    for row in stored:  # deleted behind the ORM's back: forget them so ids can be reused
        if row in session:
            session.expunge(row)
    session.add_all(
        PolicyChangeRow(version=version, action="remove", rule=rule)
        for rule in sorted({r.rule for r in stored})
    )
    session.flush()
    return version


def remove_rules(session: Session, rule_id: str) -> int:
    """Delete every row of ``rule_id`` (revoke a grant, lift a suspension) and return the new
    version. Raises :class:`policy.errors.UnknownRuleError` if no row carries it."""
    stored = _rows_of(session, [rule_id])
    if not stored:
        raise UnknownRuleError(f"no policy rule {rule_id!r}")
    return _delete(session, stored)


def load_rules(session: Session) -> tuple[list[PolicyRow], int]:
    """Every stored row (in insertion order) and the version.

    The version is read first: the rows are at least that new, so a cache that records this
    version and later applies the changes after it converges on the database.
    """
    version = current_version(session)
    rows = [
        r.to_policy_row() for r in session.scalars(select(PolicyRuleRow).order_by(PolicyRuleRow.id))
    ]
    return rows, version


def _changed_rules(session: Session, after: int, upto: int) -> set[str] | None:
    """Rule ids touched by versions ``after+1``..``upto``; ``None`` if that history is missing."""
    found = session.execute(
        select(PolicyChangeRow.version, PolicyChangeRow.rule).where(
            and_(PolicyChangeRow.version > after, PolicyChangeRow.version <= upto)
        )
    ).all()
    versions = {v for v, _ in found}
    if versions != set(range(after + 1, upto + 1)):
        return None
    return {rule for _, rule in found}


# -- Casbin adapter ---------------------------------------------------------------------------


class PolicyAdapter(Adapter):  # type: ignore[misc]
    """A Casbin adapter over ``policy_rules``, so a plain ``casbin.Enforcer`` can load and edit
    the same policy (``policy.create_enforcer(adapter=PolicyAdapter(engine))``).

    Each write runs in its own transaction, validates its rows (a wildcard allow row is refused
    with :class:`policy.errors.InvalidRuleError`) and bumps the version like the functions above.
    """

    def __init__(self, engine: Engine, *, vocabulary: PurposeVocabulary | None = None) -> None:
        self._engine = engine
        self._vocabulary = vocabulary or PurposeVocabulary.load_default()

    def _write(self) -> Session:
        return Session(self._engine.execution_options(**WRITE))

    def load_policy(self, model: Any) -> None:
        with Session(self._engine) as session:
            rows, _ = load_rules(session)
        for ptype, values in rows:
            sec = model.model.get(ptype[0])
            if sec is not None and ptype in sec:
                sec[ptype].policy.append(list(values))

    def save_policy(self, model: Any) -> bool:
        rows: list[PolicyRow] = []
        for sec in ("p", "g"):
            for ptype, assertion in (model.model.get(sec) or {}).items():
                rows.extend(PolicyRow(ptype, tuple(v)) for v in assertion.policy)
        with self._write() as session, session.begin():
            stored = list(session.scalars(select(PolicyRuleRow)))
            if stored:
                _delete(session, stored)
            add_rules(session, rows, vocabulary=self._vocabulary)
        return True

    def add_policy(self, sec: str, ptype: str, rule: Sequence[str]) -> bool:
        return self.add_policies(sec, ptype, [rule])

    def add_policies(self, sec: str, ptype: str, rules: Iterable[Sequence[str]]) -> bool:
        with self._write() as session, session.begin():
            add_rules(
                session, [PolicyRow(ptype, tuple(r)) for r in rules], vocabulary=self._vocabulary
            )
        return True

    def _matching(
        self, session: Session, ptype: str, field_index: int, values: Sequence[str], exact: bool
    ) -> list[PolicyRuleRow]:
        conditions = [PolicyRuleRow.ptype == ptype]
        for i, value in enumerate(values):
            if value != "" or exact:
                conditions.append(getattr(PolicyRuleRow, f"v{field_index + i}") == value)
        if exact:
            for i in range(field_index + len(values), MAX_VALUES):
                conditions.append(getattr(PolicyRuleRow, f"v{i}").is_(None))
        return list(session.scalars(select(PolicyRuleRow).where(and_(*conditions))))

    def remove_policy(self, sec: str, ptype: str, rule: Sequence[str]) -> bool:
        return self.remove_policies(sec, ptype, [rule])

    def remove_policies(self, sec: str, ptype: str, rules: Iterable[Sequence[str]]) -> bool:
        with self._write() as session, session.begin():
            stored: list[PolicyRuleRow] = []
            for rule in rules:
                if len(rule) > MAX_VALUES:
                    continue
                stored.extend(self._matching(session, ptype, 0, rule, exact=True))
            if not stored:
                return False
            _delete(session, stored)
        return True

    def remove_filtered_policy(
        self, sec: str, ptype: str, field_index: int, *field_values: str
    ) -> bool:
        if field_index < 0 or field_index + len(field_values) > MAX_VALUES:
            return False
        with self._write() as session, session.begin():
            stored = self._matching(session, ptype, field_index, field_values, exact=False)
            if not stored:
                return False
            _delete(session, stored)
        return True


# -- per-process cache ------------------------------------------------------------------------


class PolicyCache:
    """A :class:`policy.DecisionPoint` kept in step with the database.

    Before deciding, it checks the database's policy version if ``refresh_interval`` seconds have
    passed since the last check, and on a change reloads only the rules that changed. A
    revocation or suspension committed by any process is therefore enforced here within
    ``refresh_interval`` plus one query. If the database cannot be read for longer than
    ``max_staleness`` seconds, decisions fail closed (``reason="error"``): a revocation that
    cannot be seen must not be ignored.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        refresh_interval: float = 0.25,
        max_staleness: float = 1.0,
        vocabulary: PurposeVocabulary | None = None,
    ) -> None:
        self._engine = engine
        self.refresh_interval = refresh_interval
        self.max_staleness = max_staleness
        self.point = DecisionPoint(vocabulary=vocabulary)
        self._loaded = False
        self._checked_at = float("-inf")  # monotonic time of the last successful check
        self._refresh_lock = threading.Lock()

    @property
    def version(self) -> int:
        return self.point.version

    def decide(self, request: DecisionRequest) -> Decision:
        """Refresh if due, then decide. Never raises."""
        try:
            self.refresh(force=False)
        except Exception:
            log.exception("policy refresh failed")
        if time.monotonic() - self._checked_at > self.max_staleness:
            return Decision(False, None, Reason.ERROR, self.point.version)
        return self.point.decide(request)

    def refresh(self, force: bool = True) -> int:
        """Catch up with the database now (``force``) or only if the interval has passed.
        Returns the version the decision point is at."""
        if not force and time.monotonic() - self._checked_at < self.refresh_interval:
            return self.point.version
        # the first load must finish before anyone decides; later, one refresher is enough,
        # unless the view is too stale to decide on: then wait for the refresh in flight (slow
        # under load is not a reason to deny) and check again if it did not catch up
        stale = time.monotonic() - self._checked_at > self.max_staleness
        if not self._refresh_lock.acquire(blocking=not self._loaded or force or stale):
            return self.point.version
        try:
            if stale and not force and time.monotonic() - self._checked_at <= self.max_staleness:
                return self.point.version  # the refresh we waited for caught up
            started = time.monotonic()
            with Session(self._engine) as session, session.begin():
                self._sync(session)
            self._checked_at = started
            return self.point.version
        finally:
            self._refresh_lock.release()

    def _sync(self, session: Session) -> None:
        version = current_version(session)
        if self._loaded and version == self.point.version:
            return
        rules = (
            _changed_rules(session, self.point.version, version)
            if self._loaded and version > self.point.version
            else None
        )
        if rules is None:
            rows, version = load_rules(session)
            self.point.replace_all(rows, version)
            self._loaded = True
            log.info("policy loaded: %d rows at version %d", len(rows), version)
            return
        stored = [r.to_policy_row() for r in _rows_of(session, rules)]
        self.point.replace_rules(rules, stored, version)


def count_rules(session: Session) -> int:
    """How many rows are stored (for status pages)."""
    return int(session.scalar(select(func.count()).select_from(PolicyRuleRow)) or 0)
