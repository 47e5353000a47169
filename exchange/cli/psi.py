"""``zonex psi cardinality|members|aggregate``: private joins, run from the consumer's machine.

The ids are read from a local CSV column, normalized, blinded and (for ``aggregate``) the BFV
secret key is made here; none of it leaves this process (:mod:`exchange.client.psi`). Each
phase shows a progress bar. The exchange's signed result goes to ``--out`` with its receipt
next to it (``zonex receipt verify`` checks the pair); what only this machine can read (the
membership of each input row, the decrypted sums) goes to ``OUT.local.json``.

At L3 and above a release over your id list is differentially private unless the provider
opted out: ``cardinality`` and ``aggregate`` then need ``--epsilon`` and ``members`` is
refused. A differentially private ``aggregate`` whose noisy count falls below k is shown as
suppressed: nothing but that fact is released, and the ε is spent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from exchange.cli._common import (
    PLACES,
    STDOUT,
    KeyPath,
    Url,
    ZoneArg,
    ZoneFlag,
    app,
    client,
    err,
    one_line_errors,
    one_zone,
    out,
    print_json,
    save_result,
    shown,
)

if TYPE_CHECKING:
    from rich.progress import TaskID

    from exchange.client.sdk import ApiError

psi_app = typer.Typer(help="private joins (PSI) with a zone's dataset", no_args_is_help=True)
app.add_typer(psi_app, name="psi")

Dataset = Annotated[str, typer.Option("--dataset", help="the dataset to join with")]
Ids = Annotated[
    Path, typer.Option("--ids", exists=True, dir_okay=False, help="CSV file holding your ids")
]
Column = Annotated[
    str,
    typer.Option("--id-column", "--column", help="the CSV column with the ids (its header row)"),
]
Purpose = Annotated[str, typer.Option("--purpose", help="purpose of use (as granted)")]
OutFile = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="write the signed result here (and OUT.receipt, OUT.local.json); - for stdout",
    ),
]
#: exchange.client.psi.DEFAULT_BATCH_POINTS, stated here so that --help needs no PSI stack
#: (a test checks the two agree)
DEFAULT_BATCH = 65_536
Batch = Annotated[int, typer.Option("--batch", min=1, help="points per upload batch")]
Epsilon = Annotated[
    str | None,
    typer.Option(
        help="add DP noise, spending this ε of your budget (required at L3 and above unless "
        "the provider allows exact releases)"
    ),
]

#: refusals the shell can fix, said in its terms (the exchange's detail names API fields)
_HINTS = {
    "dp_required": "this dataset releases only differentially private results over your ids: "
    "add --epsilon (for example --epsilon 0.5); the result carries noise and spends that ε "
    "of your budget",
    "dp_required:members": "this dataset does not release membership exactly: run `zonex psi "
    "cardinality --epsilon ...` or `zonex psi aggregate --epsilon ...` instead",
}


def _hint(mode: str, exc: ApiError) -> str | None:
    reason = exc.body.get("reason") if isinstance(exc.body, dict) else None
    if not isinstance(reason, str):
        return None
    hint = _HINTS.get(f"{reason}:{mode}", _HINTS.get(reason))
    return None if hint is None else f"{hint} ({exc.status} {reason})"


@contextmanager
def _bars() -> Iterator[Any]:
    """A progress callback drawing one bar per phase (on stderr, so --out stays clean)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        transient=False,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def report(phase: str, done: int, total: int) -> None:
            task = tasks.get(phase)
            if task is None:
                task = tasks[phase] = progress.add_task(phase, total=max(total, 1))
            progress.update(task, completed=done, total=max(total, 1))

        yield report


