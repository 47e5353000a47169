"""Zone data plane: one zone's datasets, stored embedded or attached where they already live.

A zone keeps each imported dataset as an immutable DuckDB file, ``<zone dir>/tables/<name>.duckdb``
(the engine choice and its measurements: ``docs/decisions/0001-zone-storage-engine.md``). An
import writes a private temporary file and publishes it with one atomic hard link, so a dataset
is either complete or absent, and readers in any number of processes open published files
read-only without ever meeting a writer's lock. Queries go through :attr:`ZoneStore.engine`, a
SQLAlchemy engine over an in-memory DuckDB that attaches the zone's files read-only, exposes each
as a view named after the dataset, and then switches off every file-system and extension access.

A provider may instead attach an existing table by SQLAlchemy URL (:func:`attach`); the data
stays in the provider's database, and only URLs under operator-configured prefixes are accepted.

Both kinds are described by the same :class:`TableInfo`. Raw rows leave this module only to its
in-process caller; a refusal may name header columns but never quotes a data value.

Snapshot digest ``zonex-snapshot-v1``, recorded at registration: the same for the same rows
whatever the engine or the physical order, different when any value, name or type changes.
Implemented twice, in SQL inside DuckDB and in Python over any SQLAlchemy connection, and the
tests hold the two to one answer.

1. Each value becomes canonical text by its column's portable type.
   integer: base-10 digits, ``-`` if negative.
   decimal: plain positional notation: no exponent, no ``+``, no trailing fractional zeros, no
   trailing ``.``, zero as ``0`` (never ``-0``). A binary floating-point value is first written
   as the shortest decimal that reads back to the same binary64 value, so ``0.1`` stays ``0.1``,
   ``12.0`` becomes ``12`` and ``1e+20`` becomes ``100000000000000000000``; NaN and the
   infinities are ``nan``, ``inf``, ``-inf``. Equal numbers digest equally whether stored as
   DECIMAL, DOUBLE or INTEGER.
   text: the string itself. boolean: ``true`` / ``false``. date: ``YYYY-MM-DD``.
   timestamp: ``YYYY-MM-DD HH:MM:SS.ffffff`` (always six fractional digits); a time-zone-aware
   value is converted to UTC and suffixed ``Z``.
2. A value is encoded as ``~`` for NULL, else ``<n>:<text>`` with ``n`` the byte length of the
   UTF-8 text in decimal (so no value can imitate a boundary). A row's encoding is its values'
   encodings concatenated in column order; the row hash is the SHA-256 of those bytes.
3. The digest is the lowercase hex SHA-256 of the header line ``zonex-snapshot-v1\n``, then the
   compact JSON ``[[name, type], ...]`` of the columns in order (UTF-8, not ASCII-escaped) and
   ``\n``, then every row hash as 64 lowercase hex characters, in ascending order, duplicates
   kept.

Sorting row hashes rather than rows keeps the order free of any engine's collation and NULL
placement. The Python implementation holds 32 bytes a row in memory, never the rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from duckdb_engine import ConnectionWrapper
from sqlalchemy import Engine, column, create_engine, event, inspect, select
from sqlalchemy import table as sql_table
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchTableError, SQLAlchemyError
from sqlalchemy.pool import NullPool, QueuePool
from sqlalchemy.sql.expression import ColumnClause

from exchange.errors import ZonexError

__all__ = [
    "AttachedTable",
    "ColumnInfo",
    "CsvOptions",
    "PortableType",
    "TableInfo",
    "ZoneStore",
    "ZoneStoreError",
    "attach",
    "row_count_band",
]

#: publishes an import's complete private file in place of the current snapshot (see
#: :meth:`ZoneStore.replace`); called with the file and its description
Publish = Callable[["Path", "TableInfo"], None]

log = logging.getLogger(__name__)

PortableType = Literal["integer", "decimal", "text", "boolean", "date", "timestamp"]

#: dataset (table) names and imported column names: lowercase simple identifiers
NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
#: names DuckDB resolves as catalogs or schemas; refused as dataset names to keep lookups plain
RESERVED_NAMES = frozenset({"main", "memory", "system", "temp", "information_schema", "pg_catalog"})
#: a provider table name in an attached database, optionally ``schema.table``
ATTACH_NAME = re.compile(r"^(?:([A-Za-z_][A-Za-z0-9_]{0,62})\.)?([A-Za-z_][A-Za-z0-9_]{0,62})$")
#: what an attach URL may add after an allowed prefix: path or database-name characters only
ATTACH_REMAINDER = re.compile(r"^[A-Za-z0-9_.\-/]*$")

DIGEST_VERSION = "zonex-snapshot-v1"
TABLES_DIR = "tables"
SPILL_DIR = "spill"
TABLE_SUFFIX = ".duckdb"
TEMP_PREFIX = ".import-"
#: abandoned import files (a crashed process) older than this are removed when a store opens
STALE_TEMP_SECONDS = 24 * 3600
#: DuckDB connections the engine keeps open for reuse, and how many more it may open at once
POOL_SIZE, POOL_OVERFLOW = 4, 8
HEADER_LIMIT = 1 << 20
BATCH_ROWS = 65_536

_STATUS = {
    "table_exists": 409,
    "not_found": 404,
    "attach_refused": 403,
}


class ZoneStoreError(ZonexError, ValueError):
    """A refused zone-store operation. ``code`` says which: ``bad_name``, ``bad_csv``,
    ``bad_parquet``, ``unsupported_type``, ``table_exists``, ``not_found``, ``attach_refused``,
    ``attach_failed``. The store is unchanged when one is raised."""

    code = "zone_store"
    status = 422
    title = "Zone data could not be stored"

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail, reason=code)
        self.code = code  # type: ignore[misc]
        self.status = _STATUS.get(code, 422)  # type: ignore[misc]


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: PortableType


@dataclass(frozen=True)
class TableInfo:
    columns: tuple[ColumnInfo, ...]
    row_count: int
    #: lowercase hex snapshot digest (defined in the module docstring)
    digest: str


# -- row-count bands --------------------------------------------------------------------------

_UNITS = {0: "", 3: "k", 6: "M", 9: "B"}


def row_count_band(n: int) -> str:
    """The coarse row count the public catalog shows instead of the exact one.

    ``"0"``, then ``"1-99"`` (small counts are not split further: "3 rows" can identify), then one
    band per power of ten: ``"100-999"``, ``"1k-9.9k"``, ``"10k-99k"``, ``"100k-999k"``,
    ``"1M-9.9M"`` ... ``"100B-999B"``, and ``"1T+"`` from 10^12 on.
    """
    if n < 0:
        raise ValueError("a row count cannot be negative")
    if n == 0:
        return "0"
    if n < 100:
        return "1-99"
    if n >= 10**12:
        return "1T+"
    exponent = len(str(n)) - 1
    if exponent == 2:
        return "100-999"
    unit_exponent = exponent // 3 * 3
    lead = 10 ** (exponent - unit_exponent)
    unit = _UNITS[unit_exponent]
    top = {1: "9.9", 10: "99", 100: "999"}[lead]
    return f"{lead}{unit}-{top}{unit}"


# -- snapshot digest --------------------------------------------------------------------------


def _header(columns: Sequence[ColumnInfo]) -> bytes:
    spec = json.dumps(
        [[c.name, c.type] for c in columns], ensure_ascii=False, separators=(",", ":")
    )
    return f"{DIGEST_VERSION}\n{spec}\n".encode()


def _plain_decimal(d: Decimal) -> str:
    if d.is_nan():
        return "nan"
    if d.is_infinite():
        return "-inf" if d < 0 else "inf"
    s = format(d, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("", "-0", "-") else s


class _BadValueError(Exception):
    pass


def _canon_integer(v: Any) -> str:
    if isinstance(v, int):
        return str(int(v))
    raise _BadValueError("integer")


def _canon_decimal(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return _plain_decimal(Decimal(repr(v)))
    if isinstance(v, Decimal):
        return _plain_decimal(v)
    if isinstance(v, int):
        return str(int(v))
    raise _BadValueError("decimal")


def _canon_text(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise _BadValueError("text")


def _canon_boolean(v: Any) -> str:
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return "true" if v else "false"
    raise _BadValueError("boolean")


def _canon_date(v: Any) -> str:
    if isinstance(v, str):  # SQLite keeps dates as ISO text
        v = date.fromisoformat(v)
    if isinstance(v, datetime) or not isinstance(v, date):
        raise _BadValueError("date")
    return v.isoformat()


def _canon_timestamp(v: Any) -> str:
    if isinstance(v, str):  # SQLite keeps timestamps as ISO text
        v = datetime.fromisoformat(v)
    if not isinstance(v, datetime):
        raise _BadValueError("timestamp")
    if v.tzinfo is not None:
        return v.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds") + "Z"
    return v.isoformat(" ", "microseconds")


_CANON: dict[str, Callable[[Any], str]] = {
    "integer": _canon_integer,
    "decimal": _canon_decimal,
    "text": _canon_text,
    "boolean": _canon_boolean,
    "date": _canon_date,
    "timestamp": _canon_timestamp,
}


def _finish_digest(columns: Sequence[ColumnInfo], row_hashes: bytearray, n: int) -> str:
    """Sort the 32-byte row hashes and hash them (as hex) after the header."""
    outer = hashlib.sha256(_header(columns))
    if n:
        arr = pa.Array.from_buffers(pa.binary(32), n, [None, pa.py_buffer(row_hashes)])
        ordered = pc.take(arr, pc.sort_indices(arr))
        data = memoryview(ordered.buffers()[1])[ordered.offset * 32 : (ordered.offset + n) * 32]
        step = BATCH_ROWS * 32
        for start in range(0, n * 32, step):
            outer.update(data[start : start + step].hex().encode("ascii"))
    return outer.hexdigest()


def _digest_rows(
    columns: Sequence[ColumnInfo], batches: Iterable[Sequence[Sequence[Any]]]
) -> tuple[int, str]:
    """Row count and snapshot digest of rows streamed in batches (the Python implementation)."""
    encoders = [_CANON[c.type] for c in columns]
    names = [c.name for c in columns]
    sha256 = hashlib.sha256
    row_hashes = bytearray()
    n = 0
    for rows in batches:
        for row in rows:
            parts = []
            for i, value in enumerate(row):
                if value is None:
                    parts.append(b"~")
                    continue
                try:
                    raw = encoders[i](value).encode("utf-8")
                except (_BadValueError, ValueError, UnicodeError) as exc:
                    raise ZoneStoreError(
                        "attach_failed",
                        f"column {names[i]!r} holds a value that is not a valid {columns[i].type}",
                    ) from exc
                parts.append(b"%d:%s" % (len(raw), raw))
            # lowercase hex of the row hash sorts exactly like its bytes
            row_hashes += sha256(b"".join(parts)).digest()
            n += 1
    return n, _finish_digest(columns, row_hashes, n)


# DuckDB implementation of the same canonical text. DuckDB writes a DECIMAL with its fixed scale
# and a DOUBLE as the shortest round-trip digits, exactly like Python's repr (``1e+20``,
# ``1.5e-07``, ``12.0``). The plain positional form is built in stages of nested SELECTs so that
# no expression is repeated (DuckDB would evaluate repeated parts for every row), and the
# exponent work is guarded so that only the rare values written with an exponent pay for it.


def _quote(name: str) -> str:
    """A DuckDB identifier, always quoted."""
    return '"' + name.replace('"', '""') + '"'


_DUCK_INTEGERS = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT"}
    | {"UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT"}
)


def _duck_portable(duck_type: str) -> PortableType | None:
    t = duck_type.upper()
    if t in _DUCK_INTEGERS:
        return "integer"
    if t in {"DOUBLE", "FLOAT"} or t.startswith("DECIMAL"):
        return "decimal"
    if t == "VARCHAR":
        return "text"
    if t == "BOOLEAN":
        return "boolean"
    if t == "DATE":
        return "date"
    if t in {"TIMESTAMP", "TIMESTAMP WITH TIME ZONE"}:
        return "timestamp"
    return None


def _duck_first_sql(col: str, duck_type: str) -> str:
    """The canonical text, or for a number DuckDB's own text (finished in later stages)."""
    kind = _duck_portable(duck_type)
    t = duck_type.upper()
    if kind == "integer" or kind == "date":
        return f"CAST({col} AS VARCHAR)"
    if kind == "decimal":
        return f"CAST(CAST({col} AS {'DOUBLE' if t == 'FLOAT' else t}) AS VARCHAR)"
    if kind == "text":
        return col
    if kind == "boolean":
        return f"CASE WHEN {col} THEN 'true' WHEN NOT {col} THEN 'false' END"
    if t == "TIMESTAMP WITH TIME ZONE":
        return f"strftime(timezone('UTC', {col}), '%Y-%m-%d %H:%M:%S.%f') || 'Z'"
    if kind == "timestamp":
        return f"strftime({col}, '%Y-%m-%d %H:%M:%S.%f')"
    raise ZoneStoreError("unsupported_type", f"column {col} has unsupported type {duck_type}")


