"""``zonex model``, ``zonex score`` and ``zonex secure-sum``: homomorphic computations from the
key holder's side. Secret contexts are made in this process and never written or sent."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

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
    is_stdout,
    one_line_errors,
    one_zone,
    out,
    print_json,
    save_result,
    shown,
)

if TYPE_CHECKING:
    from exchange.client import he as he_client

model_app = typer.Typer(help="scoring-model commitments", no_args_is_help=True)
app.add_typer(model_app, name="model")

ModelFile = Annotated[
    Path, typer.Option("--model", help="model JSON: features, weights, bias, link, nonce")
]
Purpose = Annotated[str, typer.Option(help="purpose the grant (and consents) name")]


@contextmanager
def _progress(title: str) -> Iterator[he_client.Progress]:
    """A rich progress bar driven by the client's ``progress(step, done, total)`` calls."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task(title, total=1)

        def update(step: str, done: int, total: int) -> None:
            bar.update(task, description=f"{title}: {step}", completed=done, total=total)

        yield update


@model_app.command("commit")
@one_line_errors
def model_commit(
    model: ModelFile, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("key")
) -> None:
    """Register the commitment of a model (its weights stay here). A model file without a
    nonce gets one, written back: keep the file, it is what an auditor will check.

    Example:
      zonex model commit --model model.json --key bank.key
    """
    from exchange.client import he as he_client

    loaded, fresh = he_client.load_model(model)
    if fresh:
        he_client.save_model(model, loaded)
        out.print(f"added a secret nonce to {model} (keep this file private)")
    with client(url, key) as c:
        stored = c.commit_model(loaded.document())
    out.print(f"model commitment: {stored['commitment']}")
    out.print(f"features: {', '.join(loaded.features)}; link: {loaded.link}")


@model_app.command("show")
@one_line_errors
def model_show(
    commitment: str,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("key"),
    out_file: Annotated[
        Path | None, typer.Option("--out", help="write the document here (- or none: stdout)")
    ] = None,
) -> None:
    """Fetch a commitment's public document (owner, auditor or operator).

    Example:
      zonex model show COMMITMENT --out model-doc.json --key bank.key
    """
    with client(url, key) as c:
        stored = c.model(commitment)
    if is_stdout(out_file):
        print_json(stored["document"])
    else:
        assert out_file is not None
        out_file.write_text(json.dumps(stored["document"], indent=2) + "\n", "utf-8")
        err.print(f"document: {out_file}", highlight=False)


@model_app.command("verify")
@one_line_errors
def model_verify(
    model: ModelFile,
    document: Annotated[Path, typer.Option(help="the committed document (zonex model show)")],
    commitment: Annotated[str, typer.Option(help="the commitment a receipt cites")],
) -> None:
    """Offline: check a revealed model file against a commitment and its document.

    Example:
      zonex model verify --model model.json --document model-doc.json --commitment COMMITMENT
    """
    from crypto import he
    from exchange.client import he as he_client

    loaded, fresh = he_client.load_model(model)
    if fresh:
        raise ValueError(f"{model} has no nonce: it cannot be the committed model")
    he.verify_model_commitment(
        commitment,
        json.loads(document.read_text("utf-8")),
        features=loaded.features,
        weights=loaded.weights,
        bias=loaded.bias,
        nonce=loaded.nonce,
        link=loaded.link,
    )
    out.print(f"OK: {model} is the model committed as {commitment}")


