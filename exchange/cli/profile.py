"""``zonex profile add|use|list|remove``: name an exchange and a key once, then leave off
``--url`` and ``--key``.

A client command takes its URL and key from, in order: ``--url``/``--key``, then
``ZONEX_URL``/``ZONEX_KEY``, then the profile named by ``--profile``/``ZONEX_PROFILE``, then the
current profile, then its own defaults. The config file holds the key file's absolute path,
never key material (:mod:`exchange.cli._config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from exchange.cli._common import Json, app, one_line_errors, out, print_json

profile_app = typer.Typer(
    help="named exchanges and keys (url and key per profile; one is current)",
    no_args_is_help=True,
)
app.add_typer(profile_app, name="profile")

Name = Annotated[str, typer.Argument(help="the profile's name")]


@profile_app.command("add")
@one_line_errors
def add(
    name: Name,
    url: Annotated[str, typer.Option("--url", help="the exchange's base URL")],
    key: Annotated[Path, typer.Option("--key", help="your private key file (its path is stored)")],
    replace: Annotated[
        bool, typer.Option("--replace", help="overwrite a profile of this name")
    ] = False,
) -> None:
    """Add a profile: an exchange URL and your private key file.

    The first profile becomes the current one. Only the key file's path is stored.

    Examples:
      zonex profile add city --url https://exchange.example --key bank.key
      zonex profile add demo --url http://127.0.0.1:8421 --key demo-data/keys/bank.key
    """
    from exchange.cli._config import Profile, check_name, check_url, load_config, save_config
    from exchange.keyfile import load_private_key

    check_name(name)
    url = check_url(url)
    load_private_key(key)  # a private key, readable only by you: or one line saying what is wrong
    config = load_config()
    existing = config.profiles.get(name)
    if existing is not None and not replace:
        raise ValueError(
            f"profile {name!r} exists (url {existing.url}); to change it add --replace, "
            f"or remove it: zonex profile remove {name}"
        )
    config.profiles[name] = Profile(name, url, key.expanduser().resolve())
    made_current = config.current is None
    if made_current:
        config.current = name
    save_config(config)
    line = f"profile {name}: {url} with key {config.profiles[name].key} ({config.path})"
    if made_current:
        line += "; it is the current profile"
    else:
        line += f"; to use it: zonex profile use {name}, or --profile {name}"
    out.print(line, highlight=False, soft_wrap=True)


@profile_app.command("use")
@one_line_errors
def use(name: Name) -> None:
    """Make a profile the current one.

    Client commands use it when --url/--key, ZONEX_URL/ZONEX_KEY and --profile are not given.

    Example:
      zonex profile use city
    """
    from exchange.cli._config import load_config, save_config

    config = load_config()
    profile = config.get(name)
    config.current = name
    save_config(config)
    out.print(f"current profile: {name} ({profile.url})", highlight=False, soft_wrap=True)


@profile_app.command("list")
@one_line_errors
def list_profiles(as_json: Json = False) -> None:
    """List the profiles; * marks the current one.

    Examples:
      zonex profile list
      zonex profile list --json | jq -r .current
    """
    from rich.table import Table

    from exchange.cli._config import load_config

    config = load_config()
    rows = [
        {
            "name": p.name,
            "url": p.url,
            "key": str(p.key),
            "current": p.name == config.current,
        }
        for p in sorted(config.profiles.values(), key=lambda p: p.name)
    ]
    if as_json:
        print_json({"config": str(config.path), "current": config.current, "profiles": rows})
        return
    if not rows:
        out.print(
            f"no profiles ({config.path}); add one: zonex profile add NAME --url URL --key KEY",
            highlight=False,
            soft_wrap=True,
        )
        return
    table = Table(title=f"profiles ({config.path})")
    for column in ("", "name", "url", "key"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row("*" if r["current"] else "", str(r["name"]), str(r["url"]), str(r["key"]))
    out.print(table)


@profile_app.command("remove")
@one_line_errors
def remove(name: Name) -> None:
    """Remove a profile (the key file itself is left alone).

    Removing the current profile leaves none current.

    Example:
      zonex profile remove old
    """
    from exchange.cli._config import load_config, save_config

    config = load_config()
    config.get(name)
    del config.profiles[name]
    line = f"profile {name} removed"
    if config.current == name:
        config.current = None
        line += "; no profile is current now (zonex profile use NAME)"
    save_config(config)
    out.print(line, highlight=False, soft_wrap=True)