def _duck_digest_sql(relation: str, described: Sequence[tuple[str, str]]) -> str:
    """SELECT of every row's hash (column ``h``), as the module docstring defines it."""
    n = len(described)
    numbers = [i for i, (_, t) in enumerate(described) if _duck_portable(t) == "decimal"]
    keep = [f"s{i}" for i in range(n)]

    def stage(inner: str, extra: Iterable[str]) -> str:
        return f"SELECT {', '.join([*keep, *extra])} FROM ({inner})"

    first = [f"{_duck_first_sql(_quote(c), t)} AS s{i}" for i, (c, t) in enumerate(described)]
    sql = f"SELECT {', '.join(first)} FROM {relation}"
    if numbers:
        exp = {i: f"contains(s{i}, 'e')" for i in numbers}
        # mantissa and exponent of "[-]d[.ddd]e[+-]x"
        sql = stage(
            sql,
            [
                f"CASE WHEN {exp[i]} THEN split_part(ltrim(s{i}, '-'), 'e', 1) END AS m{i}, "
                f"CASE WHEN {exp[i]} THEN CAST(split_part(s{i}, 'e', 2) AS INTEGER) END AS x{i}"
                for i in numbers
            ],
        )
        # significant digits and the decimal point's position among them
        sql = stage(
            sql,
            [
                f"replace(m{i}, '.', '') AS g{i}, length(split_part(m{i}, '.', 1)) + x{i} AS p{i}"
                for i in numbers
            ],
        )
        # shortest digits carry no leading or trailing zeros: placing the point is enough
        sql = stage(
            sql,
            [
                f"CASE WHEN {exp[i]} THEN (CASE WHEN starts_with(s{i}, '-') THEN '-' ELSE '' END)"
                f" || (CASE WHEN p{i} <= 0 THEN '0.' || repeat('0', -p{i}) || g{i}"
                f" WHEN p{i} >= length(g{i}) THEN g{i} || repeat('0', p{i} - length(g{i}))"
                f" ELSE substr(g{i}, 1, p{i}) || '.' || substr(g{i}, p{i} + 1) END) END AS e{i}, "
                f"CASE WHEN contains(s{i}, '.') THEN rtrim(rtrim(s{i}, '0'), '.') END AS t{i}"
                for i in numbers
            ],
        )
        keep = [
            f"CASE WHEN e{i} IS NOT NULL THEN e{i} WHEN t{i} = '-0' THEN '0' "
            # NaN prints as "nan" or "-nan"; not "s = '-nan'", which DuckDB 2's optimizer folds
            # to false (it compares the DOUBLE with the literal cast back)
            f"WHEN t{i} IS NOT NULL THEN t{i} WHEN ends_with(s{i}, 'nan') THEN 'nan' "
            f"ELSE s{i} END AS s{i}"
            if i in numbers
            else f"s{i}"
            for i in range(n)
        ]
        sql = stage(sql, [])
    row = " || ".join(
        f"CASE WHEN s{i} IS NULL THEN '~' ELSE CAST(strlen(s{i}) AS VARCHAR) || ':' || s{i} END"
        for i in range(n)
    )
    return f"SELECT sha256({row}) AS h FROM ({sql})"


