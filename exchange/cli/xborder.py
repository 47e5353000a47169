"""``zonex xborder``: cross-border data flows (docs/cross-border.md).

``check`` evaluates one case offline with :func:`policy.xborder.decide`, the function the
exchange runs at release time; ``approve`` records a provider's compliance approval (operator);
``counts``, ``approvals`` and ``negative-list`` read and set the exchange's state.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from exchange.cli._common import Json, KeyPath, Url, app, client, one_line_errors, out, print_json

xborder_app = typer.Typer(help="cross-border data flows (数据跨境流动)", no_args_is_help=True)
app.add_typer(xborder_app, name="xborder")


def _when(value: str, what: str) -> datetime:
    """``YYYY-MM-DD`` (00:00 UTC that day) or an RFC 3339 time with an offset."""
    try:
        if len(value) == 10:
            return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{what} {value!r}: give YYYY-MM-DD or an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"{what} {value!r}: give a time zone (Z or +08:00)")
    return moment


@xborder_app.command("check")
@one_line_errors
def check(
    operation: Annotated[str, typer.Option(help="export, psi_members, aggregate, ...")],
    pi: Annotated[str, typer.Option(help="personal | sensitive | none")],
    level: Annotated[str, typer.Option(help="L1 L2 L3 L4 IMPORTANT CORE")],
    count: Annotated[
        int, typer.Option(help="distinct subjects sent abroad this year, this release included")
    ],
    consumer_jurisdiction: Annotated[str, typer.Option(help="ISO 3166-1 alpha-2 (US, HK ...)")],
    zone_jurisdiction: Annotated[str, typer.Option(help="ISO 3166-1 alpha-2")] = "CN",
    new: Annotated[int, typer.Option(help="how many of COUNT this release adds")] = 0,
    ciio: Annotated[bool, typer.Option("--ciio", help="the provider is a CIIO")] = False,
    dp: Annotated[bool, typer.Option("--dp", help="the output is differentially private")] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="an exchange's data directory: its thresholds in force"),
    ] = None,
    as_json: Json = False,
) -> None:
    """Decide one flow abroad with the rules the exchange applies (no server needed): the
    decision (exempt, contract, assessment, refuse), its basis and provision, the threshold
    and warnings at 80% of a threshold. The 2024 CAC thresholds apply, or with --data-dir
    the thresholds that exchange's settings set.

    Example:
      zonex xborder check --operation export --pi personal --level L2 --count 120000 \\
        --consumer-jurisdiction US
    """
    from policy.xborder import Thresholds, XborderCase, decide

    thresholds = Thresholds()
    if data_dir is not None:
        from exchange.settings import Settings

        if not (data_dir / "config.json").is_file():
            raise ValueError(f"--data-dir {data_dir}: no exchange here (zonex init --data-dir)")
        thresholds = Settings.from_data_dir(data_dir).xborder_thresholds()
    if not 0 <= new <= count:
        raise ValueError("--new is between 0 and --count")
    case = XborderCase(
        operation=operation,
        pi=pi,
        level=level,
        consumer_jurisdiction=consumer_jurisdiction,
        zone_jurisdiction=zone_jurisdiction,
        dp=dp,
        provider_ciio=ciio,
        count_before=count - new,
        count_after=count,
        thresholds=thresholds,
    )
    decision = decide(case)
    if as_json:
        print_json(decision.to_dict())
        return
    out.print(f"decision: {decision.decision.value}")
    out.print(f"basis: {decision.basis.value} ({decision.provision})")
    if decision.threshold is not None:
        out.print(f"count: {decision.count_after} (threshold {decision.threshold})")
    for warning in decision.warnings:
        out.print(f"warning: {warning}")


@xborder_app.command("approve")
@one_line_errors
def approve(
    provider: Annotated[str, typer.Option(help="the provider: name, key id or a prefix (6+)")],
    document: Annotated[str, typer.Option(help="contract | certification | assessment")],
    file: Annotated[Path, typer.Option(help="the document (its SHA-256 is recorded)")],
    valid_until: Annotated[str, typer.Option(help="YYYY-MM-DD or an RFC 3339 time")],
    valid_from: Annotated[str | None, typer.Option(help="default: now")] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("operator.key"),
) -> None:
    """Record a provider's compliance approval (operator): a standard contract filing, a
    certification or a passed security assessment (valid three years at most). Releases
    abroad needing it are allowed while it is live.

    Example:
      zonex xborder approve --provider "Tax Bureau" --document contract --file scc.pdf \\
        --valid-until 2027-12-31 --key D/operator.key
    """
    from exchange.cli.principals import _principal_key_id
    from policy.xborder import check_approval_period

    end = _when(valid_until, "--valid-until")
    start = _when(valid_from, "--valid-from") if valid_from else datetime.now(UTC)
    start = start.replace(microsecond=0)
    check_approval_period(document, start, end)  # a clear line before anything is sent
    body = file.read_bytes()
    with client(url, key) as c:
        key_id = (
            provider if len(provider) == 64 else _principal_key_id(c.list_principals(), provider)
        )
        a = c.record_xborder_approval(key_id, document, body, valid_from=start, valid_until=end)
    out.print(
        f"approval {a['id']}: {a['document']} for {a['provider'][:16]}… "
        f"valid {a['valid_from']} to {a['valid_until']} (ledger entry {a['seq']})"
    )


@xborder_app.command("approvals")
@one_line_errors
def approvals(
    provider: Annotated[str | None, typer.Option(help="only this provider's (key id)")] = None,
    as_json: Json = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("operator.key"),
) -> None:
    """List recorded compliance approvals (the operator and auditors: all; a provider: its
    own).

    Example:
      zonex xborder approvals --key D/operator.key
    """
    with client(url, key) as c:
        rows = c.xborder_approvals(provider)
    if as_json:
        print_json(rows)
        return
    table = Table("id", "provider", "document", "valid from", "valid until", "live")
    for a in rows:
        table.add_row(
            a["id"],
            a["provider"][:16],
            a["document"],
            a["valid_from"],
            a["valid_until"],
            "yes" if a["live"] else "no",
        )
    out.print(table)


@xborder_app.command("counts")
@one_line_errors
def counts(
    provider: Annotated[str, typer.Option(help="the provider's key id")],
    year: Annotated[
        int | None, typer.Option(help="default: this year (China Standard Time)")
    ] = None,
    as_json: Json = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("operator.key"),
) -> None:
    """A provider's distinct data subjects sent abroad this year, against the thresholds.

    Example:
      zonex xborder counts --provider KEY_ID --key D/operator.key
    """
    with client(url, key) as c:
        found: dict[str, Any] = c.xborder_counts(provider, year)
    if as_json:
        print_json(found)
        return
    t = found["thresholds"]
    out.print(
        f"{found['year']}: personal {found['personal']} (contract from "
        f"{t['personal_contract']}, assessment from {t['personal_assessment']}), "
        f"sensitive {found['sensitive']} (assessment from {t['sensitive_assessment']})"
    )


@xborder_app.command("negative-list")
@one_line_errors
def negative_list(
    zone: str,
    entry: Annotated[
        list[str] | None,
        typer.Option(help="OPERATION:CATEGORY refused abroad (category: a level, a PI class, *)"),
    ] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("operator.key"),
) -> None:
    """Set a zone's negative list (the operator or the zone's provider); no --entry clears it.

    Example:
      zonex xborder negative-list health --entry export:sensitive --entry "*:L4" --key D/op.key
    """
    pairs = []
    for e in entry or []:
        op, sep, cat = e.partition(":")
        if not sep or not op or not cat:
            raise ValueError(f"--entry takes OPERATION:CATEGORY, got {e!r}")
        pairs.append([op, cat])
    with client(url, key) as c:
        done = c.set_xborder_negative_list(zone, pairs)
    listed = ", ".join(f"{op}:{cat}" for op, cat in done["entries"]) or "(empty)"
    out.print(f"zone {zone} negative list: {listed}")
