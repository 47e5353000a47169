"""``aggregate``: clean-room SQL over a zone's datasets, released under the analysis rules.

The path of one query (:func:`run_aggregate`):

1. :func:`prepare` builds the checker's view of every dataset in the zone (columns, levels,
   subject column, the analysis rules in force), checks and rewrites the consumer's SQL
   (:func:`exchange.node.sqlcheck.check_query`), then authorizes each dataset the query reads
   (``aggregate`` by default; other computations that reuse the pipeline pass their own
   operation). Nothing is read before every dataset is allowed. The view is registry state
   (zones, datasets and analysis rules all move the registry version): it is read once per
   registry version and zone into the process's registry cache
   (:class:`exchange.server.registry.RegistryCache`) and served from there to every request
   authenticated at that version or before, so a release at an unchanged version reads nothing
   of the registry.
2. With differential privacy (the default at L3 and above unless every dataset read opted out
   with ``exact_release``; always at L4 and above or where the rules require it; on request with
   ``epsilon``), the remaining budget of every dataset is checked *before* the query runs, so an
   exhausted consumer costs the zone no work.
3. :func:`execute` runs the rewritten statement (bound parameters, quoted identifiers, never
   the consumer's text) on the zone's engine through SQLAlchemy.
4. :func:`exchange.node.sqlcheck.postprocess` gates the groups on k (on a noisy count under DP) and
   adds OpenDP noise.
5. :func:`exchange.server.receipts.record_computation` ledgers the computation and, in the same
   transaction, charges ε (and the gate's δ) to every dataset's budget; only then is the result
   returned. The charge does not depend on the data: a release whose groups all stayed shut is
   charged like any other. A charge that would overspend aborts the transaction: nothing is
   released and nothing is spent.

Every ε enters through :func:`exchange.node.dp.parse_epsilon`, at least
``settings.min_release_epsilon``.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from crypto.canonical import canonicalize
from exchange.domain import Principal
from exchange.errors import BudgetExhaustedError, InvalidInputError
from exchange.node.analysis import AnalysisRules
from exchange.node.dp import parse_epsilon
from exchange.node.engine import release_aggregate, table_stats
from exchange.node.sqlcheck import (
    CheckedQuery,
    TableRules,
    TableStats,
    check_query,
)
from exchange.server import access, budget, dispatch
from exchange.server.access import Authorization
from exchange.server.compute.rules import current_rules
from exchange.server.compute.source import open_source
from exchange.server.dispatch import NodeResult
from exchange.server.models import DatasetRow, ZoneRow
from exchange.server.querydiff import record_query
from exchange.server.receipts import record_computation
from exchange.server.registry import registry_version as read_registry_version
from exchange.server.runtime import Exchange
from exchange.server.services import to_dataset
from policy import Operation

__all__ = [
    "DEFAULT_QUERY_EPSILON",
    "Prepared",
    "budget_status",
    "default_epsilon",
    "execute",
    "prepare",
    "release_epsilon",
    "run_aggregate",
]

#: ε charged by a differentially private query that does not name its own
DEFAULT_QUERY_EPSILON = Decimal("0.1")

#: SQLAlchemy backend name -> sqlglot dialect
_DIALECTS = {"duckdb": "duckdb", "postgresql": "postgres", "sqlite": "sqlite", "mysql": "mysql"}


@dataclass(frozen=True)
class Prepared:
    """A checked, authorized query, ready to run."""

    zone: str
    checked: CheckedQuery
    #: dataset name -> its row (as read when the query was prepared)
    rows: dict[str, DatasetRow]
    #: dataset name -> the allowed decision
    auths: dict[str, Authorization]
    #: dataset name -> (rules in force, stored version; 0 = defaults)
    rules: dict[str, tuple[AnalysisRules, int]]
    purpose: str
    #: whether the zone had an active node at the registry version the query was prepared at
    #: (activating a node changes the registry, so a cached ``False`` is never stale)
    node_hosted: bool = False

    @property
    def datasets(self) -> tuple[str, ...]:
        return self.checked.datasets


def release_epsilon(ex: Exchange, value: object) -> Decimal | None:
    """The ε a caller asks one release to spend (:func:`exchange.node.dp.parse_epsilon`, at least
    the exchange's ``min_release_epsilon``); None if absent."""
    if value is None:
        return None
    return parse_epsilon(value, floor=ex.settings.min_release_epsilon)


def default_epsilon(ex: Exchange) -> Decimal:
    """The ε of a differentially private release that names none: never below the floor."""
    return max(DEFAULT_QUERY_EPSILON, ex.settings.min_release_epsilon)


def _dialect(row: DatasetRow) -> str:
    if row.source in ("import", "node"):
        return "duckdb"  # a node checks the query again for its own engine
    assert row.attach_url is not None
    backend = make_url(row.attach_url).get_backend_name()
    dialect = _DIALECTS.get(backend)
    if dialect is None:
        raise InvalidInputError(f"aggregates are not supported on {backend} tables")
    return dialect


def _store_key(row: DatasetRow) -> tuple[str, str]:
    """Datasets with the same key live in one database and can be joined in one statement."""
    if row.source in ("import", "node"):
        return (row.source, row.zone)
    return ("attach", row.attach_url or "")


_stats_cache: dict[tuple[str, str, str], TableStats] = {}
_stats_lock = threading.Lock()


def _decimal(value: object) -> Decimal | None:
    if value is None:
        return None
    return value if isinstance(value, Decimal) else Decimal(str(value))


def snapshot_stats(ex: Exchange, row: DatasetRow) -> TableStats | None:
    """Subject uniqueness and numeric ranges of an imported dataset's snapshot, computed once
    per snapshot digest (imported datasets never change; a new snapshot is a new digest).
    Attached tables can change under the exchange, and a node's rows are not here: no
    statistics are assumed for them (the node computes its own)."""
    if row.source != "import":
        return None
    key = (row.zone, row.name, row.digest)
    with _stats_lock:
        cached = _stats_cache.get(key)
    if cached is not None:
        return cached
    with open_source(ex, row) as src:
        stats = table_stats(src.engine, src.relation, row.subject_column, row.columns)
    with _stats_lock:
        if len(_stats_cache) > 10_000:
            _stats_cache.clear()
        _stats_cache[key] = stats
    return stats


@dataclass(frozen=True)
class _ZoneView:
    """What :func:`prepare` reads of one zone's registry, as of one registry version: the zone,
    its active datasets' rows, the checker's view of each (:class:`TableRules`) and the rules in
    force. Shared by every request served from the cache: the rows are detached ORM objects,
    read and never written."""

    zone: ZoneRow
    tables: dict[str, TableRules]
    rows: dict[str, DatasetRow]
    rules: dict[str, tuple[AnalysisRules, int]]
    #: the datasets' part of the plan cache's key (:func:`_checked`), computed once
    plan_key: tuple[Any, ...]
    #: whether an active node hosts the zone (approving a node bumps the registry version)
    node_hosted: bool


#: the registry-cache snapshot of a zone's view is named this prefix and the zone's name
ZONE_VIEW_SNAPSHOT = "aggregate.zone:"


def _tables(ex: Exchange, session: Session, zone: str) -> _ZoneView:
    zone_row = access._zone(session, zone)
    rows = (
        session.execute(
            select(DatasetRow).where(DatasetRow.zone == zone, DatasetRow.status == "active")
        )
        .scalars()
        .all()
    )
    tables: dict[str, TableRules] = {}
    by_name: dict[str, DatasetRow] = {}
    rules: dict[str, tuple[AnalysisRules, int]] = {}
    for row in rows:
        ruleset, version = current_rules(session, row)
        relation, schema = None, None
        if row.source != "import" and row.attach_table:
            schema, _, relation = row.attach_table.rpartition(".")
            schema = schema or None
        tables[row.name] = TableRules.from_dataset(
            to_dataset(row),
            ruleset,
            relation=relation,
            relation_schema=schema,
            stats=snapshot_stats(ex, row),
        )
        by_name[row.name] = row
        rules[row.name] = (ruleset, version)
    hosted = dispatch.node_for_zone(session, zone) is not None
    return _ZoneView(zone_row, tables, by_name, rules, _plan_key(tables, by_name), hosted)


def _zone_view(ex: Exchange, zone: str, registry_version: int | None) -> _ZoneView:
    """The zone's view as of ``registry_version`` or later, from the registry cache.

    ``registry_version`` is the version the request was authenticated at (its nonce's batch
    read it: :class:`exchange.server.registry.NonceLog`); a caller without one (a bench, a
    library call) reads the current version first, so it sees every change committed before
    the call, as a direct read would."""
    if registry_version is None:
        with ex.engine.connect() as conn:
            registry_version = read_registry_version(conn)

    def load(conn: Connection, _version: int) -> _ZoneView:
        # in the snapshot's read transaction, after it read the version: the rows are at
        # least as new as the version the view is cached at
        with Session(bind=conn) as session:
            return _tables(ex, session, zone)

    view: _ZoneView = ex.registry.snapshot(ZONE_VIEW_SNAPSHOT + zone, registry_version, load)
    return view


#: checked queries by (query text, DP, the zone's datasets' snapshots and rules versions)
_plans: OrderedDict[tuple[Any, ...], CheckedQuery] = OrderedDict()
_plans_lock = threading.Lock()
PLAN_CACHE_SIZE = 512


def _plan_key(tables: dict[str, TableRules], rows: dict[str, DatasetRow]) -> tuple[Any, ...]:
    """What a check depends on of the zone's datasets (see :func:`_checked`)."""
    return tuple(
        sorted(
            (
                t.zone,
                name,
                t.columns,
                t.subject_column,
                canonicalize(t.rules.to_json()),
                t.relation,
                t.relation_schema,
                rows[name].digest,  # the statistics are a function of the snapshot
                rows[name].attach_url or "",
            )
            for name, t in tables.items()
        )
    )


def _checked(
    sql: str,
    tables: dict[str, TableRules],
    rows: dict[str, DatasetRow],
    with_dp: bool,
    named_groups: bool = False,
    plan_key: tuple[Any, ...] | None = None,
) -> CheckedQuery:
    """:func:`check_query` for the datasets' store, remembered per snapshot and rules version.

    A check depends only on the query text, the DP flag and what the checker is given for each
    dataset of the zone: its zone, columns and levels, subject column, rules, relation and
    snapshot (which fixes its statistics) and store. The key is exactly those
    (:func:`_plan_key`, or ``plan_key`` computed by it for these tables), so new rules, a new
    dataset, or the same file registered with other levels in another zone miss the cache. A
    refused query is not remembered (it raises every time)."""
    key = (
        sql,
        with_dp,
        named_groups,
        _plan_key(tables, rows) if plan_key is None else plan_key,
    )
    with _plans_lock:
        hit = _plans.get(key)
        if hit is not None:
            _plans.move_to_end(key)
            return hit
    checked = check_query(
        sql, tables, dialect_out="duckdb", with_dp=with_dp, named_groups=named_groups
    )
    used = [rows[name] for name in checked.datasets]
    if len({_store_key(r) for r in used}) > 1:
        raise InvalidInputError(
            "the query joins datasets kept in different databases; join datasets of one store",
            reason="cross_store_join",
        )
    dialect = _dialect(used[0])
    if dialect != "duckdb":
        checked = check_query(
            sql, tables, dialect_out=dialect, with_dp=with_dp, named_groups=named_groups
        )
    with _plans_lock:
        _plans[key] = checked
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return checked


def clear_plan_cache() -> None:
    with _plans_lock:
        _plans.clear()


def prepare(
    ex: Exchange,
    actor: Principal,
    zone: str,
    sql: str,
    purpose: str,
    *,
    operation: Operation = Operation.AGGREGATE,
    with_dp: bool = False,
    named_groups: bool = False,
    step: str | None = None,
    registry_version: int | None = None,
) -> Prepared:
    """Check ``sql`` against the zone's analysis rules, then authorize every dataset it reads.

    ``named_groups``: the caller releases only groups named in advance (a secure sum's cells),
    so a DP gate over them needs no δ (:func:`exchange.node.sqlcheck.check_query`).
    ``registry_version``: the version the request was authenticated at; the zone's datasets
    and rules are read as of it or later (:func:`_zone_view`).

    Raises :class:`exchange.node.sqlcheck.QueryRejected` (422, with a ``reason`` code) for a query
    the rules refuse and :class:`exchange.errors.DeniedError` for a dataset the policy refuses.
    """
    if not isinstance(sql, str):
        raise InvalidInputError("sql must be a string")
    view = _zone_view(ex, zone, registry_version)
    if not view.tables:
        raise InvalidInputError(f"zone {zone!r} has no active datasets")
    checked = _checked(sql, view.tables, view.rows, with_dp, named_groups, view.plan_key)
    auths = {
        name: access.authorize(
            ex, actor, zone, name, operation, purpose, step=step, rows=(view.zone, view.rows[name])
        )
        for name in checked.datasets
    }
    return Prepared(
        zone=zone,
        checked=checked,
        rows={name: view.rows[name] for name in checked.datasets},
        auths=auths,
        rules={name: view.rules[name] for name in checked.datasets},
        purpose=next(iter(auths.values())).request.purpose,
        node_hosted=view.node_hosted,
    )


def execute(ex: Exchange, prepared: Prepared) -> list[tuple[Any, ...]]:
    """Run the rewritten statement on the datasets' store; the raw rows (before suppression)."""
    row = prepared.rows[prepared.checked.datasets[0]]
    with open_source(ex, row) as src, src.engine.connect() as conn:
        result = conn.execute(text(prepared.checked.sql), dict(prepared.checked.params))
        return [tuple(r) for r in result]


def _budget_terms(prepared: Prepared) -> dict[str, tuple[Decimal, int]]:
    return {
        name: (ruleset.epsilon_budget, ruleset.refresh_seconds)
        for name, (ruleset, _) in prepared.rules.items()
    }


def _check_budget(ex: Exchange, consumer: str, prepared: Prepared, epsilon: Decimal) -> None:
    with Session(ex.engine) as session:
        for name, (total, refresh) in _budget_terms(prepared).items():
            state = budget.remaining(session, consumer, prepared.zone, name, total, refresh)
            start = int(state.window_start.timestamp())
            _spent(ex).put((consumer, prepared.zone, name, start), state.spent)
            if state.spent + epsilon > total:
                raise BudgetExhaustedError(
                    f"privacy budget for {prepared.zone}/{name} exhausted: {state.spent} of "
                    f"{total} spent, {epsilon} asked; it refreshes at "
                    f"{state.window_end.isoformat()}",
                    remaining=str(state.remaining),
                )


class _SpentCache:
    """What this process last saw spent of a consumer's budget window, from its own charges
    and reads (at most ``size`` windows, least recently used forgotten first)."""

    def __init__(self, size: int = 16_384) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._spent: OrderedDict[tuple[str, str, str, int], Decimal] = OrderedDict()

    def get(self, key: tuple[str, str, str, int]) -> Decimal | None:
        with self._lock:
            return self._spent.get(key)

    def put(self, key: tuple[str, str, str, int], spent: Decimal) -> None:
        with self._lock:
            if spent >= self._spent.get(key, spent):  # never back: charges only add
                self._spent[key] = spent
            self._spent.move_to_end(key)
            while len(self._spent) > self._size:
                self._spent.popitem(last=False)


_spent_caches: weakref.WeakKeyDictionary[Exchange, _SpentCache] = weakref.WeakKeyDictionary()
_spent_lock = threading.Lock()


def _spent(ex: Exchange) -> _SpentCache:
    """The exchange's cache (one per exchange: two data directories never share spends)."""
    with _spent_lock:
        found = _spent_caches.get(ex)
        if found is None:
            found = _spent_caches[ex] = _SpentCache()
        return found


def _spent_key(consumer: str, zone: str, dataset: str, refresh: int) -> tuple[str, str, str, int]:
    return consumer, zone, dataset, budget.window_start(datetime.now(UTC), refresh)


def _release_within_budget(
    ex: Exchange, actor: Principal, prepared: Prepared, charge: Decimal, delta: Decimal
) -> tuple[dict[str, Any], NodeResult | None]:
    """:func:`host_release`, refused first with :class:`BudgetExhaustedError` when ``charge``
    cannot fit the consumer's budget. The ledger transaction that records the release charges
    the budget and refuses an overdraft whatever this check saw (two requests, or two worker
    processes, can race); this check only spares the work of a release that cannot be
    charged. So it trusts what this process last saw spent in the window, which can only be
    less than the truth, and reads the database only when that would not leave room."""
    if charge:
        for name, (total, refresh) in _budget_terms(prepared).items():
            seen = _spent(ex).get(_spent_key(actor.key_id, prepared.zone, name, refresh))
            if seen is None or seen + charge > total:
                _check_budget(ex, actor.key_id, prepared, charge)
                break
    return host_release(ex, actor, prepared, charge, delta)


def host_release(
    ex: Exchange,
    actor: Principal,
    prepared: Prepared,
    epsilon: Decimal,
    delta: Decimal,
    *,
    named_groups: bool = False,
) -> tuple[dict[str, Any], NodeResult | None]:
    """Run a prepared query where the zone is hosted and release it
    (:func:`exchange.node.engine.release_aggregate`): in this process for a zone without a node,
    else as a task on the zone's node, which checks it again, draws the noise and signs.

    Returns the released body (``result``, ``k``, ``epsilon``, ``delta``, and ``suppressed``
    for exact releases) and the node's verified answer (None in-process).
    """
    checked = prepared.checked
    node = None
    if prepared.node_hosted:  # read afresh: the node's liveness is not registry state
        with Session(ex.engine) as session:
            node = dispatch.node_for_zone(session, prepared.zone)
    if node is None:
        row = prepared.rows[checked.datasets[0]]
        with open_source(ex, row) as src:
            return release_aggregate(checked, src.engine, epsilon if checked.dp else None), None
    fields = {
        "consumer": actor.key_id,
        "purpose": prepared.purpose,
        "datasets": {name: prepared.auths[name].digest for name in checked.datasets},
        "sql": checked.canonical,
        "dp": checked.dp,
        "epsilon": _plain(epsilon),
        "named_groups": named_groups,
        "rules": {name: ruleset.to_json() for name, (ruleset, _) in prepared.rules.items()},
    }
    answer = dispatch.dispatch(ex, node, "aggregate", fields)
    body = answer.payload
    want = {"epsilon": _plain(epsilon) if checked.dp else "0", "delta": _plain(delta)}
    got = {"epsilon": body.get("epsilon"), "delta": body.get("delta")}
    if got != want or not isinstance(body.get("result"), dict) or body.get("k", 0) < checked.k:
        raise dispatch.NodeRefusedError(
            "the zone's node released under other parameters than authorized; nothing was released",
            reason="node_mismatch",
        )
    return body, answer


def run_aggregate(
    ex: Exchange,
    actor: Principal,
    zone: str,
    sql: str,
    purpose: str,
    *,
    epsilon: object = None,
    registry_version: int | None = None,
) -> dict[str, Any]:
    """Check, authorize, run, release and receipt one aggregate query.

    ``epsilon`` (a decimal string) asks for differential privacy where the rules do not require
    it, or sets the ε of a query that must be private (default :data:`DEFAULT_QUERY_EPSILON`,
    never below ``settings.min_release_epsilon``). ``registry_version``: the version the
    request was authenticated at (:func:`prepare`).
    """
    eps = release_epsilon(ex, epsilon)
    prepared = prepare(
        ex,
        actor,
        zone,
        sql,
        purpose,
        with_dp=eps is not None,
        registry_version=registry_version,
    )
    checked = prepared.checked
    charge = Decimal(0)
    # the δ a gate over groups found in the data spends, whether any group opens or not
    delta = Decimal(0)
    if checked.dp:
        charge = eps if eps is not None else default_epsilon(ex)
        delta = checked.delta or Decimal(0)
    body, node_result = _release_within_budget(ex, actor, prepared, charge, delta)
    result = {"zone": zone, "sql": checked.canonical, **body["result"]}
    parameters = {
        "operation": "aggregate",
        "zone": zone,
        "sql": checked.canonical,
        "purpose": prepared.purpose,
        "epsilon": _plain(charge),
        "delta": _plain(delta),
    }
    terms = _budget_terms(prepared)
    charged: list[tuple[str, budget.BudgetState]] = []

    def apply(session: Session, draft: Any) -> None:
        charged.clear()  # a batch that failed may run this again
        if charge:
            for name, (total, refresh) in terms.items():
                state = budget.charge(
                    session, actor.key_id, zone, name, charge, total, refresh, delta=delta
                )
                draft.attrs.update(budget.charge_attrs(state))
                charged.append((name, state))

    first = prepared.auths[checked.datasets[0]]
    grants = sorted({a.decision.rule or "" for a in prepared.auths.values()})
    attrs: dict[str, str | int] = {
        **first.attrs(),
        "groups": len(body["result"]["rows"]),
        "k": body["k"],
        "epsilon": parameters["epsilon"],
        "delta": parameters["delta"],
    }
    if len(checked.datasets) > 1:
        # the grant of each dataset read (``rule`` names the first one's)
        for name in checked.datasets:
            attrs[f"rule.{zone}.{name}"] = prepared.auths[name].decision.rule or ""
    if node_result is not None:
        attrs["node_task"] = str(node_result.payload["task"])
    if "suppressed" in body:
        # exact releases only: under DP the count of shut groups is not released, not even to
        # the ledger's readers
        attrs["suppressed"] = int(body["suppressed"])
    receipt, _ = record_computation(
        ex,
        kind="aggregate",
        actor=actor.key_id,
        statement={
            "consumer": actor.key_id,
            "zones": [zone],
            "datasets": [
                {"zone": zone, "name": name, "snapshot": prepared.auths[name].digest}
                for name in checked.datasets
            ],
            "query_digest": hashlib.sha256(canonicalize(parameters)).hexdigest(),
            "rules_version": {name: version for name, (_, version) in prepared.rules.items()},
            "grant": ",".join(grants),
            "policy_version": first.decision.policy_version,
            "purpose": prepared.purpose,
            "k": body["k"],
            "epsilon": parameters["epsilon"],
            "delta": parameters["delta"],
            "output_level": checked.output_level.value,
        },
        result=result,
        node=node_result,
        refs={"zone": zone, "dataset": ",".join(checked.datasets)[:200]},
        attrs=attrs,
        registry_version=registry_version,
        apply=apply,
    )
    for name, state in charged:  # committed: what this process now knows is spent
        start = int(state.window_start.timestamp())
        _spent(ex).put((actor.key_id, zone, name, start), state.spent)
    # differencing: compared with the consumer's recent aggregates where the SQL is seen
    record_query(ex, actor.key_id, zone, checked.canonical, receipt["inclusion"]["index"])
    return {"result": result, "receipt": receipt}


def _plain(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def budget_status(ex: Exchange, actor: Principal, zone: str | None = None) -> list[dict[str, Any]]:
    """What remains of the caller's ε on every dataset of its live grants (or one zone's)."""
    grants = [g for g in access.list_grants(ex, actor, zone=zone) if g.consumer == actor.key_id]
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    with Session(ex.engine) as session:
        for grant in grants:
            for name in grant.datasets:
                if (grant.zone, name) in seen:
                    continue
                seen.add((grant.zone, name))
                row = access._dataset(session, grant.zone, name)
                ruleset, version = current_rules(session, row)
                state = budget.remaining(
                    session,
                    actor.key_id,
                    grant.zone,
                    name,
                    ruleset.epsilon_budget,
                    ruleset.refresh_seconds,
                )
                out.append(
                    {
                        "zone": grant.zone,
                        "dataset": name,
                        "budget": format(state.budget.normalize(), "f"),
                        "spent": format(state.spent.normalize(), "f"),
                        "delta_spent": _plain(state.delta_spent),
                        "remaining": format(state.remaining.normalize(), "f"),
                        "window_start": state.window_start.isoformat(),
                        "window_end": state.window_end.isoformat(),
                        "dp_required": ruleset.dp_required,
                        "rules_version": version,
                    }
                )
    return out