def _join(
    mode: str,
    zone: str,
    dataset: str,
    ids: Path,
    column: str,
    purpose: str,
    out_file: Path | None,
    url: str,
    key: Path,
    batch: int,
    sums: list[str] | None = None,
    epsilon: str | None = None,
) -> None:
    from exchange.client.psi import BadIdError, read_ids, run
    from exchange.client.sdk import ApiError
    from exchange.node import dp

    values = read_ids(ids, column)
    if epsilon is not None:
        # the exchange may set a higher floor; this catches the rest before any work
        epsilon = str(dp.parse_epsilon(epsilon, what="--epsilon"))
    try:
        with client(url, key) as c, _bars() as report:
            response = run(
                c,
                zone=zone,
                dataset=dataset,
                mode=mode,
                ids=values,
                purpose=purpose,
                sums=sums or [],
                epsilon=epsilon,
                batch_points=batch,
                progress=report,
            )
    except BadIdError as exc:
        raise ValueError(f"{ids}, column {column!r}, {exc}") from None
    except ApiError as exc:
        hint = _hint(mode, exc)
        if hint is None:
            raise
        raise ValueError(hint) from None
    local = response.pop("local")
    doc = dict(local)
    if "members" in doc:
        doc["members"] = [
            {"row": i + 1, column: v, "member": m}
            for i, (v, m) in enumerate(zip(values, doc["members"], strict=True))
        ]
    if out_file == STDOUT:
        # the signed result, its receipt and what only this machine can read, as one document
        print_json({"result": response["result"], "receipt": response["receipt"], "local": doc})
        err.print(
            'the signed receipt is in the output\'s "receipt" field, the decrypted values in '
            '"local"',
            highlight=False,
        )
    elif out_file is not None:
        save_result(response, out_file, None)
        local_file = out_file.with_name(out_file.name + ".local.json")
        local_file.write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n", "utf-8")
        err.print(f"local result (readable only here): {local_file}", highlight=False)
    result = response["result"]
    table = Table(title=f"psi {mode}: {zone}/{dataset}")
    if result.get("noised"):
        table.caption = f"noised values rounded to {PLACES} decimals; the JSON keeps every digit"
    table.add_column("value")
    table.add_column("", justify="right")
    table.add_row("your ids (distinct)", f"{local['ids']} ({local['distinct']})")
    table.add_row("dataset subjects", str(result["y_count"]))
    if mode in ("cardinality", "members"):
        table.add_row("in both", str(local["intersection"]))
    elif local.get("suppressed"):
        table.add_row("result", f"suppressed: the noisy count fell below k = {result['k']}")
        table.add_row("released", "nothing else (no count, no sums)")
    else:
        table.add_row("count", shown(local["count"]))
        for name, total in local["sums"].items():
            table.add_row(f"sum({name})", shown(total))
            table.add_row(f"avg({name})", shown(local["averages"][name]))
    if result.get("noised"):
        table.add_row("DP noise", f"ε = {result['epsilon']} (spent from your budget)")
    # the table is for people: on stderr when stdout carries the JSON
    console = err if out_file == STDOUT else out
    console.print(table)
    # whole, on a line of its own: an id to copy (the receipt and the ledger name it)
    console.print(f"session {result['session']}", highlight=False, soft_wrap=True)


@psi_app.command("cardinality")
@one_line_errors
def cardinality(
    dataset: Dataset,
    ids: Ids,
    column: Column,
    purpose: Purpose,
    epsilon: Epsilon = None,
    out_file: OutFile = None,
    batch: Batch = DEFAULT_BATCH,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
    zone: ZoneArg = None,
    zone_flag: ZoneFlag = None,
) -> None:
    """How many of your ids the dataset holds (nobody sees the other side's ids).

    Example:
      zonex psi cardinality tax --dataset companies --ids applicants.csv --id-column company_id \\
        --epsilon 1 --purpose credit-assessment --key bank.key
    """
    zone = one_zone(zone, zone_flag, "psi cardinality")
    _join(
        "cardinality", zone, dataset, ids, column, purpose, out_file, url, key, batch, None, epsilon
    )


@psi_app.command("members")
@one_line_errors
def members(
    dataset: Dataset,
    ids: Ids,
    column: Column,
    purpose: Purpose,
    out_file: OutFile = None,
    batch: Batch = DEFAULT_BATCH,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
    zone: ZoneArg = None,
    zone_flag: ZoneFlag = None,
) -> None:
    """Which of your ids the dataset holds (exact: only where the provider allows exact
    releases, at L1/L2 or at L3 by its opt-out).

    Example:
      zonex psi members tax --dataset companies --ids applicants.csv --id-column company_id \\
        --purpose credit-assessment --out members.json --key bank.key
    """
    zone = one_zone(zone, zone_flag, "psi members")
    _join("members", zone, dataset, ids, column, purpose, out_file, url, key, batch)


@psi_app.command("aggregate")
@one_line_errors
def aggregate(
    dataset: Dataset,
    ids: Ids,
    column: Column,
    purpose: Purpose,
    sum_columns: Annotated[
        list[str] | None, typer.Option("--sum", help="a numeric column to sum (repeatable)")
    ] = None,
    epsilon: Epsilon = None,
    out_file: OutFile = None,
    batch: Batch = DEFAULT_BATCH,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
    zone: ZoneArg = None,
    zone_flag: ZoneFlag = None,
) -> None:
    """COUNT, SUM and AVG of the dataset's columns over the ids you both hold, decrypted here.

    Example:
      zonex psi aggregate tax --dataset companies --ids applicants.csv --id-column company_id \\
        --sum tax_paid_2025 --epsilon 1 --purpose credit-assessment --key bank.key
    """
    zone = one_zone(zone, zone_flag, "psi aggregate")
    _join(
        "aggregate",
        zone,
        dataset,
        ids,
        column,
        purpose,
        out_file,
        url,
        key,
        batch,
        sum_columns or [],
        epsilon,
    )