def _describe_duck(con: duckdb.DuckDBPyConnection, relation: str) -> TableInfo:
    """Columns, row count and digest of a DuckDB table or view, computed inside DuckDB."""
    described = [(str(r[0]), str(r[1])) for r in con.execute(f"DESCRIBE {relation}").fetchall()]
    columns = []
    for name, duck_type in described:
        kind = _duck_portable(duck_type)
        if kind is None:
            raise ZoneStoreError(
                "unsupported_type", f"column {name!r} has unsupported type {duck_type}"
            )
        columns.append(ColumnInfo(name, kind))
    sql = f"SELECT h FROM ({_duck_digest_sql(relation, described)}) ORDER BY h"
    outer = hashlib.sha256(_header(columns))
    n = 0
    for batch in con.sql(sql).to_arrow_reader(BATCH_ROWS):
        hashes = batch.column(0)
        n += len(hashes)
        if isinstance(hashes, pa.StringArray) and hashes.null_count == 0:
            # the hex strings sit back to back in the data buffer: hash them without copying
            offsets = memoryview(hashes.buffers()[1]).cast("i")
            start, end = offsets[hashes.offset], offsets[hashes.offset + len(hashes)]
            outer.update(memoryview(hashes.buffers()[2])[start:end])
        else:  # pragma: no cover - another Arrow string layout
            outer.update("".join(hashes.to_pylist()).encode("ascii"))
    return TableInfo(tuple(columns), n, outer.hexdigest())


