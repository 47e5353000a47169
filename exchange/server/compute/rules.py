"""Analysis rules in the control plane: the version in force for a dataset, and setting a new one.

The rules themselves (what each column may disclose, k, DP, budgets) and their checks live in
:mod:`exchange.node.analysis`. A dataset without stored rules gets :func:`default_rules` derived
from its column levels (reported as version 0, never stored). Setting rules is the zone provider's
act: checked against the classification (:func:`check_rules`), stored as the next version and
ledgered (``analysis.rules_set``, with the digest of the rules' canonical JSON) in one
transaction. The catalog shows whether a dataset's rules opt out of DP by default
(``exact_release``: "exact: differencing possible"), so a new version also moves the registry
version in that transaction: every process's cached catalog is reloaded before it is shown
again.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from crypto.canonical import canonicalize
from exchange.domain import Principal
from exchange.errors import ForbiddenError, InvalidInputError
from exchange.node.analysis import AnalysisRules, check_rules, default_rules
from exchange.server import access, services
from exchange.server.ledger import EntryDraft
from exchange.server.models import AnalysisRulesRow, DatasetRow, RegistryStateRow
from exchange.server.runtime import Exchange

__all__ = ["current_rules", "get_rules", "set_rules"]


def current_rules(session: Session, row: DatasetRow) -> tuple[AnalysisRules, int]:
    """The rules in force for ``row`` and their stored version: the highest stored version, or
    the defaults derived from the column levels with version 0 (never stored)."""
    stored = session.execute(
        select(AnalysisRulesRow)
        .where(AnalysisRulesRow.zone == row.zone, AnalysisRulesRow.dataset == row.name)
        .order_by(AnalysisRulesRow.version.desc())
        .limit(1)
    ).scalar_one_or_none()
    if stored is not None:
        return AnalysisRules.from_json(stored.rules), stored.version
    dataset = services.to_dataset(row)
    return default_rules(dataset.columns, dataset.subject_column), 0


def get_rules(ex: Exchange, actor: Principal, zone: str, dataset: str) -> dict[str, Any]:
    """The rules in force, for anyone who may see the catalog entry (rules are not secret: a
    consumer needs them to write queries that pass)."""
    services.get_dataset(ex, actor, zone, dataset)
    with Session(ex.engine) as session:
        row = access._dataset(session, zone, dataset)
        rules, version = current_rules(session, row)
    return {
        "zone": zone,
        "dataset": dataset,
        "version": version,
        "default": version == 0,
        "rules": rules.to_json(),
    }


def set_rules(
    ex: Exchange, actor: Principal, zone: str, dataset: str, document: Any
) -> dict[str, Any]:
    """Store ``document`` as the dataset's next rules version (zone provider only)."""
    if not isinstance(document, dict):
        raise InvalidInputError("analysis rules must be an object")
    with Session(ex.engine) as session:
        z = access._zone(session, zone)
        if z.owner != actor.key_id:
            raise ForbiddenError("only the zone's provider sets analysis rules")
        if z.status != "active":
            raise ForbiddenError("the zone is suspended")
        row = access._dataset(session, zone, dataset)
        ds = services.to_dataset(row)
    proposed = AnalysisRules.from_json({**document, "version": 1})
    check_rules(proposed, ds)

    def apply(session: Session, draft: EntryDraft) -> AnalysisRules:
        latest = session.execute(
            select(func.max(AnalysisRulesRow.version)).where(
                AnalysisRulesRow.zone == zone, AnalysisRulesRow.dataset == dataset
            )
        ).scalar_one()
        version = (latest or 0) + 1
        rules = AnalysisRules.from_json({**proposed.to_json(), "version": version})
        body = rules.to_json()
        session.add(
            AnalysisRulesRow(
                zone=zone, dataset=dataset, version=version, rules=body, set_by=actor.key_id
            )
        )
        draft.attrs["version"] = version
        draft.attrs["exact_release"] = "true" if rules.exact_release else "false"
        # what an auditor checks the privacy-budget charges against (docs/wire-formats-ledger.md)
        draft.attrs["epsilon_budget"] = format(rules.epsilon_budget.normalize(), "f")
        draft.attrs["refresh_seconds"] = rules.refresh_seconds
        draft.digests["rules"] = hashlib.sha256(canonicalize(body)).hexdigest()
        # the catalog shows exact_release: the same statement the registry triggers run
        session.execute(
            update(RegistryStateRow)
            .where(RegistryStateRow.id == 1)
            .values(version=RegistryStateRow.version + 1)
        )
        session.flush()
        return rules

    draft = EntryDraft(
        kind="analysis.rules_set",
        actor=actor.key_id,
        refs={"zone": zone, "dataset": dataset},
        attrs={},
        digests={},
    )
    rules: AnalysisRules = ex.ledger.append(draft, apply).value
    return {
        "zone": zone,
        "dataset": dataset,
        "version": rules.version,
        "default": False,
        "rules": rules.to_json(),
    }
