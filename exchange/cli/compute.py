"""Computations over one zone: export, aggregate, the budget and a dataset's analysis rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from exchange.cli._common import (
    PLACES,
    STDOUT,
    Json,
    KeyPath,
    Url,
    _when,
    app,
    client,
    err,
    is_stdout,
    one_line_errors,
    out,
    print_json,
    save_result,
    shown,
)
from exchange.cli.datasets import dataset_app

OutFile = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="write the result here; without it (or with -) stdout gets the result and "
        "its receipt as one JSON document",
    ),
]
_EXACT_RELEASE_WARNING = (
    "exact_release is set: L3 releases of this dataset are exact, not differentially private, "
    "and two queries that differ by one subject can reveal that subject's value (differencing "
    "possible); the catalog says so"
)
ReceiptFile = Annotated[
    Path | None, typer.Option("--receipt", help="write the receipt here (default OUT.receipt)")
]


@app.command("export")
@one_line_errors
def export_cmd(
    zone: str,
    dataset: str,
    purpose: Annotated[str, typer.Option(help="purpose of use")],
    out_file: OutFile = None,
    receipt_file: ReceiptFile = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """Export rows where the level allows it (masked subject column at L2).

    A dataset hosted on its zone's node comes back sealed to your key, and is opened and
    checked here against what the node signed: the signed result (row count and digests) goes
    to OUT, the rows to OUT.rows (on standard output: the "rows" field).

    Example:
      zonex export tax companies --purpose credit-assessment --out rows.json --key bank.key
    """
    with client(url, key) as c:
        response = c.export(zone, dataset, purpose)
    if "rows" not in response:  # the exchange read the rows: they are in the signed result
        save_result(response, out_file, receipt_file)
        where = "standard output" if is_stdout(out_file) else out_file
        err.print(f"{len(response['result']['rows'])} rows written to {where}", highlight=False)
        return
    rows = response["rows"]
    if is_stdout(out_file):
        print_json({"result": response["result"], "rows": rows, "receipt": response["receipt"]})
        if receipt_file is not None and receipt_file != STDOUT:
            receipt_file.write_text(json.dumps(response["receipt"], indent=2) + "\n", "utf-8")
        err.print(
            f"{len(rows)} rows opened and checked against the node's signed digest, written "
            "to standard output",
            highlight=False,
        )
        return
    assert out_file is not None
    save_result(response, out_file, receipt_file)
    rows_file = out_file.with_name(out_file.name + ".rows")
    text = json.dumps({"columns": response["result"]["columns"], "rows": rows}, ensure_ascii=False)
    rows_file.write_text(text + "\n", "utf-8")
    err.print(
        f"{len(rows)} rows opened and checked against the node's signed digest, written to "
        f"{rows_file}",
        highlight=False,
    )


@app.command("aggregate")
@one_line_errors
def aggregate_cmd(
    zone: str,
    sql: Annotated[str, typer.Option(help="one SELECT over the zone's datasets")],
    purpose: Annotated[str, typer.Option(help="purpose of use")],
    epsilon: Annotated[
        str | None, typer.Option(help="ε to spend: asks for DP, or sets it where DP is required")
    ] = None,
    out_file: OutFile = None,
    receipt_file: ReceiptFile = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """Run a clean-room SQL aggregate under the zone's analysis rules.

    Example:
      zonex aggregate tax --purpose credit-assessment --epsilon 0.5 --out agg.json --key bank.key \\
        --sql "SELECT district, COUNT(*), AVG(tax_paid_2025) FROM companies GROUP BY district"
    """
    with client(url, key) as c:
        response = c.aggregate(zone, sql, purpose, epsilon=epsilon)
    result = response["result"]
    if not is_stdout(out_file):
        table = Table(*result["columns"])
        for row in result["rows"]:
            table.add_row(*(shown(v) for v in row))
        err.print(table)
        if result["epsilon"] != "0":
            err.print(
                f"noised values rounded to {PLACES} decimals; {out_file} keeps every digit",
                highlight=False,
                soft_wrap=True,
            )
    save_result(response, out_file, receipt_file)
    note = f"{len(result['rows'])} groups released"
    if result.get("suppressed") is not None:
        note += f", {result['suppressed']} suppressed (k = {result['k']})"
    else:
        # a DP release does not say how many groups its noisy gate kept shut
        note += f" (noisy gate at k = {result['k']})"
    if result["epsilon"] != "0":
        note += f"; differentially private, ε = {result['epsilon']} charged"
    err.print(note, highlight=False)


@app.command("budget")
@one_line_errors
def budget_cmd(
    zone: Annotated[str | None, typer.Option(help="only this zone")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, not a table")] = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """Show the privacy budget (ε) left on each dataset you hold a grant for.

    Example:
      zonex budget --zone tax --key bank.key
    """
    with client(url, key) as c:
        found = c.budgets(zone)
    if as_json:
        print_json(found)
        return
    table = Table("zone", "dataset", "budget ε", "spent", "remaining", "refreshes", "DP required")
    for b in found:
        table.add_row(
            b["zone"],
            b["dataset"],
            b["budget"],
            b["spent"],
            b["remaining"],
            _when(b["window_end"]),
            "yes" if b["dp_required"] else "no",
        )
    out.print(table)


@dataset_app.command("rules")
@one_line_errors
def dataset_rules(
    zone: str,
    dataset: str,
    set_file: Annotated[
        Path | None, typer.Option("--set", help="JSON analysis rules to set (provider)")
    ] = None,
    as_json: Json = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Show a dataset's analysis rules, or set new ones (docs/analysis-rules.md).

    Example:
      zonex dataset rules tax companies --set rules.json --key bureau.key
    """
    document: Any = None
    if set_file is not None:
        try:
            document = json.loads(set_file.read_text("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{set_file}: not a readable JSON file ({exc})") from None
    with client(url, key) as c:
        if document is not None:
            found = c.set_analysis_rules(zone, dataset, document)
        else:
            found = c.analysis_rules(zone, dataset)
    if as_json:
        print_json(found)
        if document is not None and found["rules"].get("exact_release"):
            err.print(f"[yellow]warning:[/] {_EXACT_RELEASE_WARNING}")
        return
    rules = found["rules"]
    origin = "defaults from the column levels" if found["default"] else f"v{found['version']}"
    out.print(
        f"{zone}/{dataset} analysis rules ({origin}): k = {rules['min_group_size']}, "
        f"DP {'required' if rules['dp_required'] else 'optional'}, ε budget "
        f"{rules['epsilon_budget']} per {rules['refresh_seconds']} s"
    )
    table = Table("column", "disclosure", "lower", "upper")
    for name, rule in rules["columns"].items():
        table.add_row(name, rule["disclosure"], rule.get("lower") or "", rule.get("upper") or "")
    out.print(table)
    if document is not None and rules.get("exact_release"):
        out.print(f"[yellow]warning:[/] {_EXACT_RELEASE_WARNING}")