# -- the zone store ---------------------------------------------------------------------------


def _check_name(table: str) -> None:
    if not isinstance(table, str) or not NAME.fullmatch(table) or table in RESERVED_NAMES:
        raise ZoneStoreError(
            "bad_name",
            "a dataset name is 1-63 characters: a lowercase letter, then lowercase letters, "
            "digits or underscores (and not a reserved name)",
        )


def _check_columns(names: Sequence[str], code: str) -> None:
    if not names:
        raise ZoneStoreError(code, "the file has no columns")
    # fullmatch: "$" alone would let a trailing newline through
    bad = [n for n in names if not NAME.fullmatch(n)]
    if bad:
        shown = ", ".join(repr(n[:40]) for n in bad[:10])
        raise ZoneStoreError(
            code,
            f"column names must be lowercase identifiers (a letter, then letters, digits or "
            f"underscores, at most 63); rename {shown}",
        )
    dups = sorted(n for n, count in Counter(names).items() if count > 1)
    if dups:
        raise ZoneStoreError(code, f"duplicate column names: {', '.join(dups)}")


def _duck_error(code: str, what: str, exc: duckdb.Error, source: Path) -> ZoneStoreError:
    # keep DuckDB's first line only (later lines quote the offending row), without server paths
    message = str(exc).strip()
    first = message.splitlines()[0] if message else type(exc).__name__
    return ZoneStoreError(code, f"{what}: {first.replace(str(source), 'the file')[:300]}")


#: encodings a CSV file may be read in: each keeps ``\n`` a line end in every byte sequence
CSV_ENCODINGS = ("utf-8", "utf-8-sig", "gb18030", "gbk", "big5", "latin-1")


@dataclass(frozen=True)
class CsvOptions:
    """How a provider's CSV file is written: its field ``delimiter`` (one character), its
    ``encoding`` (one of :data:`CSV_ENCODINGS`) and header ``rename`` (source name -> column
    name, e.g. a Chinese export's headers to lowercase identifiers)."""

    delimiter: str = ","
    encoding: str = "utf-8"
    rename: tuple[tuple[str, str], ...] = ()

    def check(self) -> None:
        if len(self.delimiter) != 1 or self.delimiter in ('"', "\r", "\n"):
            raise ZoneStoreError(
                "bad_csv_options",
                f"the delimiter is one character other than a quote or line end (tab: \\t), "
                f"got {self.delimiter!r}",
            )
        if self.encoding.lower().replace("_", "-") not in CSV_ENCODINGS:
            raise ZoneStoreError(
                "bad_csv_options",
                f"unknown encoding {self.encoding!r}; use one of {', '.join(CSV_ENCODINGS)}",
            )
        sources = [src for src, _ in self.rename]
        if len(set(sources)) != len(sources):
            raise ZoneStoreError("bad_csv_options", "a column is renamed twice")

    @property
    def codec(self) -> str:
        return self.encoding.lower().replace("_", "-")


def _lines(source: Path, codec: str, delimiter: str) -> Iterable[str]:
    """The file's decoded lines (ends kept), naming the line and byte a decoding fails at."""
    with source.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf") and codec.startswith("utf-8"):
                raw = raw[3:]
            try:
                yield raw.decode(codec)
            except UnicodeDecodeError as exc:
                column = raw[: exc.start].decode(codec, "replace").count(delimiter) + 1
                raise ZoneStoreError(
                    "bad_csv",
                    f"line {number}, near field {column}: byte 0x{raw[exc.start]:02x} at "
                    f"position {exc.start + 1} is not {codec}; give the file's encoding "
                    f"({', '.join(CSV_ENCODINGS)})",
                ) from None


def _csv_fault(message: str, delimiter: str) -> str:
    """The csv module's complaint, said in the file's terms."""
    if "expected after" in message:
        return (
            f"a quoted field is followed by more text before the next {delimiter!r} (a stray "
            f"quote, or is the delimiter not {delimiter!r}?); quotes inside a field are doubled"
        )
    if "end of data" in message or "unexpected end" in message:
        return "a quote is not closed before the end of the file"
    if "NUL" in message or "null byte" in message:
        return "the line holds a NUL byte (is this a text file, and is the encoding right?)"
    return message


