"""The access workflow: request, requests, approve, reject, grants, revoke, consents."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.measure import Measurement
from rich.table import Table

from exchange.cli._common import KeyPath, Url, _when, app, client, one_line_errors, out

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
    """File an access request (consumer)."""
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
    ``zonex approve`` signs exactly those."""
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
    approves second and signs the terms the provider signed (see ``zonex requests``)."""
    from datetime import UTC, datetime, timedelta

    not_after = datetime.now(UTC) + timedelta(days=days) if days is not None else None
    with client(url, key) as c:
        r = c.approve(request_id, not_after=not_after, datasets=dataset, operations=operation)
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
    """Reject a request (provider, operator) or withdraw your own (consumer)."""
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
    """List grants you hold or that concern your zones."""
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
    """Revoke a grant now (GRANT_ID or a unique prefix of it, 6+ characters)."""
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
    """List a zone's consents (by consent id; subjects are never shown, not even digested)."""
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
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Record a data subject's consent for a consumer and purpose (zone provider)."""
    from datetime import UTC, datetime, timedelta

    until = datetime.now(UTC) + timedelta(days=days)
    with client(url, key) as c:
        x = c.record_consent(zone, subject, consumer, purpose, until)
    out.print(f"consent {x['id']} recorded (keep the id: it is how the consent is named)")


@consent_app.command("withdraw")
@one_line_errors
def consent_withdraw(
    consent_id: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("provider.key")
) -> None:
    """Withdraw a consent (CONSENT_ID or a unique prefix of it, 6+ characters)."""
    with client(url, key) as c:
        x = c.withdraw_consent(consent_id)
    out.print(f"consent {x['id']} {x['status']}")