def _read_ids(path: Path, column: str | None) -> list[str]:
    """The ids in ``column`` of a CSV file whose first row is its header (never an id); a file
    of one column needs no ``--id-column``."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    if column is None:
        if len(header) != 1:
            raise ValueError(
                f"{path} has {len(header)} columns ({', '.join(header)}): name the one with the "
                "ids with --id-column"
            )
        column = header[0]
    if column not in header:
        raise ValueError(f"{path} has no column {column!r} (columns: {', '.join(header)})")
    index, body = header.index(column), rows[1:]
    ids = [r[index].strip() for r in body if len(r) > index and r[index].strip()]
    if not ids:
        raise ValueError(f"{path} holds no ids")
    return ids


@contextmanager
def _csv_out(path: Path) -> Iterator[TextIO]:
    """A CSV file to write, or standard output for ``-``."""
    if path == STDOUT:
        yield sys.stdout
        sys.stdout.flush()
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        yield f


def _numbered(path: Path, n: int, total: int) -> Path:
    return path if total == 1 else path.with_name(f"{path.stem}-{n + 1}{path.suffix}")


@app.command("score")
@one_line_errors
def score_cmd(
    dataset: Annotated[str, typer.Option(help="the dataset whose columns the model uses")],
    model: ModelFile,
    ids: Annotated[Path, typer.Option("--ids", help="CSV of entity ids (first column)")],
    purpose: Purpose = "credit-assessment",
    id_column: Annotated[
        str | None,
        typer.Option(help="the CSV column with the ids (its header row; needed if several)"),
    ] = None,
    scores_file: Annotated[
        Path, typer.Option("--out", help="scores CSV to write (- for stdout)")
    ] = Path("scores.csv"),
    result_file: Annotated[
        Path, typer.Option("--result", help="signed result (receipt beside it)")
    ] = Path("score-result.json"),
    refused_file: Annotated[
        Path, typer.Option("--refused", help="CSV of the refused ids, if any are refused")
    ] = Path("refused.csv"),
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("key"),
    zone: ZoneArg = None,
    zone_flag: ZoneFlag = None,
) -> None:
    """Score consented entities under your committed model; decrypt locally.

    Beside each signed result, RESULT.subjects holds the nonce that opens the result's
    commitment to the ids scored (keep it private; it shows an auditor which ids were scored).
    If the exchange refuses ids, it names their positions only: the ids are looked up here and
    written to --refused.

    Example:
      zonex score tax --dataset companies --model model.json --ids applicants.csv \\
        --id-column company_id --purpose credit-assessment --key bank.key
    """
    zone = one_zone(zone, zone_flag, "score")
    from exchange.client import he as he_client
    from exchange.client.sdk import ScoreRefusedError

    loaded, fresh = he_client.load_model(model)
    if fresh:
        raise ValueError(f"{model} has no nonce; run zonex model commit --model {model} first")
    entity_ids = _read_ids(ids, id_column)
    try:
        with client(url, key) as c, _progress(f"scoring {len(entity_ids)}") as progress:
            outcome = he_client.score(
                c,
                zone=zone,
                dataset=dataset,
                purpose=purpose,
                model=loaded,
                ids=entity_ids,
                progress=progress,
            )
    except ScoreRefusedError as exc:
        with refused_file.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["position", "id"])
            writer.writerows((p, entity_ids[p]) for p in exc.positions)
        listed = ", ".join(str(p + 1) for p in exc.positions[:20])
        more = f" and {len(exc.positions) - 20} more" if len(exc.positions) > 20 else ""
        err.print(
            f"{exc.count} ids refused (reason {exc.body.get('reason')}): rows {listed}{more} "
            f"of {ids} (1 = the first id); positions and ids in {refused_file}",
            highlight=False,
        )
        raise
    with _csv_out(scores_file) as f:
        writer = csv.writer(f)
        writer.writerow(["id", "score"])
        writer.writerows((i, repr(s)) for i, s in zip(outcome.ids, outcome.scores, strict=True))
    where = "standard output" if scores_file == STDOUT else scores_file
    err.print(f"{len(outcome.scores)} scores: {where}", highlight=False)
    batches = he_client.id_batches(entity_ids)
    for n, (response, batch) in enumerate(zip(outcome.responses, batches, strict=True)):
        target = _numbered(result_file, n, len(outcome.responses))
        save_result(response, target, None)
        opening = target.with_name(target.name + ".subjects")
        opening.touch(mode=0o600)
        opening.chmod(0o600)  # the ids and the nonce that opens their commitment
        opening.write_text(
            json.dumps(
                {
                    "subjects": response["result"]["subjects"],
                    "nonce": response["subjects_nonce"],
                    "ids": batch,
                },
                ensure_ascii=False,
                indent=2,
            )
            + "\n",
            "utf-8",
        )


def _listed(values: list[str]) -> list[str]:
    """A list option given one way or the other: the flag repeated, or comma-separated values
    (both may mix)."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _cells(cells: list[str] | None, cells_file: Path | None) -> list[list[str]]:
    if (not cells) == (cells_file is None):
        raise ValueError("give --cell A --cell B (or --cells A,B) or --cells-file FILE (JSON)")
    if cells:
        return [[c] for c in _listed(cells)]
    assert cells_file is not None
    data: Any = json.loads(cells_file.read_text("utf-8"))
    if not isinstance(data, list) or not all(isinstance(c, list) for c in data):
        raise ValueError(f"{cells_file} must hold a JSON list of lists of group values")
    return [[str(v) for v in c] for c in data]


