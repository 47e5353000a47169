"""``zonex node serve``: dial out to the exchange, verify each task, run it, sign the answer.

The loop long-polls ``POST /v1/node/poll`` (signed with the node key); the exchange answers
with a task bundle or, after a few seconds, with nothing. Each bundle is verified in the loop
(:func:`exchange.tasks.verify_task_bundle`, against the log key pinned at init and the last
checkpoint this node accepted) and recorded as answered before it runs, so a task is never run
twice, even across a restart; then a worker thread checks the query again under the task's
rules tightened by the local veto rules, reads the rows, draws the noise and signs the result.
A refusal is an answer too (``{"refused": {"reason", "detail"}}``): the consumer learns the
reason code; the node's log keeps the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from exchange.client.sdk import SignatureAuth
from exchange.errors import ZonexError
from exchange.node.analysis import AnalysisRules
from exchange.node.engine import release_aggregate, table_stats
from exchange.node.export import KIND as EXPORT_KIND
from exchange.node.export import run_export
from exchange.node.home import NodeHome
from exchange.node.psi import KIND as PSI_KIND
from exchange.node.psi import run_psi_zone
from exchange.node.psi_epoch import ANSWER_KIND as EPOCH_ANSWER_KIND
from exchange.node.psi_epoch import PREPARE_KIND as EPOCH_PREPARE_KIND
from exchange.node.psi_epoch import run_epoch_answer, run_epoch_prepare, sweep_now_and_then
from exchange.node.score import KIND as SCORE_KIND
from exchange.node.score import run_he_score
from exchange.node.secure_sum import KIND as SUM_KIND
from exchange.node.secure_sum import run_secure_sum
from exchange.node.sqlcheck import QueryRejected, TableColumn, TableRules, TableStats, check_query
from exchange.tasks import TaskRefused, Verified, sign_result, verify_task_bundle
from policy.levels import Level

__all__ = ["NodeAgent"]

log = logging.getLogger("zonex.node")

#: checked queries remembered per node process
PLAN_CACHE_SIZE = 256

#: how long the node asks the exchange to hold a poll open
POLL_WAIT = 4.0


class NodeAgent:
    """One node process: its home directory and its connection to the exchange."""

    def __init__(
        self,
        home: NodeHome,
        *,
        url: str | None = None,
        workers: int = 2,
        poll_wait: float = POLL_WAIT,
    ) -> None:
        self.home = home
        self.url = (url or home.exchange).rstrip("/")
        self.poll_wait = poll_wait
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zonex-task")
        self._http = httpx.Client(
            base_url=self.url, auth=SignatureAuth(home.key), timeout=poll_wait + 30.0
        )
        self._stats: dict[tuple[str, str], TableStats] = {}
        self._plans: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    # -- the loop -------------------------------------------------------------------------

    def serve(self, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                bundle = self.poll()
            except (httpx.HTTPError, _PollError, ZonexError) as exc:
                log.warning("poll failed (%s); retrying in %.1f s", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.5
            sweep_now_and_then(self.home, self._http)  # ended epochs' keys go
            if bundle is None:
                continue
            try:
                self.take(bundle)
            except Exception:  # a bundle that breaks the checks must not stop the node
                log.exception("could not handle a task bundle")

    def poll(self) -> dict[str, Any] | None:
        last = self.home.last_checkpoint()
        response = self._http.post(
            "/v1/node/poll",
            json={
                "since": None if last is None else last.size,
                "wait": self.poll_wait,
                # the exchange has its checkpoints cosigned before handing them to a node that
                # checks cosignatures (a damaged policy stops the polls: the zone shows offline)
                "witnessed": self.home.witness_policy() is not None,
            },
        )
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            detail = _detail(response)
            raise _PollError(f"the exchange answered {response.status_code}: {detail}")
        body: dict[str, Any] = response.json()
        return body

    def take(self, bundle: dict[str, Any]) -> None:
        """Verify a bundle here (in order), then run it on a worker."""
        task_id = str((bundle.get("task") or {}).get("id", ""))[:64]
        try:
            verified = self.verify(bundle)
        except TaskRefused as refusal:
            log.warning("refused task %s: %s", task_id, refusal)
            self._pool.submit(self._answer, task_id, {"refused": refusal.to_json()})
            return
        self._pool.submit(self._run, verified)

    def verify(self, bundle: dict[str, Any]) -> Verified:
        home = self.home
        verified = verify_task_bundle(
            bundle,
            log=home.log,
            zone=home.zone,
            node=home.key_id,
            now=datetime.now(UTC),
            last=home.last_checkpoint(),
            policy=home.witness_policy(),
        )
        task = verified.task
        if home.answered(task["id"]):
            raise TaskRefused("replayed", "this node already answered this task")
        home.accept(verified.checkpoint, bundle["checkpoint"], task["id"], task["deadline"])
        return verified

    def _run(self, verified: Verified) -> None:
        task = verified.task
        try:
            outcome: dict[str, Any] = {"result": self.run(task).model_dump(mode="json")}
        except TaskRefused as refusal:
            log.warning("refused task %s: %s", task["id"], refusal)
            outcome = {"refused": refusal.to_json()}
        except Exception:  # the node keeps serving; the consumer gets a reason code
            log.exception("task %s failed", task["id"])
            outcome = {"refused": {"reason": "node_error", "detail": "the node failed to run it"}}
        self._answer(task["id"], outcome)

    def _answer(self, task_id: str, outcome: dict[str, Any]) -> None:
        for attempt in range(5):
            try:
                response = self._http.post(f"/v1/node/tasks/{task_id}/outcome", json=outcome)
            except httpx.HTTPError as exc:
                log.warning("could not deliver the answer to %s (%s)", task_id, exc)
                time.sleep(0.5 * (attempt + 1))
                continue
            if response.status_code >= 400:
                log.warning("the exchange refused the answer to %s: %s", task_id, _detail(response))
            return

    # -- running one task ---------------------------------------------------------------------

    def run(self, task: dict[str, Any]) -> Any:
        if task["kind"] == PSI_KIND:
            return run_psi_zone(self.home, self._http, task)
        if task["kind"] == EPOCH_ANSWER_KIND:
            return run_epoch_answer(self.home, self._http, task)
        if task["kind"] == EPOCH_PREPARE_KIND:
            return run_epoch_prepare(self.home, self._http, task)
        if task["kind"] == SUM_KIND:
            return run_secure_sum(self, task)
        if task["kind"] == SCORE_KIND:
            return run_he_score(self.home, self._http, task)
        if task["kind"] == EXPORT_KIND:
            return run_export(self.home, self._http, task)
        if task["kind"] != "aggregate":
            raise TaskRefused("unsupported", f"this node does not run {task['kind']!r} tasks")
        return self._aggregate(task)

    def _aggregate(self, task: dict[str, Any]) -> Any:
        home = self.home
        epsilon: Decimal | None = None
        if task.get("dp"):
            try:
                epsilon = Decimal(str(task["epsilon"]))
            except (InvalidOperation, KeyError) as exc:
                raise TaskRefused("malformed", "the task's epsilon is not a decimal") from exc
        veto = home.veto()
        veto.check("aggregate", epsilon)
        tables = self.tables(task, veto.min_k)
        hosted = home.datasets()
        first = hosted[next(iter(tables))]
        with home.source(first) as (engine, _, dialect):
            checked = self._check(task, tables, _DIALECTS.get(dialect, dialect))
            if checked.dp and epsilon is None:
                raise TaskRefused("dp_required", "the rules here require a DP release")
            body = release_aggregate(checked, engine, epsilon if checked.dp else None)
        return sign_result(home.key, task, body)

    def tables(self, task: dict[str, Any], min_k: int) -> dict[str, TableRules]:
        """The checker's view of the datasets a task reads: this node's columns and levels, the
        snapshot it holds (checked against the task's), the task's rules with k raised to the
        veto's ``min_k``."""
        home = self.home
        hosted = home.datasets()
        wanted = task.get("datasets")
        if not isinstance(wanted, dict) or not wanted:
            raise TaskRefused("malformed", "the task names no dataset")
        tables: dict[str, TableRules] = {}
        for name, snapshot in wanted.items():
            dataset = hosted.get(name)
            if dataset is None:
                raise TaskRefused("unknown_dataset", f"this node hosts no dataset {name!r}")
            if dataset.digest != snapshot:
                raise TaskRefused("snapshot_mismatch", f"{name}: the task is for another snapshot")
            try:
                rules = AnalysisRules.from_json(task["rules"][name])
            except (KeyError, ValueError, TypeError) as exc:
                raise TaskRefused("malformed", f"{name}: the task's rules are unusable") from exc
            rules = dataclasses.replace(rules, min_group_size=max(rules.min_group_size, min_k))
            relation, schema = None, None
            if dataset.source == "attach" and dataset.attach_table:
                schema, _, relation = dataset.attach_table.rpartition(".")
                schema = schema or None
            tables[name] = TableRules(
                name,
                tuple(
                    TableColumn(c["name"], c["type"], Level(c["level"])) for c in dataset.columns
                ),
                dataset.subject_column,
                rules,
                zone=home.zone,
                relation=relation,
                relation_schema=schema,
                stats=self._table_stats(dataset),
            )
        return tables

    def _check(self, task: dict[str, Any], tables: dict[str, TableRules], dialect: str) -> Any:
        """:func:`check_query` on this node's view of the tables, remembered per exact input
        (the query, the flags, and every table's columns, rules after the veto, relation and
        snapshot): the same task shape is checked once, a changed rule or snapshot misses."""
        key = (
            str(task["sql"]),
            bool(task.get("dp")),
            bool(task.get("named_groups")),
            dialect,
            tuple(
                (
                    name,
                    t.columns,
                    t.subject_column,
                    json.dumps(t.rules.to_json(), sort_keys=True),
                    t.relation,
                    t.relation_schema,
                    task["datasets"][name],
                )
                for name, t in sorted(tables.items())
            ),
        )
        with self._stats_lock:
            found = self._plans.get(key)
            if found is not None:
                self._plans.move_to_end(key)
                return found
        try:
            checked = check_query(
                key[0], tables, dialect_out=dialect, with_dp=key[1], named_groups=key[2]
            )
        except QueryRejected as exc:
            raise TaskRefused("query_refused", f"{exc.reason}: {exc.detail}") from exc
        with self._stats_lock:
            self._plans[key] = checked
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return checked

    def _table_stats(self, dataset: Any) -> TableStats | None:
        if dataset.source != "import":
            return None  # an attached table can change under the node: assume nothing
        key = (dataset.name, dataset.digest)
        with self._stats_lock:
            found = self._stats.get(key)
        if found is None:
            with self.home.source(dataset) as (engine, relation, _):
                found = table_stats(engine, relation, dataset.subject_column, dataset.columns)
            with self._stats_lock:
                self._stats[key] = found
        return found


#: SQLAlchemy backend name -> sqlglot dialect
_DIALECTS = {"postgresql": "postgres"}


class _PollError(Exception):
    """The exchange answered the poll with an error (the loop logs it and backs off)."""


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:300]
    return str(body)[:300]
