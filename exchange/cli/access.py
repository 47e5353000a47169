"""The access workflow: request, requests, approve, reject, grants, revoke, consents."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.measure import Measurement
from rich.table import Table

from exchange.cli._common import (
    KeyPath,
    Url,
    _when,
    app,
    client,
    err,
    fail,
    one_line_errors,
    out,
    print_json,
)

consent_app = typer.Typer(help="data-subject consents (zone provider)", no_args_is_help=True)
app.add_typer(consent_app, name="consent")


def print_wide(table: Table) -> None:
    """Print a table at its natural width, even past the terminal's: ids and key ids are never
    cut or folded, so they can be copied whole (a narrow terminal wraps the long lines)."""
    needed = Measurement.get(out, out.options.update(max_width=10_000), table).maximum
    width = out.width
    out.width = max(width, needed)
    try:
        out.print(table)
    finally:
        out.width = width


def _who(name: Any) -> str:
    return str(name) if name else "-"


def _terms(r: dict[str, Any]) -> str:
    """The provider's signed terms of a request awaiting the operator, in one line."""
    t = r.get("pending_terms")
    if not t:
        return "-"
    return (
        f"{', '.join(t['operations'])} on {', '.join(t['datasets'])} until {_when(t['not_after'])}Z"
    )


@app.command("request")
@one_line_errors
def request_cmd(
    zone: str,
    dataset: Annotated[list[str], typer.Option(help="dataset to use (repeat)")],
    operation: Annotated[list[str], typer.Option(help="operation, e.g. aggregate (repeat)")],
    purpose: Annotated[str, typer.Option(help="purpose from the vocabulary")],
    justification: Annotated[str, typer.Option(help="why you need it")],
    days: Annotated[float, typer.Option(help="how long the grant should last")] = 30,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """File an access request (consumer).

    Example:
      zonex request tax --dataset companies --operation aggregate --purpose credit-assessment \\
        --justification "loan review" --days 30 --key bank.key
    """
    if not math.isfinite(days):
        raise ValueError(f"--days takes a number of days, got {days}")
    # the bounds are the exchange's alone: its answer names them
    with client(url, key) as c:
        r = c.request_access(
            zone,
            dataset,
            operation,
            purpose,
            duration_seconds=round(days * 86400),
            justification=justification,
        )
    out.print(f"request {r['id']} filed ({r['status']})")


@app.command("requests")
@one_line_errors
def requests_cmd(
    zone: Annotated[str | None, typer.Option(help="only this zone")] = None,
    status: Annotated[str | None, typer.Option(help="pending, approved, rejected...")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, not a table")] = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """List the access requests you filed or that concern your zones. A request awaiting the
    operator shows the terms the provider signed (``pending terms``): the operator's
    ``zonex approve`` signs exactly those.

    Example:
      zonex requests --key bureau.key
    """
    with client(url, key) as c:
        found = c.requests(zone=zone, status=status)
    if as_json:
        out.print_json(data=found)
        return
    table = Table(
        "id",
        "zone",
        "consumer",
        "consumer key id",
        "datasets",
        "operations",
        "purpose",
        "days",
        "status",
        "pending terms",
    )
    for r in found:
        table.add_row(
            r["id"],
            r["zone"],
            _who(r.get("consumer_name")),
            r["consumer"],
            ", ".join(r["datasets"]),
            ", ".join(r["operations"]),
            r["purpose"],
            f"{r['duration_seconds'] / 86400:g}",
            r["status"],
            _terms(r),
        )
    print_wide(table)


@app.command()
@one_line_errors
def approve(
    request_id: str,
    days: Annotated[float | None, typer.Option(help="shorter than requested")] = None,
    dataset: Annotated[list[str] | None, typer.Option(help="narrow to these datasets")] = None,
    operation: Annotated[list[str] | None, typer.Option(help="narrow to these ops")] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Sign and approve an access request (provider; operator too for important data).

    REQUEST_ID may be a unique prefix (6+ characters). For important data the operator
    approves second and signs the terms the provider signed (see ``zonex requests``).

    Example:
      zonex approve REQUEST_ID --key bureau.key
    """
    from datetime import UTC, datetime, timedelta

    not_after = datetime.now(UTC) + timedelta(days=days) if days is not None else None
    with client(url, key) as c:
        r = c.approve(request_id, not_after=not_after, datasets=dataset, operations=operation)
        abroad = c.xborder_request_check(r["id"])
    for w in abroad:
        # the consumer is abroad: a release that needs a compliance approval is refused
        if w.get("decision") != "exempt" and not w.get("approved"):
            needs = " or ".join(w.get("documents") or []) or "nothing: it is refused"
            err.print(
                f"warning: {w['operation']} on {w['dataset']} to "
                f"{w.get('consumer_jurisdiction', 'abroad')} needs {needs} "
                f"({w.get('basis', 'refuse')}); no live approval: releases will be refused"
            )
    if r["grant_id"]:
        out.print(f"request {r['id']} approved: grant {r['grant_id']}")
    elif r["status"] == "awaiting_operator":
        out.print(
            f"request {r['id']} is awaiting_operator: important data, the operator approves "
            f"the same terms next (zonex approve {r['id']} --key operator.key)"
        )
    else:
        out.print(f"request {r['id']} is {r['status']}")


@app.command()
@one_line_errors
def reject(
    request_id: str,
    reason: Annotated[str, typer.Option(help="why (shown to the consumer)")],
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Reject a request (provider, operator) or withdraw your own (consumer).

    Example:
      zonex reject REQUEST_ID --reason "purpose not covered" --key bureau.key
    """
    with client(url, key) as c:
        r = c.reject(request_id, reason)
    out.print(f"request {r['id']} {r['status']}")


@app.command()
@one_line_errors
def grants(
    zone: Annotated[str | None, typer.Option(help="only this zone")] = None,
    all_: Annotated[bool, typer.Option("--all", help="include revoked grants")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, not a table")] = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """List grants you hold or that concern your zones.

    Example:
      zonex grants --key bank.key
    """
    with client(url, key) as c:
        found = c.grants(zone, include_inactive=all_)
    if as_json:
        out.print_json(data=found)
        return
    table = Table(
        "grant",
        "zone",
        "consumer",
        "consumer key id",
        "datasets",
        "operations",
        "purpose",
        "expires",
        "status",
    )
    for g in found:
        table.add_row(
            g["id"],
            g["zone"],
            _who(g.get("consumer_name")),
            g["consumer"],
            ", ".join(g["datasets"]),
            ", ".join(g["operations"]),
            g["purpose"],
            _when(g["expires_at"]),
            g["status"],
        )
    print_wide(table)


@app.command()
@one_line_errors
def revoke(
    grant_id: str,
    reason: Annotated[str, typer.Option(help="why")],
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Revoke a grant now (GRANT_ID or a unique prefix of it, 6+ characters).

    Example:
      zonex revoke GRANT_ID --reason done --key bureau.key
    """
    with client(url, key) as c:
        g = c.revoke(grant_id, reason)
    out.print(f"grant {g['id']} {g['status']}")


@app.command()
@one_line_errors
def consents(
    zone: str,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, not a table")] = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """List a zone's consents (by consent id; subjects are never shown, not even digested).

    Example:
      zonex consents tax --key bureau.key
    """
    with client(url, key) as c:
        found = c.consents(zone)
    if as_json:
        out.print_json(data=found)
        return
    table = Table("consent", "consumer", "consumer key id", "purpose", "expires", "status")
    for x in found:
        table.add_row(
            x["id"],
            _who(x.get("consumer_name")),
            x["consumer"],
            x["purpose"],
            _when(x["expires_at"]),
            x["status"],
        )
    print_wide(table)


@consent_app.command("add")
@one_line_errors
def consent_add(
    zone: str,
    subject: Annotated[str, typer.Option(help="the data subject's id (digested on arrival)")],
    consumer: Annotated[
        str, typer.Option(help="the consumer's name or key id (or a unique key id prefix)")
    ],
    purpose: Annotated[str, typer.Option(help="purpose from the vocabulary")],
    days: Annotated[float, typer.Option(help="valid for this many days")] = 365,
    node: NodeDir = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Record a data subject's consent for a consumer and purpose (zone provider).

    For a zone on your node, give --node: the subject is digested here with the node's key
    and only the digest is sent (the exchange holds no key for such a zone).

    Example:
      zonex consent add tax --subject ID --consumer "City Bank" --purpose credit-assessment \\
        --key bureau.key
    """
    from datetime import UTC, datetime, timedelta

    until = datetime.now(UTC) + timedelta(days=days)
    digests = None if node is None else _node_digests(node, zone, [subject])
    with client(url, key) as c:
        if digests is None:
            x = c.record_consent(zone, subject, consumer, purpose, until)
        else:
            x = c.record_consent(zone, None, consumer, purpose, until, subject_digest=digests[0])
    out.print(f"consent {x['id']} recorded (keep the id: it is how the consent is named)")


@consent_app.command("withdraw")
@one_line_errors
def consent_withdraw(
    consent_id: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("provider.key")
) -> None:
    """Withdraw a consent (CONSENT_ID or a unique prefix of it, 6+ characters).

    Example:
      zonex consent withdraw CONSENT_ID --key bureau.key
    """
    with client(url, key) as c:
        x = c.withdraw_consent(consent_id)
    out.print(f"consent {x['id']} {x['status']}")


NodeDir = Annotated[
    Path | None,
    typer.Option(
        "--node",
        help="the zone's node directory: digest subjects here with the node's key and send "
        "digests only (a zone hosted on its node)",
    ),
]


def _node_digests(node_dir: Path, zone: str, subject_ids: list[str]) -> list[str]:
    """The consent digests of ``subject_ids`` under the key of the node in ``node_dir``
    (created there on first use), which must host ``zone``."""
    from exchange.node.export import node_subjects
    from exchange.node.home import NodeHome
    from exchange.subjects import check_subject_id

    home = NodeHome(node_dir)
    if home.zone != zone:
        raise ValueError(f"{node_dir} is the node of zone {home.zone!r}, not of {zone!r}")
    for subject in subject_ids:
        check_subject_id(subject)
    return node_subjects(node_dir).consent_digests(subject_ids)


#: row problems a refused ``consent import`` prints before it counts the rest
_SHOWN_PROBLEMS = 20
_CONSENT_COLUMNS = ("subject", "consumer", "purpose")


def _expiry(expires: str, days: str, now: Any) -> Any:
    """A row's end: ``expires`` (an RFC 3339 date, 00:00 UTC that day, or a date-time with
    its offset), else ``days`` from now."""
    from datetime import UTC, datetime, timedelta

    if expires:
        try:
            when = datetime.fromisoformat(expires.replace("z", "Z"))
        except ValueError:
            raise ValueError(
                f"expires {expires!r} is not an RFC 3339 date (2027-06-30) or date-time "
                "(2027-06-30T18:00:00+08:00)"
            ) from None
        if len(expires) == 10:  # a date alone
            return when.replace(tzinfo=UTC)
        if when.tzinfo is None:
            raise ValueError(f"expires {expires!r} needs a time zone (Z or +08:00)")
        return when
    if days:
        try:
            n = float(days)
        except ValueError:
            raise ValueError(f"days {days!r} is not a number") from None
        if not math.isfinite(n) or n <= 0:
            raise ValueError(f"days {days!r} must be a positive number")
        try:
            return now + timedelta(days=n)
        except OverflowError:
            raise ValueError(f"days {days!r} is too large") from None
    raise ValueError("give expires (a date or date-time) or days")


def _read_consents(
    path: Path, delimiter: str, encoding: str
) -> tuple[list[dict[str, str]], list[int], list[tuple[int, str]]]:
    """The rows of a consents CSV file, each one's line number, and the problems found."""
    import csv
    import io
    from datetime import UTC, datetime

    try:
        text = path.read_text(encoding)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: byte {exc.start} is not {encoding}; give the file's --encoding "
            "(utf-8, utf-8-sig, gb18030)"
        ) from None
    except LookupError:
        raise ValueError(f"--encoding {encoding!r} is not a known encoding") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    # newline="": lines end at \n, \r or \r\n only, as the line numbers users see
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise ValueError(f"{path}: the file is empty") from None
    except csv.Error as exc:
        raise ValueError(f"{path}, line 1: {exc}") from None
    missing = [c for c in _CONSENT_COLUMNS if c not in header]
    if missing or not {"expires", "days"} & set(header):
        need = [*missing] + ([] if {"expires", "days"} & set(header) else ["expires or days"])
        raise ValueError(
            f"{path}, line 1: the header needs the columns {', '.join(need)} "
            f"(found: {', '.join(header) or 'none'}); columns: subject, consumer, purpose, "
            "expires or days"
        )
    now = datetime.now(UTC)
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    problems: list[tuple[int, str]] = []
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append((reader.line_num, str(exc)))
            break
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue  # a blank line
        if len(fields) != len(header):
            problems.append((line, f"{len(fields)} fields, the header has {len(header)}"))
            continue
        cell = {h: f.strip() for h, f in zip(header, fields, strict=True)}
        for column in _CONSENT_COLUMNS:
            if not cell[column]:
                problems.append((line, f"{column} is empty"))
        try:
            until = _expiry(cell.get("expires", ""), cell.get("days", ""), now)
        except ValueError as exc:
            problems.append((line, str(exc)))
            continue
        rows.append(
            {
                "subject": cell["subject"],
                "consumer": cell["consumer"],
                "purpose": cell["purpose"],
                "expires_at": until.isoformat(),
            }
        )
        lines.append(line)
    return rows, lines, problems


def _refuse_rows(
    path: Path, total: int, problems: list[tuple[int, str]], more: int = 0, rows: int = 0
) -> None:
    """Print the rows that are wrong (the first few, then a count) and exit non-zero."""
    rows = rows or len({line for line, _ in problems})
    for line, message in problems[:_SHOWN_PROBLEMS]:
        err.print(f"  {path}, line {line}: {message}", highlight=False, markup=False)
    rest = len(problems) - min(len(problems), _SHOWN_PROBLEMS) + more
    if rest:
        err.print(f"  ... and {rest} more", highlight=False, markup=False)
    fail(
        f"{path}: {rows or 'some'} of {total} rows are invalid (listed above); nothing was "
        "recorded: fix them and import the file again",
    )


@consent_app.command("import")
@one_line_errors
def consent_import(
    zone: str,
    file: Annotated[Path, typer.Argument(help="CSV: subject, consumer, purpose, expires or days")],
    delimiter: Annotated[
        str, typer.Option(help="field separator, one character (\\t for tab)")
    ] = ",",
    encoding: Annotated[str, typer.Option(help="utf-8, utf-8-sig, gb18030, ...")] = "utf-8",
    as_json: Annotated[bool, typer.Option("--json", help="print the exchange's JSON")] = False,
    node: NodeDir = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Record many consents from a CSV file in one call, all or nothing (zone provider).

    For a zone on your node, give --node: subjects are digested here with the node's key and
    only the digests are sent.

    Header columns, any order: subject, consumer, purpose, and expires or days.

    consumer: a name, key id or unique key id prefix. expires: 2027-06-30 (00:00 UTC) or
    2027-06-30T18:00:00+08:00.

    If any row is wrong, the wrong rows are listed by line and nothing is recorded.

    Prints line,consent for each row, in row order.

    Example:
      zonex consent import tax consents.csv --key provider.key
    """
    sep = "\t" if delimiter in ("\\t", "tab") else delimiter
    if len(sep) != 1:
        raise ValueError(f"--delimiter takes one character (\\t for tab), got {delimiter!r}")
    rows, lines, problems = _read_consents(file, sep, encoding)
    if problems:
        _refuse_rows(file, len(rows) + len({line for line, _ in problems}), problems)
    if not rows:
        raise ValueError(f"{file}: no consents to record (the file has a header only)")
    if node is not None:
        from exchange.errors import InvalidInputError
        from exchange.subjects import check_subject_id

        for row, line in zip(rows, lines, strict=True):
            try:
                check_subject_id(row["subject"])
            except InvalidInputError as exc:
                problems.append((line, f"subject: {exc.detail}"))
        if problems:
            _refuse_rows(file, len(rows), problems)
        digests = _node_digests(node, zone, [row.pop("subject") for row in rows])
        for row, digest in zip(rows, digests, strict=True):
            row["subject_digest"] = digest
    from exchange.client.sdk import ApiError

    try:
        with client(url, key) as c:
            result = c.import_consents(zone, rows)
    except ApiError as exc:
        named = [e for e in exc.errors if isinstance(e.get("loc"), list) and len(e["loc"]) >= 2]
        if exc.status != 422 or not named:
            raise
        found: list[tuple[int, str]] = []
        for e in named:
            loc = [p for p in e["loc"] if p != "body"]
            index = int(loc[1]) if len(loc) > 1 and str(loc[1]).isdigit() else -1
            if not 0 <= index < len(lines):
                raise
            column = f"{loc[2]}: " if len(loc) > 2 else ""
            found.append((lines[index], f"{column}{e.get('msg', 'invalid')}"))
        body = exc.body if isinstance(exc.body, dict) else {}
        shown_count = body.get("problems")
        more = shown_count - len(found) if isinstance(shown_count, int) else 0
        invalid = body.get("invalid_rows")
        _refuse_rows(file, len(rows), found, more, invalid if isinstance(invalid, int) else 0)
        return
    if as_json:
        print_json(result)
        return
    out.print("line,consent", highlight=False)
    for line, consent_id in zip(lines, result["ids"], strict=True):
        out.print(f"{line},{consent_id}", highlight=False)
    err.print(
        f"{result['recorded']} consents recorded in zone {result['zone']} (one ledger entry "
        "each); the ids above are how they are named",
        highlight=False,
    )
