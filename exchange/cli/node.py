"""``zonex node init|approve|list|serve|doctor|witness-policy``: a provider's zone node."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from exchange.cli._common import (
    Json,
    KeyPath,
    Url,
    app,
    client,
    err,
    one_line_errors,
    out,
    print_json,
    resolve_endpoint,
)

if TYPE_CHECKING:
    from crypto.note import NoteVerifier
    from crypto.tlogpolicy import Policy
    from exchange.client.sdk import Client

node_app = typer.Typer(help="zone nodes: a provider's data and zone keys on its own machine")
app.add_typer(node_app, name="node")

NodeDir = Annotated[Path, typer.Option("--data-dir", help="the node's directory")]
WitnessPolicy = Annotated[
    Path | None,
    typer.Option(
        "--witness-policy",
        help="a C2SP tlog-policy file listing the exchange's log: tasks whose checkpoint lacks "
        "its quorum of witness cosignatures are refused",
    ),
]


@node_app.command("init")
@one_line_errors
def node_init(
    data_dir: NodeDir,
    zone: Annotated[str, typer.Option(help="the zone this node hosts (create it first)")],
    log_key: Annotated[
        str | None,
        typer.Option(help="the exchange's log verifier key to pin (default: as it answers)"),
    ] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
    witness_policy: WitnessPolicy = None,
) -> None:
    """Create a node directory, its key (0600), and register the key for your zone (pending
    until the operator approves it).

    Example:
      zonex node init --data-dir tax-node --zone tax --url https://exchange.example --key tax.key
    """
    from crypto.encoding import b64url_encode
    from crypto.keys import SigningKey
    from crypto.note import NoteVerifier
    from exchange.node.home import CONFIG, check_witness_policy, init_node_dir

    if (data_dir / CONFIG).exists():
        raise ValueError(f"{data_dir} is already a node directory")
    policy = None if witness_policy is None else witness_policy.read_bytes()
    node_key = SigningKey.generate()
    with client(url, key) as c:
        answered = c.log_key()
        if log_key is not None and log_key.strip() != answered:
            raise ValueError(
                "the exchange's log key differs from --log-key: do not trust this exchange "
                "until its operator confirms the key"
            )
        if policy is not None:  # before registering: a refused policy leaves nothing behind
            check_witness_policy(policy, NoteVerifier.from_verifier_key(answered))
        c.request(
            "POST",
            "/v1/nodes",
            json={"zone": zone, "public_key": b64url_encode(node_key.public_key.raw)},
        )
    exchange_url = resolve_endpoint(url, key)[0].rstrip("/")
    init_node_dir(
        data_dir,
        zone=zone,
        exchange=exchange_url,
        log_key=answered,
        key=node_key,
        witness_policy=policy,
    )
    out.print(f"node {node_key.key_id} registered for zone {zone} (pending)")
    out.print(f"log key pinned: {answered}")
    if witness_policy is not None:
        out.print(f"witness policy pinned: {witness_policy}")
    out.print(f"the operator approves it with: zonex node approve {node_key.key_id}")


@node_app.command("approve")
@one_line_errors
def node_approve(
    key_id: Annotated[str, typer.Argument(help="the node's key id (zonex node list)")],
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("operator.key"),
) -> None:
    """Approve a pending node (operator): it then hosts its zone.

    Example:
      zonex node approve 3f1c…e9 --key operator.key
    """
    with client(url, key) as c:
        if len(key_id) < 64:
            matches = [n for n in c.request("GET", "/v1/nodes") if n["key_id"].startswith(key_id)]
            if len(key_id) < 6 or len(matches) != 1:
                raise ValueError(
                    f"{key_id!r} names {len(matches)} nodes; give the full key id or a unique "
                    "prefix of 6+ characters (zonex node list)"
                )
            key_id = matches[0]["key_id"]
        node = c.request("POST", f"/v1/nodes/{key_id}/approve")
    out.print(f"node {node['key_id']} approved: it now hosts zone {node['zone']}")


@node_app.command("list")
@one_line_errors
def node_list(
    as_json: Json = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("operator.key"),
) -> None:
    """List the nodes you may see (operator: all; provider: your zones').

    Example:
      zonex node list --key operator.key
    """
    with client(url, key) as c:
        nodes = c.request("GET", "/v1/nodes")
    if as_json:
        print_json(nodes)
        return
    table = Table("node", "zone", "status", "online", "last seen")
    for n in nodes:
        table.add_row(
            n["key_id"][:16] + "…",
            n["zone"],
            n["status"],
            "yes" if n["online"] else "no",
            n["last_seen"] or "-",
        )
    out.print(table)


@node_app.command("serve")
@one_line_errors
def node_serve(
    data_dir: NodeDir,
    url: Annotated[
        str | None, typer.Option(help="the exchange (default: the one given at init)")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="tasks run at once")] = 2,
) -> None:
    """Serve the zone: dial out to the exchange (no inbound port), verify and run each task.
    SIGTERM or SIGINT: finish the tasks in hand, then exit.

    Example:
      zonex node serve --data-dir tax-node
    """
    import logging

    from exchange.node.agent import NodeAgent
    from exchange.node.home import NodeHome

    home = NodeHome(data_dir)
    home.veto()  # a broken veto file fails now, not on the first task
    home.witness_policy()  # and so does a broken witness policy
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = NodeAgent(home, url=url, workers=workers)
    err.print(f"node {home.key_id[:16]}… serving zone {home.zone} via {agent.url}")
    try:
        agent.serve(stop)
    finally:
        agent.close()
        home.close()


@node_app.command("witness-policy")
@one_line_errors
def node_witness_policy(
    data_dir: NodeDir,
    policy_file: Annotated[
        Path | None,
        typer.Argument(help="a C2SP tlog-policy file that lists the exchange's log key"),
    ] = None,
    clear: Annotated[
        bool, typer.Option("--clear", help="remove the pinned policy: checkpoints need no witness")
    ] = False,
) -> None:
    """Pin a witness policy (set or replace), or remove it with --clear. Once pinned, the node
    refuses (``unwitnessed``) every task whose checkpoint lacks the policy's quorum of witness
    cosignatures; a running node applies the change from its next task.

    Example:
      zonex node witness-policy --data-dir tax-node districts.policy
    """
    from crypto.tlogpolicy import show
    from exchange.node.home import NodeHome

    if clear == (policy_file is not None):
        raise ValueError("give a policy FILE to pin, or --clear to remove it (not both)")
    home = NodeHome(data_dir)
    if policy_file is None:
        home.set_witness_policy(None)
        out.print("witness policy removed: checkpoints are checked against the log key only")
        return
    policy = home.set_witness_policy(policy_file.read_bytes())
    assert policy is not None
    out.print(
        f"witness policy pinned: quorum {show(policy.quorum)} over "
        f"{len(policy.witnesses)} witness(es), for log {home.log.name}",
        highlight=False,
    )


@node_app.command("doctor")
@one_line_errors
def node_doctor(
    data_dir: NodeDir,
    url: Annotated[
        str | None, typer.Option(help="the exchange (default: the one given at init)")
    ] = None,
    as_json: Json = False,
) -> None:
    """Check the node: its directory and key, local veto rules, witness policy, the exchange's
    reachability, clock skew, log key, registration, whether the exchange's latest checkpoint
    meets the witness policy, and every hosted dataset's rows and digest.

    Example:
      zonex node doctor --data-dir tax-node
    """
    checks = run_doctor(data_dir, url)
    if as_json:
        print_json(checks)
    else:
        for check in checks:
            mark = "[green]ok[/]  " if check["ok"] else "[bold red]FAIL[/]"
            out.print(f"{mark} {check['check']}: {check['detail']}", highlight=False)
    if not all(c["ok"] for c in checks):
        raise typer.Exit(1)


def run_doctor(data_dir: Path, url: str | None) -> list[dict[str, Any]]:
    """Each check as {check, ok, detail}; later checks are skipped when an earlier one they
    depend on fails."""
    import httpx

    from crypto.tlogpolicy import show
    from exchange.client.sdk import ApiError, Client
    from exchange.errors import ZonexError
    from exchange.node.home import NodeHome

    checks: list[dict[str, Any]] = []

    def add(name: str, ok: bool, detail: str) -> bool:
        checks.append({"check": name, "ok": ok, "detail": detail})
        return ok

    try:
        home = NodeHome(data_dir)
    except (ZonexError, OSError, ValueError) as exc:
        add("directory", False, str(exc))
        return checks
    add("directory", True, f"zone {home.zone}, node key {home.key_id[:16]}…")
    try:
        veto = home.veto()
        add(
            "veto rules",
            True,
            f"min_k {veto.min_k}, max_epsilon {veto.max_epsilon or 'none'}, "
            f"refuse {sorted(veto.refuse) or 'nothing'}",
        )
    except ZonexError as exc:
        add("veto rules", False, str(exc))
    policy = None
    try:
        policy = home.witness_policy()
        add(
            "witness policy",
            True,
            "none pinned: checkpoints are checked against the log key only"
            if policy is None
            else f"quorum {show(policy.quorum)} over {len(policy.witnesses)} witness(es)",
        )
    except ZonexError as exc:
        add("witness policy", False, str(exc))
    base = (url or home.exchange).rstrip("/")
    try:
        started = time.time()
        response = httpx.get(f"{base}/v1/health", timeout=5.0)
        rtt = time.time() - started
        add("reachable", response.status_code == 200, f"{base} answered {response.status_code}")
    except httpx.HTTPError as exc:
        add("reachable", False, f"{base}: {exc}; check the URL and the network path out")
        return checks
    date = response.headers.get("date")
    if date:
        skew = parsedate_to_datetime(date).timestamp() - (started + rtt / 2)
        # the exchange refuses signatures more than 300 s off; warn well before
        add(
            "clock",
            abs(skew) < 60,
            f"{skew:+.1f} s from the exchange"
            + ("" if abs(skew) < 60 else "; synchronize this clock (NTP)"),
        )
    with Client(base, home.key, timeout=10.0) as c:
        try:
            pinned = home.log.to_verifier_key()
            answered = c.log_key()
            add(
                "log key",
                answered == pinned,
                "matches the key pinned at init"
                if answered == pinned
                else "the exchange now answers another log key: do not serve until its "
                "operator explains",
            )
            me = c.request("GET", "/v1/node/self")
            add(
                "registration",
                me["status"] == "active" and me["zone"] == home.zone,
                f"{me['status']} for zone {me['zone']}",
            )
        except ApiError as exc:
            add("registration", False, exc.detail or exc.title)
        if policy is not None:
            _doctor_witnessed(c, home.log, policy, add)
    for name, dataset in sorted(home.datasets().items()):
        try:
            with home.source(dataset) as (engine, relation, _):
                from sqlalchemy import func, select

                with engine.connect() as conn:
                    count = conn.execute(select(func.count()).select_from(relation)).scalar_one()
            ok = count == dataset.row_count
            add(
                f"dataset {name}",
                ok,
                f"{count} rows" + ("" if ok else f", registered with {dataset.row_count}"),
            )
        except Exception as exc:  # reported, not raised: doctor reports every problem
            add(f"dataset {name}", False, f"unreadable: {exc}")
    return checks


def _doctor_witnessed(
    c: Client, log: NoteVerifier, policy: Policy, add: Callable[[str, bool, str], bool]
) -> None:
    """Whether the exchange's latest checkpoint meets the pinned policy (a task's checkpoint
    must, or the node refuses it)."""
    from crypto.errors import CryptoError
    from crypto.tlogpolicy import check_quorum
    from exchange.client.sdk import ApiError

    try:
        report = check_quorum(c.checkpoint()["note"], policy, log)
    except (ApiError, CryptoError) as exc:
        add("witnessed", False, f"the exchange's latest checkpoint: {exc}")
        return
    detail = f"checkpoint {report.checkpoint.size}: {report.explain()}"
    if not report.ok:
        detail += (
            "; tasks are refused until the exchange's witnesses cosign (one signed in the last "
            "seconds may not be cosigned yet: run again)"
        )
    add("witnessed", report.ok, detail)
