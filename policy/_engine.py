"""The Casbin side: the model, the functions it calls, and enforcers built from them.

Everything that touches ``casbin`` lives here, so the decision point and the tests share one
definition of the model and its functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from functools import cache, lru_cache
from importlib import resources
from typing import Any

import casbin
from casbin.model import Model
from casbin.persist import Adapter
from casbin.util import SimpleEval

from policy.levels import DEFAULT_CEILINGS, Level
from policy.purposes import PurposeVocabulary
from policy.rows import DENY, WILDCARD, PolicyRow, validate_row

# Casbin's default role manager follows at most 10 levels: the subject itself and 9 hops.
MAX_ROLE_HOPS = 9


@cache
def model_text() -> str:
    """The text of ``model.conf`` (package data)."""
    return resources.files("policy").joinpath("model.conf").read_text("utf-8")


def new_model() -> Any:
    """A fresh Casbin model parsed from ``model.conf``."""
    m = Model()
    m.load_model_from_text(model_text())
    return m


@lru_cache(maxsize=8192)
def _parse_expiry(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"policy time without a timezone: {text!r}")
    return moment


def matcher_functions(vocabulary: PurposeVocabulary) -> dict[str, Callable[..., bool]]:
    """The functions ``model.conf`` calls, bound to ``vocabulary``.

    They are total on well-formed input and raise on malformed input; an enforcement error is a
    deny. A wildcard only ever matches for a deny row.
    """

    def within_ceiling(level: str, operation: str, ceiling: str) -> bool:
        # the defaults are checked again: a request carrying a loosened ceiling gains nothing
        return operation in DEFAULT_CEILINGS[Level(level)] and operation in ceiling.split(" ")

    def purpose_within(requested: str, granted: str, effect: str) -> bool:
        if granted == WILDCARD:
            return effect == DENY
        if requested not in vocabulary:
            vocabulary.check(granted)  # a row with an unknown purpose is an error, not a miss
            return False
        return vocabulary.is_within(requested, granted)

    def before_expiry(now: str, expires: str, effect: str) -> bool:
        if expires == WILDCARD:
            return effect == DENY
        moment = datetime.fromisoformat(now)
        if moment.tzinfo is None:
            raise ValueError(f"request time without a timezone: {now!r}")
        # exclusive: at the expiry instant the row is no longer live
        return moment < _parse_expiry(expires)

    return {
        "withinCeiling": within_ceiling,
        "purposeWithin": purpose_within,
        "beforeExpiry": before_expiry,
    }


class MemoryAdapter(Adapter):  # type: ignore[misc]
    """A Casbin adapter over an in-memory list of rows, validating every row it is given.

    ``load_policy`` fills a model the way Casbin's file adapter does; the write methods accept a
    row only if it is valid, so a wildcard allow row is refused even through a plain enforcer.
    """

    def __init__(self, rows: Iterable[PolicyRow], vocabulary: PurposeVocabulary) -> None:
        self._vocabulary = vocabulary
        self.rows = [validate_row(r, vocabulary) for r in rows]

    def load_policy(self, model: Any) -> None:
        for ptype, values in self.rows:
            model.model[ptype[0]][ptype].policy.append(list(values))

    def save_policy(self, model: Any) -> bool:
        rows: list[PolicyRow] = []
        for sec in ("p", "g"):
            for ptype, assertion in (model.model.get(sec) or {}).items():
                rows.extend(PolicyRow(ptype, tuple(v)) for v in assertion.policy)
        self.rows = [validate_row(r, self._vocabulary) for r in rows]
        return True

    def add_policy(self, sec: str, ptype: str, rule: list[str]) -> bool:
        self.rows.append(validate_row(PolicyRow(ptype, tuple(rule)), self._vocabulary))
        return True

    def add_policies(self, sec: str, ptype: str, rules: Iterable[list[str]]) -> bool:
        new = [validate_row(PolicyRow(ptype, tuple(r)), self._vocabulary) for r in rules]
        self.rows.extend(new)
        return True

    def remove_policy(self, sec: str, ptype: str, rule: list[str]) -> bool:
        row = PolicyRow(ptype, tuple(rule))
        if row not in self.rows:
            return False
        self.rows.remove(row)
        return True

    def remove_policies(self, sec: str, ptype: str, rules: Iterable[list[str]]) -> bool:
        for rule in rules:
            self.remove_policy(sec, ptype, rule)
        return True

    def remove_filtered_policy(
        self, sec: str, ptype: str, field_index: int, *field_values: str
    ) -> bool:
        def hit(row: PolicyRow) -> bool:
            return row.ptype == ptype and all(
                v == "" or (field_index + i < len(row.values) and row.values[field_index + i] == v)
                for i, v in enumerate(field_values)
            )

        before = len(self.rows)
        self.rows = [r for r in self.rows if not hit(r)]
        return len(self.rows) != before


def register_functions(enforcer: Any, vocabulary: PurposeVocabulary) -> Any:
    for name, fn in matcher_functions(vocabulary).items():
        enforcer.add_function(name, fn)
    return enforcer


def create_enforcer(
    rows: Iterable[PolicyRow] = (),
    *,
    adapter: Any = None,
    vocabulary: PurposeVocabulary | None = None,
) -> Any:
    """A plain ``casbin.Enforcer`` on zonex's model with its functions registered.

    It is loaded from ``adapter`` if given (for example the exchange's database adapter), else
    from ``rows``. It scans every row on every call: use :class:`policy.DecisionPoint` to decide;
    this one is the reference the decision point is tested against.
    """
    vocab = vocabulary or PurposeVocabulary.load_default()
    source = adapter if adapter is not None else MemoryAdapter(rows, vocab)
    return register_functions(casbin.Enforcer(new_model(), source), vocab)


class Evaluator(casbin.Enforcer):  # type: ignore[misc]
    """The enforcer the decision point evaluates candidate rows with.

    Decides as ``casbin.Enforcer`` does, with two costs removed: the matcher is parsed once
    instead of on every call (parsing is over half the cost of a decision on a few rows), and the
    role manager has no equality matching function (see ``__init__``). Not thread-safe: the
    decision point calls it under its lock.
    """

    def __init__(self, vocabulary: PurposeVocabulary) -> None:
        super().__init__(new_model())
        register_functions(self, vocabulary)
        self._expressions: dict[str, Any] = {}
        # The default domain manager installs an equality "matching function", which makes every
        # first lookup of a name scan all names known in the zone. Equality matching matches
        # nothing that plain lookup does not, so dropping it changes no decision.
        self.get_role_manager().matching_func = None

    def _get_expression(self, expr: str, functions: Any = None) -> Any:
        cached = self._expressions.get(expr)
        if cached is not None and cached.functions is functions:
            return cached
        evaluator = super()._get_expression(expr, functions)
        if not isinstance(evaluator, SimpleEval):
            return evaluator
        self._expressions[expr] = evaluator
        return evaluator

    def evaluate(self, candidates: list[tuple[str, ...]], request: tuple[str, ...]) -> Any:
        """``enforce_ex`` over ``candidates`` only: (allowed, the row Casbin explains it with)."""
        self.model["p"]["p"].policy = candidates
        try:
            return self.enforce_ex(*request)
        finally:
            self.model["p"]["p"].policy = []

    def set_roles(self, rows: Iterable[tuple[str, ...]]) -> None:
        """Replace every role membership and rebuild the links (as a fresh load would)."""
        self.model["g"]["g"].policy = [list(r) for r in rows]
        self.build_role_links()
