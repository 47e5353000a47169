"""The CLI's profiles: ``$XDG_CONFIG_HOME/zonex/config.toml`` (default
``~/.config/zonex/config.toml``) names an exchange URL and a private key file per profile, and
the current profile::

    current = "city"

    [profiles.city]
    url = "https://exchange.example"
    key = "/home/ana/keys/bank.key"

Only the key file's absolute path is stored, never key material. The file is read with
:mod:`tomllib` and written whole (mode 0600, renamed into place), so a reader never sees half
of it. Any fault in it is one :class:`ValueError` naming the file and the problem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: a profile name: a bare TOML key a shell needs no quotes for
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Profile:
    name: str
    url: str
    key: Path


@dataclass
class Config:
    path: Path
    current: str | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)

    def get(self, name: str) -> Profile:
        """The profile ``name``, or a ValueError listing the ones there are."""
        found = self.profiles.get(name)
        if found is None:
            known = ", ".join(sorted(self.profiles)) or "none yet"
            raise ValueError(
                f"no profile {name!r} in {self.path} (profiles: {known}); "
                "add one: zonex profile add NAME --url URL --key KEY"
            )
        return found


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/zonex/config.toml``, else ``~/.config/zonex/config.toml`` (a relative
    XDG_CONFIG_HOME is ignored, as the XDG spec asks)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "zonex" / "config.toml"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"profile name {name!r}: use letters, digits, '_', '-' or '.' "
            "(up to 64, starting with a letter or digit)"
        )
    return name


def check_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"--url {url!r}: give the exchange's base URL, e.g. https://exchange.example "
            "or http://127.0.0.1:8421"
        )
    return url.rstrip("/")


def load_config(path: Path | None = None) -> Config:
    """The config file's profiles (an empty config when there is no file)."""
    import tomllib

    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Config(path)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the zonex config ({exc.strerror})") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(
            f"{path}: not a valid zonex config ({exc}); fix it or remove it and add the "
            "profiles again with zonex profile add"
        ) from None
    return _from_doc(path, doc)


def _from_doc(path: Path, doc: dict[str, Any]) -> Config:
    def bad(problem: str) -> ValueError:
        return ValueError(
            f"{path}: {problem}; fix it or remove it and add the profiles again with "
            "zonex profile add"
        )

    unknown = sorted(set(doc) - {"current", "profiles"})
    if unknown:
        raise bad(f"unknown setting {unknown[0]!r} (known: current, profiles)")
    current = doc.get("current")
    if current is not None and not isinstance(current, str):
        raise bad("'current' must be a profile name in quotes")
    table = doc.get("profiles", {})
    if not isinstance(table, dict):
        raise bad("'profiles' must be a table of [profiles.NAME] sections")
    profiles: dict[str, Profile] = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise bad(f"profile {name!r} must be a [profiles.{name}] section")
        if not _NAME.fullmatch(name):
            raise bad(f"profile name {name!r} is not a valid name")
        extra = sorted(set(entry) - {"url", "key"})
        if extra:
            raise bad(f"profile {name!r}: unknown setting {extra[0]!r} (known: url, key)")
        url, key = entry.get("url"), entry.get("key")
        if not isinstance(url, str) or not url:
            raise bad(f"profile {name!r} has no url (a string)")
        if not isinstance(key, str) or not key:
            raise bad(f"profile {name!r} has no key (the path of a private key file)")
        profiles[name] = Profile(name, url, Path(key).expanduser())
    if current is not None and current not in profiles:
        raise bad(f"the current profile {current!r} is not defined")
    return Config(path, current, profiles)


def _quoted(value: str) -> str:
    """A TOML basic string."""
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_toml(config: Config) -> str:
    lines = ["# zonex CLI profiles: edit with zonex profile add|use|remove", ""]
    if config.current is not None:
        lines += [f"current = {_quoted(config.current)}", ""]
    for name in sorted(config.profiles):
        p = config.profiles[name]
        lines += [
            f"[profiles.{check_name(name)}]",
            f"url = {_quoted(p.url)}",
            f"key = {_quoted(str(p.key))}",
            "",
        ]
    return "\n".join(lines)


def save_config(config: Config) -> None:
    """Write the config whole: a new file with mode 0600 renamed over the old one."""
    text = to_toml(config)
    path = config.path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(partial, 0o600)  # O_CREAT's mode does not apply to a leftover file
        os.replace(partial, path)
    except OSError as exc:
        raise ValueError(f"{path}: cannot write the zonex config ({exc.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)


def selected_profile(name: str | None) -> Profile | None:
    """The profile a command uses: ``name`` (``--profile``/``ZONEX_PROFILE``), else the current
    one, else none."""
    config = load_config()
    if name:
        return config.get(name)
    if config.current is not None:
        return config.get(config.current)
    return None
