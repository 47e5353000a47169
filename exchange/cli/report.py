"""``zonex report``: monthly and quarterly reports (月报季评) computed from a verified bundle.

``zonex report --bundle B --log-key K --month 2026-11 --out DIR`` (or ``--quarter 2026Q4``)
verifies the bundle, then writes ``report.json`` (the canonical measures), ``report.csv``,
``report.html`` and ``report.pdf`` to DIR; ``zonex report publish DIR`` records it on the
ledger; ``zonex report verify DIR --bundle B --log-key K`` recomputes it. Building and
verifying are offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from exchange.cli._common import (
    KeyPath,
    app,
    client,
    err,
    fail,
    one_line_errors,
    out,
    verifier_key_text,
)

if TYPE_CHECKING:
    from exchange.audit.report import Period, Report

report_app = typer.Typer(
    help="monthly and quarterly reports (月报季评): build from a verified bundle "
    "(zonex report --bundle B --log-key K --month YYYY-MM --out DIR), publish, verify",
    invoke_without_command=True,
)
app.add_typer(report_app, name="report")

#: what ``zonex report publish`` wrote: the ledger's record of the report
PUBLISHED_JSON = "published.json"

BundleOpt = Annotated[
    Path | None, typer.Option("--bundle", help="the ledger bundle (zonex ledger export)")
]
LogKeyOpt = Annotated[
    str | None,
    typer.Option("--log-key", help="the log's verifier key, or its log.pub file"),
]
TrustedOpt = Annotated[
    Path | None, typer.Option("--trusted", help="a checkpoint saved earlier (rollback/fork check)")
]
JobsOpt = Annotated[
    int | None,
    typer.Option(
        "--jobs", min=1, help="processes for a large bundle (default: every core; 1: this one)"
    ),
]


def _period(month: str | None, quarter: str | None) -> Period:
    from exchange.audit.report import parse_period

    if (month is None) == (quarter is None):
        raise ValueError("give the period: --month YYYY-MM or --quarter YYYYQn (one of them)")
    return parse_period(month if month is not None else str(quarter))


def _compute(
    bundle: Path,
    log_key: str,
    period: Period,
    *,
    size: int | None = None,
    trusted: Path | None = None,
    jobs: int | None = None,
) -> Report:
    """The report over a bundle that verifies; one line naming the first fault otherwise."""
    from crypto.note import NoteVerifier
    from exchange.audit import AuditError
    from exchange.audit.report import report_from_bundle

    verifier = NoteVerifier.from_verifier_key(verifier_key_text(log_key, "--log-key"))
    trusted_note = trusted.read_text("utf-8") if trusted is not None else None
    if not bundle.is_file():
        raise ValueError(f"--bundle {bundle}: no such file")
    try:
        return report_from_bundle(
            bundle, verifier, period, size=size, trusted=trusted_note, jobs=jobs
        )
    except AuditError as exc:
        f = exc.fault
        raise ValueError(
            f"{bundle}:{f.line}: {f.kind}: {f.message} (the bundle does not verify; no report)"
        ) from None


@report_app.callback()
@one_line_errors
def report_build(
    ctx: typer.Context,
    bundle: BundleOpt = None,
    log_key: LogKeyOpt = None,
    month: Annotated[
        str | None, typer.Option("--month", help="a month, YYYY-MM (e.g. 2026-11)")
    ] = None,
    quarter: Annotated[
        str | None, typer.Option("--quarter", help="a quarter, YYYYQn (e.g. 2026Q4)")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="the directory to write the report to")
    ] = None,
    trusted: TrustedOpt = None,
    jobs: JobsOpt = None,
) -> None:
    """Build a report: verify the bundle (refused with its first fault if it does not
    verify), then write report.json (canonical measures), report.csv, report.html (charts
    inline, nothing loaded from elsewhere) and report.pdf to --out.

    Examples:
      zonex report --bundle ledger.jsonl --log-key log.pub --month 2026-11 --out reports/2026-11
      zonex report --bundle ledger.jsonl --log-key log.pub --quarter 2026Q4 --out reports/2026Q4
    """
    if ctx.invoked_subcommand is not None:
        return
    given = (bundle, log_key, month, quarter, out_dir)
    if all(v is None for v in given):
        out.print(ctx.get_help(), markup=False, highlight=False)
        raise typer.Exit(0)
    period = _period(month, quarter)
    if bundle is None or log_key is None or out_dir is None:
        raise ValueError("give --bundle BUNDLE, --log-key log.pub and --out DIR")
    report = _compute(bundle, log_key, period, trusted=trusted, jobs=jobs)

    from exchange.audit.report_render import write_report

    written = write_report(report, out_dir)
    out.print(
        f"report {period.label}: {len(report.rows)} measures over {report.entries} entries "
        f"({report.entries_in_period} in the period) written to {out_dir}: {', '.join(written)}; "
        f"digest {report.digest()}",
        markup=False,
        highlight=False,
    )


def _load(directory: Path) -> tuple[bytes, dict[str, Any]]:
    """report.json's bytes and document, refused unless it is canonical JSON."""
    from crypto.canonical import canonicalize
    from exchange.audit.report_render import REPORT_JSON

    path = directory / REPORT_JSON
    if not path.is_file():
        raise ValueError(f"{path}: no such file (build the report first: zonex report --out DIR)")
    data = path.read_bytes()
    try:
        doc = json.loads(data)
        canonical = canonicalize(doc) == data
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a JSON report") from None
    if not isinstance(doc, dict) or not canonical:
        raise ValueError(f"{path}: not a report's canonical JSON (RFC 8785): it was changed")
    for name, kind in (("period", str), ("bundle_size", int), ("bundle_root", str)):
        if not isinstance(doc.get(name), kind):
            raise ValueError(f"{path}: no {name}")
    return data, doc