@app.command("secure-sum")
@one_line_errors
def secure_sum_cmd(
    zones: Annotated[
        list[str],
        typer.Option(
            "--zone", "--zones", help="a zone to sum over (repeat it; d1,d2,d3 works too)"
        ),
    ],
    sql: Annotated[str, typer.Option(help="one aggregate query (COUNT and SUM by group)")],
    cells: Annotated[
        list[str] | None,
        typer.Option(
            "--cell", "--cells", help="a group value (one GROUP BY column; repeat it, or A,B,C)"
        ),
    ] = None,
    cells_file: Annotated[Path | None, typer.Option(help="JSON list of group-value lists")] = None,
    purpose: Purpose = "statistics",
    scheme: Annotated[str, typer.Option(help="bfv (exact integers) or ckks (decimals)")] = "bfv",
    epsilon: Annotated[str | None, typer.Option(help="ask for DP noise with this ε")] = None,
    totals_file: Annotated[
        Path, typer.Option("--out", help="totals CSV to write (- for stdout)")
    ] = Path("totals.csv"),
    result_file: Annotated[
        Path, typer.Option("--result", help="signed result (receipt beside it)")
    ] = Path("sum-result.json"),
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("key"),
) -> None:
    """Sum one aggregate over several zones; only the total is decrypted, here.

    Example:
      zonex secure-sum --zones d1,d2,d3 --cells north,south --key bank.key \\
        --sql "SELECT district, COUNT(*), SUM(tax_paid_2025) FROM companies GROUP BY district"
    """
    from crypto.encoding import b64url_decode
    from exchange.client import he as he_client

    names = _listed(zones)
    wanted = _cells(cells, cells_file)
    with client(url, key) as c:
        with _progress(f"secure sum over {len(names)} zones") as progress:
            outcome = he_client.secure_sum(
                c,
                zones=names,
                sql=sql,
                cells=wanted,
                purpose=purpose,
                scheme=scheme,
                epsilon=epsilon,
                progress=progress,
            )
        zone_keys = {z: b64url_decode(c.zone(z)["public_key"]) for z in names}
    he_client.verify_contributions(outcome.response, zone_keys)
    table = Table(
        "cell",
        *outcome.values,
        title="totals over " + ", ".join(names),
        caption=f"decimals rounded to {PLACES} places; the CSV keeps every digit",
    )
    with _csv_out(totals_file) as f:
        writer = csv.writer(f)
        writer.writerow(["cell", *outcome.values])
        for cell, row in zip(outcome.cells, outcome.totals, strict=True):
            label = "|".join(cell) or "(all)"
            writer.writerow([label, *row])
            table.add_row(label, *(shown(v) for v in row))
    err.print(table)
    result = outcome.response["result"]
    if result["epsilon"] != "0":
        err.print(f"with Laplace noise at ε = {result['epsilon']} (see noise in {result_file})")
    where = "standard output" if totals_file == STDOUT else totals_file
    err.print(f"totals: {where}; every zone's signed contribution verified", highlight=False)
    save_result(outcome.response, result_file, None)
