"""What every ``zonex`` command shares: the consoles, the one-line error wrapper, the common
options and the signed client. The CLI is the only place that prints or exits."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer
from rich.console import Console

from crypto.errors import CryptoError
from exchange.errors import ZonexError
from exchange.keyfile import load_private_key
from exchange.sdk import ApiError, Client

app = typer.Typer(help="zonex: privacy-preserving data exchange", no_args_is_help=True)

out = Console(soft_wrap=True)
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

DataDir = Annotated[Path, typer.Option("--data-dir", "-d", help="exchange data directory")]
Url = Annotated[str, typer.Option("--url", envvar="ZONEX_URL", help="exchange base URL")]
KeyPath = Annotated[Path, typer.Option("--key", envvar="ZONEX_KEY", help="your private key file")]


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def one_line_errors(func: F) -> F:
    """Every expected failure becomes one readable line and a non-zero exit; no tracebacks."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ApiError as exc:
            fail(f"{exc.status} {exc.code}: {exc.detail}")
        except ZonexError as exc:
            fail(exc.detail)
        except CryptoError as exc:
            fail(str(exc))
        except httpx.HTTPError as exc:
            fail(f"cannot reach the exchange: {exc}")
        except OSError as exc:
            fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        except ValueError as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def client(url: str, key: Path) -> Client:
    return Client(url, load_private_key(key))


def _when(value: Any) -> str:
    return "-" if not value else str(value).replace("T", " ")[:19]


def save_result(response: dict[str, Any], out_file: Path | None, receipt_file: Path | None) -> None:
    """Write a computation's result and receipt as two files (or print the result)."""
    text = json.dumps(response["result"], ensure_ascii=False, indent=2)
    if out_file is None:
        out.print_json(text)
        if receipt_file is None:
            return
    else:
        out_file.write_text(text + "\n", "utf-8")
        receipt_file = receipt_file or out_file.with_name(out_file.name + ".receipt")
    receipt_file.write_text(json.dumps(response["receipt"], indent=2) + "\n", "utf-8")
    out.print(
        f"receipt: {receipt_file} (check: zonex receipt verify {receipt_file} "
        f"--result {out_file or 'RESULT'} --log-key LOG.pub)"
    )