@report_app.command("publish")
@one_line_errors
def report_publish(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="the report's directory")],
    url: Annotated[
        str | None,
        typer.Option(
            "--exchange",
            "--url",
            envvar="ZONEX_URL",
            help="the exchange's base URL; if not given: ZONEX_URL, else the profile's",
        ),
    ] = None,
    key: KeyPath = Path("auditor.key"),
) -> None:
    """Publish a report: record on the exchange's ledger (report.published) its period, the
    entries it was computed over (their root is checked against the ledger) and the SHA-256
    of its report.json. The operator and auditors only. Writes DIR/published.json.

    Example:
      zonex report publish reports/2026-11 --exchange https://exchange.example --key auditor.key
    """
    from hashlib import sha256

    data, doc = _load(directory)
    with client(url, key) as c:
        done = c.publish_report(
            doc["period"], doc["bundle_size"], doc["bundle_root"], sha256(data).hexdigest()
        )
    (directory / PUBLISHED_JSON).write_text(json.dumps(done, indent=2) + "\n", "utf-8")
    out.print(
        f"published {done['id']} ({done['period']}) as ledger entry {done['seq']}; "
        f"digest {done['digest']}",
        markup=False,
        highlight=False,
    )


@report_app.command("verify")
@one_line_errors
def report_verify(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="the report's directory")],
    bundle: Annotated[
        Path,
        typer.Option("--bundle", help="a ledger bundle holding the report's entries (or more)"),
    ],
    log_key: Annotated[
        str, typer.Option("--log-key", help="the log's verifier key, or its log.pub file")
    ],
    trusted: TrustedOpt = None,
    jobs: JobsOpt = None,
) -> None:
    """Recompute a report from a bundle and compare: report.json and report.csv must equal
    the measures recomputed from the bundle's first bundle_size entries, and every
    report.published entry for this period and size in the bundle must record their digest.
    Exit non-zero naming the first difference.

    Example:
      zonex report verify reports/2026-11 --bundle ledger.jsonl --log-key log.pub
    """
    from hashlib import sha256

    from exchange.audit.report import first_difference, parse_period
    from exchange.audit.report_render import REPORT_CSV, REPORT_JSON

    data, doc = _load(directory)
    period = parse_period(doc["period"])
    report = _compute(bundle, log_key, period, size=doc["bundle_size"], trusted=trusted, jobs=jobs)
    if data != report.canonical():
        difference = first_difference(doc, report.to_json()) or "the bytes differ"
        fail(_plain(f"{directory / REPORT_JSON}: differs from the recomputed report: {difference}"))
    digest = sha256(data).hexdigest()
    csv_path = directory / REPORT_CSV
    if csv_path.is_file():
        given = csv_path.read_text("utf-8").splitlines()
        wanted = report.to_csv().splitlines()
        for number, (a, b) in enumerate(zip(given, wanted, strict=False), start=1):
            if a != b:
                fail(_plain(f"{csv_path}:{number}: {a!r} in the file, {b!r} recomputed"))
        if len(given) != len(wanted):
            fail(_plain(f"{csv_path}: {len(given)} lines in the file, {len(wanted)} recomputed"))
    else:
        err.print(f"note: no {csv_path}; report.json checked alone", highlight=False)
    recorded = []
    for entry in _published(bundle, period.label, report.entries):
        if entry["digests"].get("bundle_root") != report.bundle_root:
            fail(
                _plain(
                    f"{bundle}: entry {entry['seq']} (report.published "
                    f"{entry['refs'].get('report')}) records another bundle root for this report"
                )
            )
        if entry["digests"].get("report") != digest:
            fail(
                _plain(
                    f"{bundle}: entry {entry['seq']} (report.published "
                    f"{entry['refs'].get('report')}) records digest "
                    f"{entry['digests'].get('report')}, the recomputed report's is {digest}"
                )
            )
        recorded.append(f"entry {entry['seq']} ({entry['refs'].get('report')})")
    where = (
        f"; published on the ledger as {', '.join(recorded)}"
        if recorded
        else "; no report.published entry for it in this bundle"
    )
    out.print(
        f"OK: {REPORT_JSON}"
        + (f" and {REPORT_CSV}" if csv_path.is_file() else "")
        + f" match the report recomputed from the first {report.entries} entries of {bundle}; "
        f"digest {digest}{where}",
        markup=False,
        highlight=False,
    )


def _published(bundle: Path, period: str, size: int) -> list[dict[str, Any]]:
    """The bundle's ``report.published`` entries for ``period`` over ``size`` entries."""
    found = []
    with bundle.open("rb") as f:
        for line in f:
            if b'"report.published"' not in line:
                continue
            entry = json.loads(line)
            attrs = entry.get("attrs", {}) if isinstance(entry, dict) else {}
            if (
                entry.get("kind") == "report.published"
                and attrs.get("period") == period
                and attrs.get("bundle_size") == size
            ):
                found.append(entry)
    return found


def _plain(text: str) -> str:
    from rich.markup import escape

    return escape(text)
