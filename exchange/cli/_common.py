"""What every ``zonex`` command shares: the consoles, the one-line error wrapper, the common
options and the signed client. The CLI is the only place that prints or exits.

Fast start: a client command imports nothing of the server stack (FastAPI, SQLAlchemy, DuckDB,
TenSEAL, OpenDP, Casbin ...). Heavy modules are imported inside the commands that need them,
and the SDK itself only when a command talks to the exchange (tests/exchange/test_cli_start.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from crypto.errors import CryptoError
from exchange.errors import ZonexError

if TYPE_CHECKING:
    from exchange.client.sdk import Client

#: where the root callback leaves ``--profile`` for :func:`client`
_PROFILE = "zonex.profile"
#: the profile a command's URL came from, for its error lines
_URL_FROM = "zonex.url_from"


class _RootGroup(TyperGroup):
    """``--profile NAME`` is taken anywhere on the line (``zonex catalog --profile city``, like
    ``zonex --profile city catalog``): it is moved before the command, where the root parses it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _hoist_profile(args))


def _hoist_profile(args: list[str]) -> list[str]:
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg == "--profile" and i + 1 < len(args):
            front += args[i : i + 2]
            i += 2
            continue
        if arg.startswith("--profile="):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


app = typer.Typer(
    help="zonex: privacy-preserving data exchange", no_args_is_help=True, cls=_RootGroup
)

#: results, JSON and tables a command is asked for
out = Console(soft_wrap=True)
#: progress, notes and errors: never mixed into what a pipe reads
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

DataDir = Annotated[Path, typer.Option("--data-dir", "-d", help="exchange data directory")]
Url = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="ZONEX_URL",
        help="exchange base URL; if not given: ZONEX_URL, else the profile's (zonex profile)",
    ),
]
KeyPath = Annotated[
    Path,
    typer.Option(
        "--key",
        envvar="ZONEX_KEY",
        help="your private key file; if not given: ZONEX_KEY, else the profile's (zonex profile)",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="print the exchange's JSON, not a table")]
#: the zone a command acts on, given first as in every such command (``zonex export tax …``,
#: ``zonex psi aggregate tax …``); a zone that only filters a listing is ``--zone``
ZoneArg = Annotated[
    str | None, typer.Argument(metavar="ZONE", help="the provider's zone", show_default=False)
]
#: the older spelling ``--zone ZONE``, still taken (hidden)
ZoneFlag = Annotated[str | None, typer.Option("--zone", hidden=True, show_default=False)]


def one_zone(given: str | None, flag: str | None, command: str, *, required: bool = True) -> str:
    """The zone named first (``zonex COMMAND ZONE``) or by the older ``--zone``; not both."""
    if given is not None and flag is not None and given != flag:
        raise ValueError(f"two zones named ({given!r} and --zone {flag!r}): give it once, first")
    zone = given if given is not None else flag
    if zone is None and required:
        raise ValueError(f"name the zone first: zonex {command} ZONE ...")
    return zone or ""


#: ``--out -``: write to standard output
STDOUT = Path("-")

#: decimal places of noised or decrypted numbers in tables (JSON keeps every digit)
PLACES = 2


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"zonex {version('zonex')}")
        except PackageNotFoundError:  # running from a source tree that is not installed
            typer.echo("zonex (not installed)")
        raise typer.Exit()