@psi_app.command("prepare")
@one_line_errors
def prepare(
    dataset: Dataset,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
    as_json: Annotated[bool, typer.Option("--json", help="print the epochs as JSON")] = False,
    node: Annotated[
        Path | None,
        typer.Option(
            "--node",
            help="the zone's node directory: prepare there (the epoch key stays on the node) "
            "and upload the fingerprints, signed with the node's key",
        ),
    ] = None,
    chunk: Annotated[
        int, typer.Option("--chunk", min=1, help="with --node: subjects blinded per recorded chunk")
    ] = 262_144,
    max_chunks: Annotated[
        int | None,
        typer.Option(
            "--max-chunks", min=1, help="with --node: stop after this many chunks (resumable)"
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            help="with --node: blind on your own Dask cluster at this address (tcp://host:8786; "
            "pip install 'zonex[psi-dask]'); the epoch key goes to its workers",
        ),
    ] = None,
    zone: ZoneArg = None,
    zone_flag: ZoneFlag = None,
) -> None:
    """Prepare an epoch of your dataset for unbalanced private joins (docs/psi.md, "Epoch mode").

    The zone blinds every subject once under a fresh epoch key, in the background; sessions
    whose |Y| is at least 16 times |X| then cost the consumer O(|X|). Run it again to see the
    progress; a ready, current epoch is left as it is. With --node the zone's node prepares it
    here, in the foreground (a bar shows the progress; an interrupted run continues from its
    last chunk), then uploads it; the node's running `zonex node serve` also prepares when
    the exchange asks. With --scheduler the node's preparation runs on your own Dask cluster
    (the same fingerprints; the epoch key is sent to its workers).

    Example:
      zonex psi prepare tax --dataset companies --key bureau.key
      zonex psi prepare --node tax-node --dataset companies
      zonex psi prepare --node tax-node --dataset companies --scheduler tcp://10.0.0.5:8786
    """
    if node is not None:
        _prepare_on_node(node, dataset, chunk, max_chunks, as_json, scheduler)
        return
    if scheduler is not None:
        raise ValueError(
            "--scheduler needs --node: a zone the exchange hosts is prepared on the exchange "
            "(its setting psi_epoch_scheduler)"
        )
    zone = one_zone(zone, zone_flag, "psi prepare")
    with client(url, key) as c:
        status = c.psi_prepare_epoch(zone, dataset)
    if as_json:
        print_json(status)
        return
    _epoch_table(f"epochs of {zone}/{dataset}", status["epochs"], status["current"])
    if status["current"] is None:
        err.print("preparing in the background; run this again to follow it", highlight=False)


def _epoch_table(title: str, epochs: list[dict[str, Any]], current: str | None) -> None:
    table = Table(title=title)
    for name in ("epoch", "state", "subjects", "blinded", "sessions", "created"):
        table.add_column(name)
    for e in epochs:
        table.add_row(
            e["id"],
            e["state"] + (" (current)" if e["id"] == current else ""),
            "?" if e["y_count"] is None else str(e["y_count"]),
            str(e["done"]),
            str(e["sessions"]),
            str(e["created_at"]),
        )
    out.print(table)


def _prepare_on_node(
    node: Path,
    dataset: str,
    chunk: int,
    max_chunks: int | None,
    as_json: bool,
    scheduler: str | None = None,
) -> None:
    """``zonex psi prepare --node``: the node's side (:mod:`exchange.node.psi_epoch`)."""
    import httpx

    from exchange.client.sdk import SignatureAuth
    from exchange.node import psi_epoch
    from exchange.node.home import NodeHome

    home = NodeHome(node)
    try:
        with httpx.Client(
            base_url=home.exchange, auth=SignatureAuth(home.key), timeout=60.0
        ) as http:
            try:
                listing = psi_epoch.exchange_epochs(http)
            except httpx.HTTPError as exc:
                raise ValueError(f"the exchange at {home.exchange} is unreachable: {exc}") from exc
            except psi_epoch.UploadError as exc:
                raise ValueError(str(exc)) from exc
            ours = [e for e in listing["epochs"] if e["dataset"] == dataset]
            current = next((e["id"] for e in ours if e["current"]), None)
            if current is None:
                with _bars() as report:
                    meta = psi_epoch.prepare_epoch(
                        home,
                        dataset,
                        chunk=chunk,
                        max_chunks=max_chunks,
                        progress=lambda done, total: report("blinding", done, total),
                        scheduler=scheduler,
                    )
                if meta["state"] != "prepared":
                    err.print(
                        f"stopped after {meta['done']} of {meta['y_count']} subjects; run this "
                        "again to continue",
                        highlight=False,
                    )
                    if as_json:
                        print_json({"node": meta, "exchange": ours})
                    return
                try:
                    psi_epoch.upload_epoch(home, http, meta)
                except psi_epoch.UploadError as exc:
                    raise ValueError(
                        f"{exc}; the epoch stays prepared here: run this again"
                    ) from exc
                listing = psi_epoch.exchange_epochs(http)
                ours = [e for e in listing["epochs"] if e["dataset"] == dataset]
                current = next((e["id"] for e in ours if e["current"]), None)
    finally:
        home.close()
    if as_json:
        print_json({"current": current, "epochs": ours})
        return
    _epoch_table(f"epochs of {home.zone}/{dataset} (prepared on the node)", ours, current)