def _check_csv(source: Path, options: CsvOptions, copy_to: Path | None) -> list[str]:
    """Read the whole file once, as the engine will: the header (its names after renames),
    then every record's field count, each fault named by line and column. With ``copy_to``,
    the file's lines are written there in UTF-8 (other encodings)."""
    options.check()
    sink = copy_to.open("w", encoding="utf-8", newline="") if copy_to is not None else None
    try:
        try:
            lines = _lines(source, options.codec, options.delimiter)
            feed: Iterable[str] = lines
            if sink is not None:

                def copied() -> Iterable[str]:
                    for line in lines:
                        sink.write(line)
                        yield line

                feed = copied()
            reader = csv.reader(feed, delimiter=options.delimiter, strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise ZoneStoreError("bad_csv", "the CSV file is empty") from None
            width = len(header)
            rows = 0
            for fields in reader:
                if not fields:
                    continue  # a blank line: the engine skips it too
                rows += 1
                if len(fields) != width:
                    line = reader.line_num
                    after = header[min(len(fields), width) - 1]
                    what = "missing" if len(fields) < width else "extra"
                    raise ZoneStoreError(
                        "bad_csv",
                        f"line {line}: {len(fields)} fields where the header has {width} "
                        f"({what} fields after column {after!r}; is the delimiter "
                        f"{options.delimiter!r} right, and is every quote closed?)",
                    )
        except csv.Error as exc:
            raise ZoneStoreError(
                "bad_csv", f"line {reader.line_num}: {_csv_fault(str(exc), options.delimiter)}"
            ) from None
        except OSError as exc:
            raise ZoneStoreError("bad_csv", "the CSV file cannot be read") from exc
    finally:
        if sink is not None:
            sink.close()
    if rows == 0:
        raise ZoneStoreError(
            "bad_csv", "the CSV file has a header but no rows (types cannot be inferred)"
        )
    renames = dict(options.rename)
    unknown = [src for src in renames if src not in header]
    if unknown:
        raise ZoneStoreError(
            "bad_csv",
            f"rename: no column {unknown[0]!r} in the header (it has: "
            f"{', '.join(repr(h) for h in header[:20])})",
        )
    return [renames.get(h, h) for h in header]


_CSV_OPTIONS = (
    "header = true, delim = ?, names = ?, quote = '\"', escape = '\"', skip = 0, "
    "encoding = 'utf-8', "
    "strict_mode = true, null_padding = false, ignore_errors = false, allow_quoted_nulls = false, "
    "auto_type_candidates = ['BOOLEAN', 'BIGINT', 'HUGEINT', 'DOUBLE', 'DATE', 'TIMESTAMP', "
    "'VARCHAR']"
)

#: Parquet types imported as another type in the portable vocabulary
_PARQUET_CASTS = {
    "FLOAT": "DOUBLE",
    "TIMESTAMP_S": "TIMESTAMP",
    "TIMESTAMP_MS": "TIMESTAMP",
    "TIMESTAMP_NS": "TIMESTAMP",
    "UUID": "VARCHAR",
}


@dataclass
class _Generation:
    key: tuple[tuple[str, int, int, int], ...]
    base: duckdb.DuckDBPyConnection


class ZoneStore:
    """One zone's embedded datasets: a directory of immutable per-dataset DuckDB files.

    Cheap to construct (nothing is opened until used); safe to use from several threads and
    from several processes at once (see the module docstring). Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._tables = self.directory / TABLES_DIR
        self._tables.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._generation: _Generation | None = None
        self._engine: Engine | None = None
        self._previous: list[Path] = []
        self._sweep_stale_imports()

    def __enter__(self) -> ZoneStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- names and files --

    def _path(self, table: str) -> Path:
        return self._tables / f"{table}{TABLE_SUFFIX}"

    def tables(self) -> list[str]:
        """The published datasets, sorted."""
        return sorted(
            p.name[: -len(TABLE_SUFFIX)]
            for p in self._tables.iterdir()
            if p.name.endswith(TABLE_SUFFIX)
            and not p.name.startswith(".")
            and NAME.match(p.name[: -len(TABLE_SUFFIX)])
        )

    def has_table(self, table: str) -> bool:
        _check_name(table)
        return self._path(table).is_file()

    def _sweep_stale_imports(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for p in self._tables.glob(f"{TEMP_PREFIX}*"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except OSError:  # pragma: no cover - raced with another process
                pass

    # -- import --

    def import_csv(
        self,
        table: str,
        source: Path,
        *,
        options: CsvOptions | None = None,
        publish: Publish | None = None,
    ) -> TableInfo:
        """Import a CSV file (RFC 4180: ``"`` quotes, one header row, the same number of fields
        on every row, at least one row), UTF-8 and comma-separated unless ``options`` say
        otherwise; its header names, after ``options.rename``, must be lowercase identifiers.
        Column types are inferred (integer, decimal as binary64, boolean, date, timestamp, else
        text); a value with leading zeros stays text. Refusals: ``bad_name``, ``table_exists``,
        ``bad_csv_options``, ``bad_csv`` (naming the line, and the column where one is at fault).

        With ``publish``, the table is a new snapshot of an existing one: ``publish`` is handed
        the complete file instead of it being linked in (see :meth:`replace`)."""
        _check_name(table)
        if publish is None:
            self._refuse_existing(table)
        options = options or CsvOptions()
        options.check()
        source = Path(source)
        utf8 = None
        if options.codec != "utf-8":
            utf8 = self._tables / f"{TEMP_PREFIX}{table}-{secrets.token_hex(8)}.csv"
        try:
            names = _check_csv(source, options, utf8)
            _check_columns(names, "bad_csv")
            read = utf8 or source

            def build(con: duckdb.DuckDBPyConnection) -> None:
                sql = f"CREATE TABLE {_quote(table)} AS SELECT * FROM read_csv(?, {_CSV_OPTIONS}"
                params = [str(read), options.delimiter, names]
                try:
                    con.execute(sql + ")", params)
                except duckdb.ConversionException:
                    # the type sniffed from a sample did not fit a later row: infer from all
                    con.execute(f"DROP TABLE IF EXISTS {_quote(table)}")
                    con.execute(sql + ", sample_size = -1)", params)
                got = [r[0] for r in con.execute(f"DESCRIBE {_quote(table)}").fetchall()]
                if got != names:
                    raise ZoneStoreError("bad_csv", "the CSV header does not match its rows")
                count = con.execute(f"SELECT count(*) FROM {_quote(table)}").fetchone()
                if not count or not count[0]:
                    raise ZoneStoreError(
                        "bad_csv",
                        "the CSV file has a header but no rows (types cannot be inferred)",
                    )

            return self._import(table, build, "bad_csv", read, publish)
        finally:
            if utf8 is not None:
                utf8.unlink(missing_ok=True)

    def import_parquet(
        self, table: str, source: Path, *, publish: Publish | None = None
    ) -> TableInfo:
        """Import a Parquet file. Columns must be lowercase identifiers and of a type in the
        portable vocabulary; FLOAT is widened to DOUBLE, TIMESTAMP_S/MS/NS become microsecond
        TIMESTAMP, UUID and ENUM become text. Refusals: ``bad_name``, ``table_exists``,
        ``bad_parquet``, ``unsupported_type``. ``publish``: as for :meth:`import_csv`."""
        _check_name(table)
        if publish is None:
            self._refuse_existing(table)
        if not Path(source).is_file():
            raise ZoneStoreError("bad_parquet", "the Parquet file cannot be read")

        def build(con: duckdb.DuckDBPyConnection) -> None:
            schema = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(source)]).fetchall()
            names = [r[0] for r in schema]
            _check_columns(names, "bad_parquet")
            select_list = []
            for name, duck_type, *_ in schema:
                t = str(duck_type).upper()
                cast = _PARQUET_CASTS.get(t, "VARCHAR" if t.startswith("ENUM") else None)
                if cast is None and _duck_portable(t) is None:
                    raise ZoneStoreError(
                        "unsupported_type", f"column {name!r} has unsupported type {duck_type}"
                    )
                q = _quote(name)
                select_list.append(f"CAST({q} AS {cast}) AS {q}" if cast else q)
            con.execute(
                f"CREATE TABLE {_quote(table)} AS "
                f"SELECT {', '.join(select_list)} FROM read_parquet(?)",
                [str(source)],
            )

        return self._import(table, build, "bad_parquet", Path(source), publish)

    def _refuse_existing(self, table: str) -> None:
        if self._path(table).exists():
            raise ZoneStoreError("table_exists", f"dataset {table!r} already exists")

    def _import(
        self,
        table: str,
        build: Callable[[duckdb.DuckDBPyConnection], None],
        code: str,
        source: Path,
        publish: Publish | None = None,
    ) -> TableInfo:
        """Build the table in a private file, describe it, then publish it atomically."""
        temp = self._tables / f"{TEMP_PREFIX}{table}-{secrets.token_hex(8)}{TABLE_SUFFIX}"
        try:
            con = duckdb.connect(str(temp), config=_duck_config())
            try:
                build(con)
                info = _describe_duck(con, _quote(table))
            except duckdb.Error as exc:
                what = "the CSV file" if code == "bad_csv" else "the Parquet file"
                raise _duck_error(code, f"{what} could not be read", exc, source) from exc
            finally:
                con.close()  # checkpoints: the file is complete and the WAL gone
            _fsync(temp)
            if publish is not None:
                publish(temp, info)
                return info
            try:
                # link() never replaces: of two racing imports exactly one wins
                os.link(temp, self._path(table))
            except FileExistsError as exc:
                raise ZoneStoreError("table_exists", f"dataset {table!r} already exists") from exc
            _fsync(self._tables)
            return info
        finally:
            for leftover in (temp, temp.with_name(temp.name + ".wal")):
                leftover.unlink(missing_ok=True)

    # -- reading --

    def describe(self, table: str) -> TableInfo:
        """Columns, exact row count and snapshot digest, recomputed from the stored rows (a full
        scan, done inside DuckDB)."""
        _check_name(table)
        if not self.has_table(table):
            raise ZoneStoreError("not_found", f"no dataset {table!r} in this zone")
        cur = self._cursor()
        try:
            return _describe_duck(cur, _quote(table))
        except duckdb.CatalogException as exc:  # dropped between the check and the read
            raise ZoneStoreError("not_found", f"no dataset {table!r} in this zone") from exc
        finally:
            cur.close()

    def replace(self, table: str, new_file: Path) -> Callable[[], None]:
        """Publish ``new_file`` (handed to an import's ``publish``) as the current snapshot of
        ``table``, atomically; queries already running finish on the old file. Returns an undo
        that puts the previous snapshot back, for a caller whose own commit then failed."""
        _check_name(table)
        path = self._path(table)
        previous = self._tables / f"{TEMP_PREFIX}prev-{table}-{secrets.token_hex(8)}{TABLE_SUFFIX}"
        try:
            os.link(path, previous)
        except FileNotFoundError as exc:
            raise ZoneStoreError("not_found", f"no dataset {table!r} in this zone") from exc
        os.replace(new_file, path)
        _fsync(self._tables)

        def undo() -> None:
            os.replace(previous, path)
            _fsync(self._tables)

        self._previous.append(previous)
        return undo

    def discard_previous(self) -> None:
        """Remove the snapshots :meth:`replace` kept for an undo (after the caller committed)."""
        while self._previous:
            self._previous.pop().unlink(missing_ok=True)

    def drop(self, table: str) -> None:
        """Remove a dataset. Queries already running on it finish on the old file."""
        _check_name(table)
        try:
            self._path(table).unlink()
        except FileNotFoundError as exc:
            raise ZoneStoreError("not_found", f"no dataset {table!r} in this zone") from exc
        _fsync(self._tables)

    @property
    def engine(self) -> Engine:
        """A SQLAlchemy engine for read-only queries over this zone's datasets, each a view named
        after the dataset. Every connection sees the datasets published when it was checked out:
        a pooled connection is reused only while the set of dataset files is the one it was
        opened on. The engine cannot read or write any file, install or load an extension, or
        change its own configuration."""
        with self._lock:
            if self._engine is None:
                engine = create_engine(
                    "duckdb:///:memory:",
                    creator=self._connect,
                    poolclass=QueuePool,
                    pool_size=POOL_SIZE,
                    max_overflow=POOL_OVERFLOW,
                )
                event.listen(engine, "checkout", self._checkout)
                self._engine = engine
            return self._engine

    def _connect(self) -> ConnectionWrapper:
        with self._lock:
            cursor, key = self._current()
        return _PooledCursor(cursor, key)

    def _checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        """A pooled connection opened on another set of dataset files is discarded (the pool
        then opens one on the current set)."""
        if getattr(dbapi_connection, "generation", None) != self._scan():
            raise DisconnectionError("the zone's datasets changed")

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection (cursor) to the current generation: an in-memory DuckDB that attached
        the dataset files published when it was built. A new generation replaces it whenever
        the set of files changes; connections to the old one keep working until closed."""
        with self._lock:
            return self._current()[0]

    def _current(self) -> tuple[duckdb.DuckDBPyConnection, tuple[tuple[str, int, int, int], ...]]:
        key = self._scan()
        if self._generation is None or self._generation.key != key:
            self._generation = _Generation(key, self._open_generation(key))
        return self._generation.base.cursor(), key

    def _scan(self) -> tuple[tuple[str, int, int, int], ...]:
        entries = []
        for name in self.tables():
            try:
                st = self._path(name).stat()
            except FileNotFoundError:
                continue
            entries.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(entries)

    def _open_generation(
        self, key: tuple[tuple[str, int, int, int], ...]
    ) -> duckdb.DuckDBPyConnection:
        # a query larger than memory spills here, inside the zone, not into the working directory
        config = {**_duck_config(), "temp_directory": str(self.directory / SPILL_DIR)}
        base = duckdb.connect(":memory:", config=config)
        try:
            for i, (name, *_) in enumerate(key):
                alias = _quote(f"zx_{i}")
                try:
                    base.execute(f"ATTACH ? AS {alias} (READ_ONLY)", [str(self._path(name))])
                except duckdb.IOException:  # dropped since the scan
                    continue
                base.execute(
                    f"CREATE VIEW {_quote(name)} AS SELECT * FROM {alias}.main.{_quote(name)}"
                )
            # from here on no query can touch a file, fetch an extension or undo this
            base.execute("SET enable_external_access = false")
            base.execute("SET lock_configuration = true")
        except BaseException:
            base.close()
            raise
        return base

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
            if self._generation is not None:
                self._generation.base.close()
                self._generation = None


class _PooledCursor(ConnectionWrapper):
    """A DuckDB cursor for the engine's pool, with the generation (set of dataset files) it
    reads."""

    def __init__(
        self, cursor: duckdb.DuckDBPyConnection, generation: tuple[tuple[str, int, int, int], ...]
    ) -> None:
        super().__init__(cursor)
        self.generation = generation


def _duck_config() -> dict[str, Any]:
    return {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- attached tables --------------------------------------------------------------------------


def _portable_sqlalchemy(t: sqltypes.TypeEngine[Any]) -> PortableType | None:
    if isinstance(t, sqltypes.Boolean):
        return "boolean"
    if isinstance(t, sqltypes.Integer):
        return "integer"
    if isinstance(t, sqltypes.Numeric | sqltypes.Float):  # Float is no Numeric in SQLAlchemy 2.1
        return "decimal"
    if isinstance(t, sqltypes.String | sqltypes.Uuid):
        return "text"
    if isinstance(t, sqltypes.DateTime):
        return "timestamp"
    if isinstance(t, sqltypes.Date):
        return "date"
    return None


def _redact(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _check_attach_url(raw: str, allowed_prefixes: Sequence[str]) -> URL:
    """The parsed URL if it lies under an allowed prefix, else ``attach_refused``.

    The decision is made on SQLAlchemy's own rendering of the URL (what would be connected to),
    and the part after the prefix may only name a path or database: no query string (libpq
    reads ``?host=`` as a new host), no credentials, no port, no percent-escapes, no ``..``.
    """
    if not allowed_prefixes:
        raise ZoneStoreError("attach_refused", "attaching tables is disabled on this exchange")
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError, TypeError) as exc:
        raise ZoneStoreError("attach_refused", "not a database URL") from exc
    normalized = url.render_as_string(hide_password=False)
    for prefix in allowed_prefixes:
        if not prefix or not normalized.startswith(prefix):
            continue
        rest = normalized[len(prefix) :]
        if rest and not prefix.endswith("/") and not rest.startswith("/"):
            continue  # "…/attach" must not admit "…/attach-other"
        if not ATTACH_REMAINDER.match(rest):
            continue
        if ".." in rest.split("/") or ".." in (url.database or "").split("/"):
            continue
        if url.get_backend_name() == "sqlite":
            _check_sqlite_path(url, prefix)
        return url
    raise ZoneStoreError(
        "attach_refused", f"{_redact(url)} is not under a prefix the operator allows"
    )


def _check_sqlite_path(url: URL, prefix: str) -> None:
    """A SQLite file must exist and, symlinks resolved, stay inside the prefix's directory."""
    database = url.database or ""
    if not database or database == ":memory:" or not os.path.isabs(database):
        raise ZoneStoreError("attach_refused", "a SQLite attach needs an absolute file path")
    base = make_url(prefix).database or ""
    if not prefix.endswith("/"):
        base = os.path.dirname(base)
    real_base = os.path.realpath(base)
    real = os.path.realpath(database)
    if os.path.commonpath([real_base, real]) != real_base:
        raise ZoneStoreError("attach_refused", "the SQLite file lies outside the allowed directory")
    if not os.path.isfile(real):
        raise ZoneStoreError("not_found", "no such SQLite database file")


def _attached_engine(url: URL) -> Engine:
    backend = url.get_backend_name()
    if backend == "sqlite":
        # read-only at the SQLite level; never creates a file
        ro = url.set(database="file:" + quote(url.database or "")).update_query_dict(
            {"mode": "ro", "uri": "true"}
        )
        return create_engine(ro, poolclass=NullPool)
    if backend == "postgresql":
        return create_engine(
            url,
            pool_size=4,
            pool_pre_ping=True,
            connect_args={"connect_timeout": 10},
            execution_options={"postgresql_readonly": True},
        )
    return create_engine(url, pool_pre_ping=True)


class AttachedTable:
    """A provider's table reached by SQLAlchemy URL. The data stays where it is; ``engine``
    pushes queries down to it. Created by :func:`attach`."""

    def __init__(
        self, engine: Engine, table: str, schema: str | None, columns: Sequence[ColumnInfo]
    ):
        self.engine = engine
        self.table = table
        self.schema = schema
        self.columns = tuple(columns)

    def describe(self) -> TableInfo:
        """Columns, exact row count and snapshot digest, from one streaming read (a single
        statement, so one consistent snapshot on PostgreSQL)."""
        # untyped columns: the driver's own values, never rounded by a SQLAlchemy result type
        names: list[ColumnClause[Any]] = [column(c.name) for c in self.columns]
        stmt = select(*names).select_from(sql_table(self.table, schema=self.schema))
        try:
            with self.engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=BATCH_ROWS).execute(
                    stmt
                )
                n, digest = _digest_rows(self.columns, result.partitions())
        except SQLAlchemyError as exc:
            log.info("attached table read failed: %s", exc)
            raise ZoneStoreError(
                "attach_failed", f"could not read the attached table ({type(exc).__name__})"
            ) from exc
        return TableInfo(self.columns, n, digest)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AttachedTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(url: str, table: str, *, allowed_prefixes: Sequence[str]) -> AttachedTable:
    """Attach ``table`` (``name`` or ``schema.name``) in the database at ``url``.

    Refused (``attach_refused``) unless the URL, as SQLAlchemy normalizes it, starts with one of
    ``allowed_prefixes`` and adds only a path or database name (see :func:`_check_attach_url`).
    Reflects the columns (each must map to the portable vocabulary, else ``unsupported_type``);
    :meth:`AttachedTable.describe` then counts the rows and computes the digest.
    """
    parsed = _check_attach_url(url, allowed_prefixes)
    m = ATTACH_NAME.match(table) if isinstance(table, str) else None
    if m is None:
        raise ZoneStoreError("bad_name", "the attached table must be a simple [schema.]name")
    schema, name = m.group(1), m.group(2)
    try:
        engine = _attached_engine(parsed)
    except (SQLAlchemyError, ImportError) as exc:
        raise ZoneStoreError("attach_failed", f"no usable driver for {parsed.drivername}") from exc
    try:
        reflected = inspect(engine).get_columns(name, schema=schema)
    except NoSuchTableError as exc:
        engine.dispose()
        raise ZoneStoreError("not_found", f"no table {table!r} in the attached database") from exc
    except SQLAlchemyError as exc:
        engine.dispose()
        log.info("attach of %s failed: %s", _redact(parsed), exc)
        raise ZoneStoreError(
            "attach_failed", f"could not open the attached table ({type(exc).__name__})"
        ) from exc
    columns = []
    for col in reflected:
        kind = _portable_sqlalchemy(col["type"])
        if kind is None:
            engine.dispose()
            raise ZoneStoreError(
                "unsupported_type", f"column {col['name']!r} has unsupported type {col['type']}"
            )
        columns.append(ColumnInfo(col["name"], kind))
    if not columns:
        engine.dispose()
        raise ZoneStoreError("not_found", f"no table {table!r} in the attached database")
    return AttachedTable(engine, name, schema, columns)