@app.callback()
def _options(
    ctx: typer.Context,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            envvar="ZONEX_PROFILE",
            help="use this profile's url and key (zonex profile list); --url/--key and "
            "ZONEX_URL/ZONEX_KEY still win",
        ),
    ] = None,
) -> None:
    """zonex: privacy-preserving data exchange."""
    ctx.meta[_PROFILE] = profile


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def one_line_errors(func: F) -> F:
    """Every expected failure becomes one readable line and a non-zero exit; no tracebacks."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise  # typer's own exits and usage errors
        except Exception as exc:
            message = explain(exc)
            if message is None:
                raise
            fail(_escape(message))

    return wrapper  # type: ignore[return-value]


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def explain(exc: BaseException) -> str | None:
    """The one line a user reads for an expected failure (``None``: a bug, let it show)."""
    # the SDK and httpx are only imported by commands that call the exchange: an error of
    # theirs cannot happen before they are
    sdk = sys.modules.get("exchange.client.sdk")
    if sdk is not None and isinstance(exc, sdk.ApiError):
        return explain_problem(exc.status, exc.code, exc.detail, exc.body)
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.HTTPError):
        return _explain_transport(exc)
    if isinstance(exc, ZonexError):
        return exc.detail
    if isinstance(exc, CryptoError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    if isinstance(exc, ValueError):
        return str(exc)
    return None


def _explain_transport(exc: Any) -> str:
    try:
        url = exc.request.url
        where = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"
    except (AttributeError, RuntimeError):  # no request attached
        where = "the exchange"
    reason = str(exc) or type(exc).__name__
    ctx = _current_context()
    source = None if ctx is None else ctx.meta.get(_URL_FROM)
    if source is not None:
        where += f" (the url of profile {source!r})"
    return (
        f"cannot reach the exchange at {where} ({reason}); check that it is running there, "
        "or give its address with --url or ZONEX_URL"
        + ("" if source is None else f", or fix the profile: zonex profile add {source} --replace")
    )


#: what a consumer does next after a denial, where the CLI can say it better than a code
_DENIAL_STEPS = {
    "not_granted": "request access",
    "expired": "the grant has expired; request access again",
    "purpose_mismatch": "no grant covers this purpose; request access for it",
}


def explain_problem(status: int, code: str, detail: str, body: Any) -> str:
    """One line for an RFC 9457 problem: its status, code and detail, the fields a validation
    error names, a denial's reason and context and the next step."""
    problem: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    fields = _field_errors(problem.get("errors"))
    if fields:
        return f"{status} {code}: {'; '.join(fields)}"
    line = f"{status} {code}: {detail}"
    reason = problem.get("reason")
    if isinstance(reason, str) and reason and reason not in detail:
        line += f" (reason: {reason})"
    context = [
        f"{name} {problem[name]}"
        for name in ("zone", "dataset", "operation", "purpose")
        if isinstance(problem.get(name), str | int) and str(problem[name]) not in detail
    ]
    if context:
        line += f"; {', '.join(context)}"
    step = problem.get("next")
    if not isinstance(step, str) and isinstance(reason, str) and reason in _DENIAL_STEPS:
        step = f"{_DENIAL_STEPS[reason]}: {_request_command(problem)}"
    if not isinstance(step, str) and status == 401 and reason == "suspended":
        step = (
            "the operator suspended this key; ask them to reinstate it (zonex principal reinstate)"
        )
    if not isinstance(step, str) and status == 401:
        step = (
            "check that --key (or ZONEX_KEY) is a key this exchange's operator registered and "
            "--url (or ZONEX_URL) the exchange that registered it; zonex key id KEY shows its "
            "key id"
        )
    if isinstance(step, str) and step:
        line += f"; next: {step}"
    if code == "invalid_input" and "unknown purpose" in detail and "vocabulary" not in detail:
        line += f"; valid purposes: {', '.join(valid_purposes())}"
    return line


def _request_command(problem: Mapping[str, Any]) -> str:
    def part(name: str, placeholder: str) -> str:
        value = problem.get(name)
        return str(value) if isinstance(value, str) and value else placeholder

    return (
        f"zonex request {part('zone', 'ZONE')} --dataset {part('dataset', 'DATASET')} "
        f"--operation {part('operation', 'OPERATION')} --purpose {part('purpose', 'PURPOSE')} "
        "--justification TEXT"
    )


def _field_errors(errors: Any) -> list[str]:
    """``field X: msg`` for each entry of a validation problem's ``errors`` list."""
    if not isinstance(errors, list):
        return []
    found = []
    for e in errors:
        if not isinstance(e, Mapping):
            continue
        loc = [str(p) for p in e.get("loc", []) if str(p) != "body"] if e.get("loc") else []
        msg = str(e.get("msg", "invalid"))
        found.append(f"field {'.'.join(loc)}: {msg}" if loc else msg)
    return found


def valid_purposes() -> list[str]:
    """The purpose vocabulary's names (loaded only when an error needs them)."""
    from policy.purposes import PurposeVocabulary

    return [p.name for p in PurposeVocabulary.load_default()]


def client(url: str | None, key: Path) -> Client:
    """The signed client for this command's exchange and key, resolved as: ``--url``/``--key``
    > ``ZONEX_URL``/``ZONEX_KEY`` > ``--profile``/``ZONEX_PROFILE`` > the current profile > the
    command's defaults."""
    from exchange.client.sdk import Client
    from exchange.keyfile import load_private_key

    url, key = resolve_endpoint(url, key)
    _refuse_public_key(key)
    return Client(url, load_private_key(key))


def resolve_endpoint(url: str | None, key: Path) -> tuple[str, Path]:
    """Fill in what the command line and the environment left at its default from the
    selected profile (see :func:`client`)."""
    ctx = _current_context()
    if ctx is not None:
        need_url = not _given(ctx, "url")
        need_key = not _given(ctx, "key")
        if need_url or need_key:
            from exchange.cli._config import selected_profile

            profile = selected_profile(ctx.meta.get(_PROFILE))
            if profile is not None:
                if need_url:
                    url = profile.url
                    ctx.meta[_URL_FROM] = profile.name
                key = profile.key if need_key else key
    if url is None:
        raise ValueError(
            "no exchange to talk to: give --url URL, set ZONEX_URL, or add a profile "
            "(zonex profile add NAME --url URL --key KEY)"
        )
    return url, key


