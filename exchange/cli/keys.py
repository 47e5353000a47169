"""``zonex key``: Ed25519 key pairs on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from exchange.cli._common import STDOUT, app, one_line_errors, out

key_app = typer.Typer(help="Ed25519 key pairs", no_args_is_help=True)
app.add_typer(key_app, name="key")


@key_app.command("new")
@one_line_errors
def key_new(
    out_prefix: Annotated[Path, typer.Option("--out", help="writes OUT.key (0600) and OUT.pub")],
) -> None:
    """Make an Ed25519 key pair.

    Example:
      zonex key new --out bank
    """
    from crypto.keys import SigningKey
    from exchange.keyfile import write_private_key, write_public_key

    key = SigningKey.generate()
    if out_prefix == STDOUT:
        raise ValueError("--out takes a file name prefix (writes PREFIX.key and PREFIX.pub), not -")
    priv = out_prefix.with_name(out_prefix.name + ".key")
    pub = out_prefix.with_name(out_prefix.name + ".pub")
    write_private_key(priv, key)
    write_public_key(pub, key.public_key)
    out.print(f"key id {key.key_id}")
    out.print(f"private key {priv} (mode 0600), public key {pub}")


@key_app.command("id")
@one_line_errors
def key_id_cmd(path: Path) -> None:
    """Print the key id of a public or private key file.

    Example:
      zonex key id bank.pub
    """
    from exchange.keyfile import load_private_key, load_public_key

    text = path.read_bytes()
    if b"PRIVATE" in text:
        out.print(load_private_key(path).key_id)
    else:
        out.print(load_public_key(path).key_id)
