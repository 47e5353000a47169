"""Search every store, log and response the exchange keeps for planted raw ids and values.

A leakage statement in ``docs/`` ("the ledger never holds a raw id", "the exchange keeps no
pre-noise value") is only as good as a search that could find the counter-example. This module
reads everything the *exchange* side of a data directory holds, as text:

- every row of every table of the control-plane database (values rendered with ``str``, so
  numbers are found as well as strings);
- every file under the data directory except what belongs to another party by design: the
  zones' own stores (``zones/<zone>/tables``: the provider's data, on its node once zones run
  on nodes), key files (``*.key``) and the folders a test names as another party's (the
  consumer's working files, the providers' source files);
- any extra texts a test captured: API responses, log records.

:func:`find` returns every (store, needle) hit; a test asserts it is empty and prints the hits
when it is not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import MetaData, create_engine, select

__all__ = ["Hit", "exchange_texts", "find"]

#: parts of a data directory that hold another party's data or secrets by design
_NOT_THE_EXCHANGES = ("tables",)


@dataclass(frozen=True)
class Hit:
    store: str
    needle: str

    def __str__(self) -> str:
        return f"{self.needle!r} found in {self.store}"


def _database_texts(url: str) -> Iterator[tuple[str, str]]:
    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                lines = [
                    "\t".join("" if v is None else str(v) for v in row)
                    for row in conn.execute(select(table))
                ]
                yield f"database table {table.name}", "\n".join(lines)
    finally:
        engine.dispose()


def _file_texts(data_dir: Path, others: Iterable[Path]) -> Iterator[tuple[str, str]]:
    skip = [p.resolve() for p in others]
    for path in sorted(data_dir.rglob("*")):
        if not path.is_file() or path.suffix == ".key":
            continue
        resolved = path.resolve()
        if any(resolved.is_relative_to(s) for s in skip):
            continue
        relative = path.relative_to(data_dir)
        if any(part in _NOT_THE_EXCHANGES for part in relative.parts[:-1]):
            continue
        if path.name == "control.db" or path.name.startswith("control.db-"):
            continue  # read through SQL above: numbers are stored in binary
        yield f"file {relative}", path.read_bytes().decode("utf-8", "replace")


def exchange_texts(
    data_dir: Path,
    database_url: str,
    *,
    others: Iterable[Path] = (),
    extra: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """Everything the exchange holds in ``data_dir`` and its database, as (store, text)."""
    texts = list(_database_texts(database_url))
    texts += list(_file_texts(data_dir, others))
    texts += list((extra or {}).items())
    return texts


#: a needle is a whole token: not inside a word, a hex digest or base64 text (letters, digits,
#: ``+/=_-``), nor the fraction of a number or a time (after ``.``), nor a port or a clock
#: field (after or before ``:``); a following ``.`` is allowed, so ``170277.0`` still counts
_BEFORE = r"(?<![0-9A-Za-z.:+/=_-])"
_AFTER = r"(?![0-9A-Za-z:+/=_])"
#: the one number a server log carries that differs from run to run and is not a time: the
#: process id uvicorn prints
_PID = re.compile(r"server process \[[0-9]+\]")


def find(texts: Iterable[tuple[str, str]], needles: Iterable[str]) -> list[Hit]:
    """Every store that contains a needle as a whole token (:data:`_BEFORE`, :data:`_AFTER`).

    With those bounds, the numbers of a store that change between runs (fractions of seconds,
    epoch seconds, ports, the server's pid, which is removed) can never equal a planted value,
    so a search over seeded data gives the same answer on every run: no false failures by
    chance."""
    wanted = sorted({n for n in needles if n})
    if not wanted:
        return []
    pattern = re.compile(_BEFORE + "(" + "|".join(re.escape(n) for n in wanted) + ")" + _AFTER)
    hits = []
    for store, text in texts:
        for needle in sorted(set(pattern.findall(_PID.sub("server process [pid]", text)))):
            hits.append(Hit(store, needle))
    return hits