def _current_context() -> Any:
    """The running command's context (typer carries its own copy of click)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # a typer that runs on click itself
        from click import get_current_context  # type: ignore[no-redef]
    return get_current_context(silent=True)


def _given(ctx: Any, name: str) -> bool:
    """Whether the option ``name`` came from the command line or its environment variable."""
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def profile_url() -> str | None:
    """The selected profile's URL, if a profile is selected (for commands whose URL is
    optional)."""
    from exchange.cli._config import selected_profile

    ctx = _current_context()
    profile = selected_profile(None if ctx is None else ctx.meta.get(_PROFILE))
    return None if profile is None else profile.url


def _refuse_public_key(key: Path) -> None:
    try:
        with key.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return  # the key loader names the problem
    if b"PUBLIC KEY-----" in head and b"PRIVATE KEY-----" not in head:
        raise ValueError(
            f"--key {key}: that is a public key; pass the private key file "
            "(the .key that zonex key new wrote next to the .pub)"
        )


def _when(value: Any) -> str:
    return "-" if not value else str(value).replace("T", " ")[:19]


def shown(value: Any, places: int = PLACES) -> str:
    """A table cell: numbers with a fractional part rounded to ``places`` decimals (noised and
    decrypted values carry 17-28 meaningless digits); the JSON keeps the full value."""
    if value is None:
        return "-"
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, float | Decimal | str):
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            return str(value)
        if not number.is_finite():
            return str(value)
        exponent = number.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -places:
            return f"{number:.{places}f}"
    return str(value)


def is_stdout(path: Path | None) -> bool:
    """``--out`` not given, or given as ``-``: the result goes to standard output."""
    return path is None or path == STDOUT


def print_json(data: Any) -> None:
    """Machine-readable JSON on standard output, nothing else on that line."""
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")
    sys.stdout.flush()


def save_result(
    response: Mapping[str, Any], out_file: Path | None, receipt_file: Path | None
) -> None:
    """Write a computation's result and its receipt.

    To a file: the result, and the receipt beside it (``OUT.receipt``) or at ``--receipt``.
    To standard output (no ``--out``, or ``--out -``): the whole response, ``{"result": ...,
    "receipt": ...}``, so the receipt is never dropped; ``--receipt`` also writes it to a file.
    Notes go to standard error."""
    if is_stdout(out_file):
        print_json({"result": response["result"], "receipt": response["receipt"]})
        if receipt_file is not None and receipt_file != STDOUT:
            receipt_file.write_text(json.dumps(response["receipt"], indent=2) + "\n", "utf-8")
            err.print(
                f'receipt: {receipt_file} (also in the output\'s "receipt")',
                highlight=False,
                soft_wrap=True,
            )
        else:
            err.print(
                'the signed receipt is in the output\'s "receipt" field; saved to a file, '
                "check it with: zonex receipt verify FILE --result FILE --log-key LOG.pub",
                highlight=False,
            )
        return
    assert out_file is not None
    text = json.dumps(response["result"], ensure_ascii=False, indent=2)
    out_file.write_text(text + "\n", "utf-8")
    receipt_file = receipt_file or out_file.with_name(out_file.name + ".receipt")
    receipt_file.write_text(json.dumps(response["receipt"], indent=2) + "\n", "utf-8")
    err.print(
        f"receipt: {receipt_file} (check: zonex receipt verify {receipt_file} "
        f"--result {out_file} --log-key LOG.pub)",
        highlight=False,
        soft_wrap=True,
    )


def offline_exchange(data_dir: Path) -> Any:
    """The exchange of a data directory, opened in this process (not started: no server)."""
    from exchange.server.runtime import Exchange
    from exchange.settings import Settings

    return Exchange(Settings.from_data_dir(data_dir))


def verifier_key_text(value: str, option: str) -> str:
    """A verifier key (``NAME+KEYID+BASE64``) given as itself or as the file holding it; a
    readable ``ValueError`` naming ``option`` otherwise."""
    path = Path(value)
    if "+" not in value or path.is_file():
        try:
            return path.read_text("utf-8").strip()
        except FileNotFoundError:
            raise ValueError(
                f"{option} {value}: no such file, and not a verifier key (NAME+KEYID+BASE64)"
            ) from None
        except UnicodeDecodeError:
            raise ValueError(f"{option} {value}: not a text file holding a verifier key") from None
    return value.strip()
