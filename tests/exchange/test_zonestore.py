"""Zone data plane: imports are all-or-nothing, the snapshot digest is engine-independent, attach
is confined to operator prefixes, and the query engine cannot reach the file system."""

from __future__ import annotations

import os
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from exchange.errors import ZonexError
from exchange.node.store import (
    ColumnInfo,
    TableInfo,
    ZoneStore,
    ZoneStoreError,
    _describe_duck,
    _digest_rows,
    attach,
    row_count_band,
)

CSV = (
    "company_id,district,tax_paid,employees,founded,audited_at,listed\n"
    "007,黄浦,1200.50,10,2001-02-03,2025-01-02 03:04:05,true\n"
    "8,putuo,1e20,,2010-12-31,2025-06-30 23:59:59.123456,false\n"
    "9,,-0.0,-3,,,\n"
    "10,税务局 🏛️ e\u0301,0.00001,7,1999-01-01,2020-02-29 00:00:00,true\n"
)
ROWS_FOR_SQLITE = [
    ("007", "黄浦", 1200.5, 10, "2001-02-03", "2025-01-02 03:04:05", 1),
    ("8", "putuo", 1e20, None, "2010-12-31", "2025-06-30 23:59:59.123456", 0),
    ("9", None, -0.0, -3, None, None, None),
    ("10", "税务局 🏛️ e\u0301", 0.00001, 7, "1999-01-01", "2020-02-29 00:00:00", 1),
]
SQLITE_DDL = (
    "CREATE TABLE companies (company_id TEXT, district TEXT, tax_paid REAL, employees INTEGER, "
    "founded DATE, audited_at TIMESTAMP, listed BOOLEAN)"
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ZoneStore]:
    s = ZoneStore(tmp_path / "zone")
    try:
        yield s
    finally:
        s.close()


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def state(store: ZoneStore) -> tuple[list[str], list[str]]:
    """What a refused operation must leave untouched: the datasets and every file."""
    files = sorted(p.name for p in (store.directory / "tables").iterdir())
    return store.tables(), files


def sqlite_table(path: Path, rows: list[tuple[object, ...]], ddl: str = SQLITE_DDL) -> Path:
    db = sqlite3.connect(path)
    db.execute(ddl)
    marks = ", ".join("?" * len(rows[0]))
    db.executemany(f"INSERT INTO companies VALUES ({marks})", rows)
    db.commit()
    db.close()
    return path


# -- import ----------------------------------------------------------------------------------


def test_import_csv_keeps_names_infers_types_and_describes(
    store: ZoneStore, tmp_path: Path
) -> None:
    info = store.import_csv("companies", write(tmp_path / "c.csv", CSV))
    assert info.columns == (
        ColumnInfo("company_id", "text"),  # leading zeros: an identifier, not a number
        ColumnInfo("district", "text"),
        ColumnInfo("tax_paid", "decimal"),
        ColumnInfo("employees", "integer"),
        ColumnInfo("founded", "date"),
        ColumnInfo("audited_at", "timestamp"),
        ColumnInfo("listed", "boolean"),
    )
    assert info.row_count == 4
    assert len(info.digest) == 64 and int(info.digest, 16) >= 0
    assert store.describe("companies") == info
    assert store.tables() == ["companies"] and store.has_table("companies")
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT company_id, district, employees FROM companies ORDER BY company_id")
        ).all()
    assert [tuple(r) for r in rows] == [
        ("007", "黄浦", 10),
        ("10", "税务局 🏛️ e\u0301", 7),
        ("8", "putuo", None),
        ("9", None, -3),
    ]


def test_import_parquet_maps_types_to_the_portable_vocabulary(
    store: ZoneStore, tmp_path: Path
) -> None:
    table = pa.table(
        {
            "id": pa.array([1, 2, None], pa.int64()),
            "small": pa.array([1, 2, 3], pa.int16()),
            "amount": pa.array([Decimal("1.50"), None, Decimal("-0.05")], pa.decimal128(18, 2)),
            "ratio": pa.array([0.1, None, 1e-7], pa.float64()),
            "ratio32": pa.array([0.5, 1.5, None], pa.float32()),
            "name": pa.array(["a", "税", None], pa.string()),
            "kind": pa.array(["x", "y", "x"]).dictionary_encode(),
            "ok": pa.array([True, None, False]),
            "day": pa.array([date(2025, 1, 1), None, date(1, 1, 1)], pa.date32()),
            "at": pa.array([datetime(2025, 1, 1, 1, 2, 3, 4), None, None], pa.timestamp("us")),
            "at_ns": pa.array([datetime(2025, 1, 1), None, None], pa.timestamp("ns")),
            "at_tz": pa.array(
                [datetime(2025, 1, 1, tzinfo=UTC), None, None], pa.timestamp("us", tz="UTC")
            ),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    info = store.import_parquet("things", tmp_path / "t.parquet")
    assert {c.name: c.type for c in info.columns} == {
        "id": "integer",
        "small": "integer",
        "amount": "decimal",
        "ratio": "decimal",
        "ratio32": "decimal",
        "name": "text",
        "kind": "text",
        "ok": "boolean",
        "day": "date",
        "at": "timestamp",
        "at_ns": "timestamp",
        "at_tz": "timestamp",
    }
    assert info.row_count == 3
    assert store.describe("things") == info


def test_a_zero_row_parquet_file_is_a_valid_empty_dataset(store: ZoneStore, tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), tmp_path / "e.parquet")
    info = store.import_parquet("empty", tmp_path / "e.parquet")
    assert info.row_count == 0 and row_count_band(info.row_count) == "0"


def test_a_late_value_that_breaks_the_sampled_type_falls_back_to_text(
    store: ZoneStore, tmp_path: Path
) -> None:
    body = "code,n\n" + "".join(f"{i},{i}\n" for i in range(60_000)) + "A17,1\n"
    info = store.import_csv("codes", write(tmp_path / "late.csv", body))
    assert info.columns == (ColumnInfo("code", "text"), ColumnInfo("n", "integer"))
    assert info.row_count == 60_001


# -- refusals leave the store unchanged -----------------------------------------------------

BAD_CSV = {
    "empty_file": b"",
    "blank_file": b"\n\n",
    "header_only": b"a,b\n",
    "header_without_newline": b"a,b",
    "ragged_long_row": b"a,b\n1,2\n3,4,5\n",
    "ragged_short_row": b"a,b,c\n1,2,3\n4,5\n6,7,8\n",
    "ragged_row_after_the_sniff_sample": b"a,b\n" + b"1,2\n" * 50_000 + b"3,SECRET123,9\n",
    "latin1_encoding": "a,b\n1,Café\n".encode("latin-1"),
    "utf16_encoding": "a,b\n1,2\n".encode("utf-16"),
    "binary_garbage": b"\xff\xfe\x00garbage\x00\x01",
    "no_header_numbers": b"1,2\n3,4\n",
    "duplicate_columns": b"a,a\n1,2\n",
    "uppercase_column": b"Tax,b\n1,2\n",
    "column_with_space": b"tax paid,b\n1,2\n",
    "empty_column_name": b"a,\n1,2\n",
    "non_ascii_column": "税额,b\n1,2\n".encode(),
    "semicolon_delimited": b"a;b\n1;2\n",
    "unterminated_quote": b'a,b\n"x,2\n3,4\n',
}


@pytest.mark.parametrize("content", list(BAD_CSV.values()), ids=list(BAD_CSV))
def test_bad_csv_is_refused_and_leaves_the_store_unchanged(
    store: ZoneStore, tmp_path: Path, content: bytes
) -> None:
    store.import_csv("existing", write(tmp_path / "ok.csv", "a,b\n1,2\n"))
    before = state(store)
    with pytest.raises(ZoneStoreError) as info:
        store.import_csv("bad", write(tmp_path / "bad.csv", content))
    assert info.value.code == "bad_csv"
    assert "SECRET123" not in str(info.value)  # refusals never quote the rows
    assert str(tmp_path) not in str(info.value)  # nor the server's paths
    assert state(store) == before
    assert not store.has_table("bad")


def test_a_missing_csv_file_is_refused(store: ZoneStore, tmp_path: Path) -> None:
    with pytest.raises(ZoneStoreError) as info:
        store.import_csv("bad", tmp_path / "nope.csv")
    assert info.value.code == "bad_csv"
    assert state(store) == ([], [])


@pytest.mark.parametrize(
    "content",
    [b"", b"PAR1", b"not a parquet file at all", b"PAR1" + b"\x00" * 64 + b"PAR1"],
    ids=["empty", "magic_only", "text", "truncated"],
)
def test_unreadable_parquet_is_refused(store: ZoneStore, tmp_path: Path, content: bytes) -> None:
    before = state(store)
    with pytest.raises(ZoneStoreError) as info:
        store.import_parquet("bad", write(tmp_path / "bad.parquet", content))
    assert info.value.code == "bad_parquet"
    assert str(tmp_path) not in str(info.value)
    assert state(store) == before


def test_parquet_with_bad_names_or_types_is_refused(store: ZoneStore, tmp_path: Path) -> None:
    pq.write_table(pa.table({"Amount": [1]}), tmp_path / "upper.parquet")
    pq.write_table(pa.table({"a": pa.array([[1, 2]])}), tmp_path / "nested.parquet")
    pq.write_table(pa.table({"a": pa.array([b"\x00"], pa.binary())}), tmp_path / "blob.parquet")
    with pytest.raises(ZoneStoreError) as info:
        store.import_parquet("t", tmp_path / "upper.parquet")
    assert info.value.code == "bad_parquet"
    for name in ("nested", "blob"):
        with pytest.raises(ZoneStoreError) as info:
            store.import_parquet("t", tmp_path / f"{name}.parquet")
        assert info.value.code == "unsupported_type"
    assert state(store) == ([], [])


def test_an_existing_name_is_refused_and_the_first_table_kept(
    store: ZoneStore, tmp_path: Path
) -> None:
    first = store.import_csv("companies", write(tmp_path / "a.csv", "a\n1\n"))
    pq.write_table(pa.table({"a": [2, 3]}), tmp_path / "b.parquet")
    before = state(store)
    with pytest.raises(ZoneStoreError) as info:
        store.import_csv("companies", write(tmp_path / "b.csv", "a\n2\n"))
    assert info.value.code == "table_exists" and info.value.status == 409
    with pytest.raises(ZoneStoreError) as info:
        store.import_parquet("companies", tmp_path / "b.parquet")
    assert info.value.code == "table_exists"
    assert state(store) == before
    assert store.describe("companies") == first


def test_racing_imports_of_one_name_publish_exactly_one(store: ZoneStore, tmp_path: Path) -> None:
    sources = [write(tmp_path / f"{i}.csv", f"a\n{i}\n") for i in range(6)]
    outcomes: list[str] = []

    def run(source: Path) -> None:
        try:
            store.import_csv("race", source)
            outcomes.append("ok")
        except ZoneStoreError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=run, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["table_exists"] * 5
    assert state(store)[1] == ["race.duckdb"]


@pytest.mark.parametrize(
    "name",
    ["", "Companies", "1abc", "_x", "a-b", "a b", 'a"b', "a;drop", "x" * 64, "main", "税"],
)
def test_bad_names_are_refused(store: ZoneStore, tmp_path: Path, name: str) -> None:
    source = write(tmp_path / "ok.csv", "a\n1\n")
    for call in (
        lambda: store.import_csv(name, source),
        lambda: store.describe(name),
        lambda: store.drop(name),
    ):
        with pytest.raises(ZoneStoreError) as info:
            call()
        assert info.value.code == "bad_name"
    assert state(store) == ([], [])


def test_describe_and_drop_of_a_missing_table(store: ZoneStore) -> None:
    for call in (lambda: store.describe("nope"), lambda: store.drop("nope")):
        with pytest.raises(ZoneStoreError) as info:
            call()
        assert info.value.code == "not_found" and info.value.status == 404


def test_drop_then_reimport_is_seen_by_the_engine(store: ZoneStore, tmp_path: Path) -> None:
    store.import_csv("t", write(tmp_path / "a.csv", "a\n1\n"))
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT sum(a) FROM t")).scalar() == 1
    store.drop("t")
    assert not store.has_table("t")
    store.import_csv("t", write(tmp_path / "b.csv", "a\n2\n3\n"))
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT sum(a) FROM t")).scalar() == 5


def test_the_error_is_a_value_error_in_the_exchange_tree() -> None:
    exc = ZoneStoreError("bad_csv", "no")
    assert isinstance(exc, ValueError) and isinstance(exc, ZonexError)
    assert (exc.code, exc.status, exc.detail) == ("bad_csv", 422, "no")
    assert ZoneStoreError("attach_refused", "no").status == 403


# -- the query engine -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "COPY (SELECT * FROM t) TO 'leak.csv'",
        "ATTACH '/tmp/other.duckdb' AS other",
        "SET enable_external_access = true",
        "INSTALL httpfs",
        "INSERT INTO t VALUES (9)",
        "DROP TABLE zx_0.main.t",
    ],
)
def test_the_engine_reaches_no_file_and_writes_nothing(
    store: ZoneStore, tmp_path: Path, sql: str
) -> None:
    store.import_csv("t", write(tmp_path / "a.csv", "a\n1\n"))
    with store.engine.connect() as conn, pytest.raises(Exception) as info:
        conn.execute(text(sql))
    assert "Error" in type(info.value).__name__
    assert not (tmp_path / "leak.csv").exists() and not Path("leak.csv").exists()
    assert store.describe("t").row_count == 1


def test_the_engine_spills_inside_the_zone(store: ZoneStore) -> None:
    with store.engine.connect() as conn:
        spill = conn.execute(text("SELECT current_setting('temp_directory')")).scalar()
    assert Path(spill) == store.directory / "spill"


def test_readers_in_another_process_do_not_block_imports(store: ZoneStore, tmp_path: Path) -> None:
    store.import_csv("first", write(tmp_path / "a.csv", "a\n1\n2\n"))
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from pathlib import Path\n"
            "from sqlalchemy import text\n"
            "from exchange.node.store import ZoneStore\n"
            "s = ZoneStore(Path(sys.argv[1]))\n"
            "with s.engine.connect() as c:\n"
            "    assert c.execute(text('SELECT count(*) FROM first')).scalar() == 2\n"
            "    print('holding', flush=True)\n"
            "    sys.stdin.readline()\n"
            "    assert c.execute(text('SELECT count(*) FROM first')).scalar() == 2\n"
            "with s.engine.connect() as c:\n"
            "    print(c.execute(text('SELECT count(*) FROM second')).scalar(), flush=True)\n",
            str(store.directory),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    ) as reader:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "holding"
        # the other process holds an open read connection while this one imports
        store.import_csv("second", write(tmp_path / "b.csv", "b\n1\n2\n3\n"))
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM first")).scalar() == 2
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "3"
        assert reader.wait(timeout=60) == 0


# -- snapshot digest ------------------------------------------------------------------------


def test_digest_ignores_row_order_and_sees_any_changed_value(
    store: ZoneStore, tmp_path: Path
) -> None:
    header, *lines = CSV.splitlines(keepends=True)
    base = store.import_csv("a", write(tmp_path / "a.csv", CSV))
    shuffled = store.import_csv("b", write(tmp_path / "b.csv", header + "".join(lines[::-1])))
    assert shuffled.digest == base.digest
    changed = CSV.replace("1200.50", "1200.51")
    assert store.import_csv("c", write(tmp_path / "c.csv", changed)).digest != base.digest
    dup = store.import_csv("d", write(tmp_path / "d.csv", CSV + lines[0]))
    assert dup.digest != base.digest  # duplicates count
    renamed = CSV.replace("listed", "is_listed", 1)
    assert store.import_csv("e", write(tmp_path / "e.csv", renamed)).digest != base.digest


def test_digest_separates_null_empty_and_shifted_values(store: ZoneStore, tmp_path: Path) -> None:
    digests = {
        store.import_csv(f"t{i}", write(tmp_path / f"{i}.csv", body)).digest
        for i, body in enumerate(
            [
                'a,b\n"x",\n',  # NULL in b
                'a,b\n"x",""\n',  # empty string in b
                'a,b\n"",x\n',  # values swapped
                'a,b\n"x~",\n',
                'a,b\n"1:x",\n',
            ]
        )
    }
    assert len(digests) == 5


def test_imported_duckdb_and_attached_sqlite_give_the_same_digest(
    store: ZoneStore, tmp_path: Path
) -> None:
    imported = store.import_csv("companies", write(tmp_path / "c.csv", CSV))
    attach_dir = tmp_path / "attach"
    attach_dir.mkdir()
    db = sqlite_table(attach_dir / "tax.db", ROWS_FOR_SQLITE[::-1])
    with attach(
        f"sqlite:///{db}", "companies", allowed_prefixes=[f"sqlite:///{attach_dir}/"]
    ) as attached:
        info = attached.describe()
    assert info == imported


def test_parquet_and_csv_of_the_same_rows_give_the_same_digest(
    store: ZoneStore, tmp_path: Path
) -> None:
    pq.write_table(
        pa.table({"a": [1, None, 3], "b": ["x", "y", None], "c": [0.5, 1e-7, None]}),
        tmp_path / "t.parquet",
    )
    body = "a,b,c\n3,,\n1,x,0.5\n,y,1e-07\n"
    assert (
        store.import_parquet("p", tmp_path / "t.parquet").digest
        == store.import_csv("c", write(tmp_path / "t.csv", body)).digest
    )


def test_timezone_aware_timestamps_digest_as_utc(store: ZoneStore, tmp_path: Path) -> None:
    shanghai = datetime(2025, 1, 1, 8, 0, tzinfo=UTC).astimezone(ZoneInfo("Asia/Shanghai"))
    pq.write_table(
        pa.table({"at": pa.array([shanghai], pa.timestamp("us", tz="Asia/Shanghai"))}),
        tmp_path / "tz.parquet",
    )
    info = store.import_parquet("tz", tmp_path / "tz.parquet")
    rows = [[datetime(2025, 1, 1, 8, 0, tzinfo=UTC)]]
    assert info.digest == _digest_rows(info.columns, [rows])[1]


def test_negative_nan_and_zero_digest_like_python() -> None:
    """NaN with its sign bit set prints as "-nan" in DuckDB, -0.0 as "-0": they digest as
    Python's "nan" and "0", also in a column of nothing but NaN (where DuckDB's optimizer,
    knowing the column's statistics, once folded the "-nan" test away)."""
    negative_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8000000000000))[0]
    columns = (ColumnInfo("c0", "decimal"),)
    for rows in (
        [[negative_nan]],
        [[negative_nan], [float("nan")]],
        [[negative_nan], [float("nan")], [-0.0], [0.0], [1.5]],
        [[-0.0]],
    ):
        con = duckdb.connect()
        try:
            con.execute("CREATE TABLE t (c0 DOUBLE)")
            con.executemany("INSERT INTO t VALUES (?)", rows)
            in_engine = _describe_duck(con, "t")
        finally:
            con.close()
        assert in_engine == TableInfo(columns, len(rows), _digest_rows(columns, [rows])[1]), rows


VALUES = {
    "integer": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "decimal": st.floats(allow_nan=True, allow_infinity=True, width=64),
    "text": st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00")),
    "boolean": st.booleans(),
    "date": st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)),
    "timestamp": st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
}
DUCK_TYPES = {
    "integer": "BIGINT",
    "decimal": "DOUBLE",
    "text": "VARCHAR",
    "boolean": "BOOLEAN",
    "date": "DATE",
    "timestamp": "TIMESTAMP",
}


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[str], list[list[object]]]:
    kinds = draw(st.lists(st.sampled_from(sorted(VALUES)), min_size=1, max_size=6))
    rows = draw(
        st.lists(
            st.tuples(*[st.none() | VALUES[k] for k in kinds]).map(list), min_size=0, max_size=25
        )
    )
    return kinds, rows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_the_duckdb_and_python_digests_are_one_definition(
    table: tuple[list[str], list[list[object]]],
) -> None:
    kinds, rows = table
    con = duckdb.connect()
    try:
        cols = ", ".join(f"c{i} {DUCK_TYPES[k]}" for i, k in enumerate(kinds))
        con.execute(f"CREATE TABLE t ({cols})")
        if rows:
            con.executemany(f"INSERT INTO t VALUES ({', '.join('?' * len(kinds))})", rows)
        in_engine = _describe_duck(con, "t")
    finally:
        con.close()
    columns = tuple(ColumnInfo(f"c{i}", k) for i, k in enumerate(kinds))  # type: ignore[arg-type]
    assert in_engine == TableInfo(columns, len(rows), _digest_rows(columns, [rows])[1])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.decimals(
            allow_nan=False, allow_infinity=False, places=4, min_value=-(10**13), max_value=10**13
        ),
        max_size=20,
    )
)
def test_decimal_columns_digest_like_python_decimals(values: list[Decimal]) -> None:
    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE t (d DECIMAL(18, 4))")
        if values:
            con.executemany("INSERT INTO t VALUES (?)", [[v] for v in values])
        in_engine = _describe_duck(con, "t")
    finally:
        con.close()
    columns = (ColumnInfo("d", "decimal"),)
    assert in_engine.digest == _digest_rows(columns, [[[v] for v in values]])[1]


def test_equal_numbers_digest_equally_across_representations() -> None:
    columns = (ColumnInfo("d", "decimal"),)

    def digest(v: object) -> str:
        return _digest_rows(columns, [[[v]]])[1]

    assert digest(12.0) == digest(Decimal("12.000")) == digest(12)
    assert digest(0.1) == digest(Decimal("0.1"))
    assert digest(1e20) == digest(Decimal("1E+20")) == digest(10**20)
    assert digest(-0.0) == digest(0.0) == digest(Decimal("-0.00"))
    assert digest(0.1) != digest(0.1000000000000001)


# -- attach -----------------------------------------------------------------------------------


@pytest.fixture
def attach_dir(tmp_path: Path) -> Path:
    d = tmp_path / "srv" / "attach"
    d.mkdir(parents=True)
    sqlite_table(d / "tax.db", ROWS_FOR_SQLITE)
    return d


def test_attach_a_sqlite_table_under_an_allowed_prefix(attach_dir: Path) -> None:
    with attach(
        f"sqlite:///{attach_dir}/tax.db",
        "companies",
        allowed_prefixes=["postgresql+psycopg://db.internal/", f"sqlite:///{attach_dir}/"],
    ) as attached:
        info = attached.describe()
        assert [c.name for c in info.columns][:2] == ["company_id", "district"]
        assert info.row_count == 4
        with attached.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM companies")).scalar() == 4
            with pytest.raises(Exception, match="readonly"):
                conn.execute(text("DELETE FROM companies"))


def test_attach_without_prefixes_is_refused(attach_dir: Path) -> None:
    with pytest.raises(ZoneStoreError) as info:
        attach(f"sqlite:///{attach_dir}/tax.db", "companies", allowed_prefixes=[])
    assert info.value.code == "attach_refused" and info.value.status == 403


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{d}/../tax.db",  # traversal out of the directory
        "sqlite:///{d}/../attach/tax.db",  # traversal, even when it lands back inside
        "sqlite:///{d}/./../../etc/passwd",
        "sqlite:///{d}-evil/tax.db",  # a sibling directory sharing the prefix's spelling
        "sqlite:///{d}",  # the directory itself
        "sqlite:////etc/passwd",
        "sqlite://",  # in-memory
        "sqlite+pysqlite:///{d}/tax.db",  # a different driver than the operator allowed
        "postgresql+psycopg://db.internal/warehouse",  # a different scheme
        "postgresql+psycopg://db.internal:5433/warehouse",
        "sqlite:///{d}/tax.db?mode=rw",  # query options are never the provider's to set
        "sqlite:///{d}/%2E%2E/x/tax.db",  # traversal spelled with escapes
        "not a url",
        "",
    ],
)
def test_attach_outside_the_allowed_prefix_is_refused(attach_dir: Path, url: str) -> None:
    with pytest.raises(ZoneStoreError) as info:
        attach(url.format(d=attach_dir), "companies", allowed_prefixes=[f"sqlite:///{attach_dir}/"])
    assert info.value.code == "attach_refused"


@pytest.mark.parametrize(
    ("url", "prefix"),
    [
        (
            "postgresql+psycopg://db.internal/warehouse?host=10.0.0.9",
            "postgresql+psycopg://db.internal/",
        ),
        ("postgresql+psycopg://db.internal/?host=/tmp", "postgresql+psycopg://db.internal/"),
        ("postgresql+psycopg://evil@db.internal/warehouse", "postgresql+psycopg://db.internal/"),
        ("postgresql+psycopg://db.internal.evil.example/w", "postgresql+psycopg://db.internal"),
        ("postgresql+psycopg://db.internal/ware/../x", "postgresql+psycopg://db.internal/"),
        (
            "postgresql+psycopg://db.internal/warehouse2",
            "postgresql+psycopg://db.internal/warehouse",
        ),
    ],
)
def test_attach_refuses_host_and_option_tricks(url: str, prefix: str) -> None:
    with pytest.raises(ZoneStoreError) as info:
        attach(url, "t", allowed_prefixes=[prefix])
    assert info.value.code == "attach_refused"


def test_attach_refuses_a_symlink_leading_out(attach_dir: Path, tmp_path: Path) -> None:
    outside = sqlite_table(tmp_path / "secret.db", ROWS_FOR_SQLITE)
    (attach_dir / "link.db").symlink_to(outside)
    with pytest.raises(ZoneStoreError) as info:
        attach(
            f"sqlite:///{attach_dir}/link.db",
            "companies",
            allowed_prefixes=[f"sqlite:///{attach_dir}/"],
        )
    assert info.value.code == "attach_refused"


def test_attach_never_creates_a_database_file(attach_dir: Path) -> None:
    with pytest.raises(ZoneStoreError) as info:
        attach(f"sqlite:///{attach_dir}/new.db", "t", allowed_prefixes=[f"sqlite:///{attach_dir}/"])
    assert info.value.code == "not_found"
    assert not (attach_dir / "new.db").exists()


def test_attach_reports_missing_tables_bad_names_and_types(attach_dir: Path) -> None:
    prefix = [f"sqlite:///{attach_dir}/"]
    url = f"sqlite:///{attach_dir}/tax.db"
    with pytest.raises(ZoneStoreError) as info:
        attach(url, "nope", allowed_prefixes=prefix)
    assert info.value.code == "not_found"
    with pytest.raises(ZoneStoreError) as info:
        attach(url, 'companies"; DROP TABLE companies; --', allowed_prefixes=prefix)
    assert info.value.code == "bad_name"
    db = sqlite3.connect(attach_dir / "tax.db")
    db.execute("CREATE TABLE blobs (id INTEGER, payload BLOB)")
    db.execute("CREATE TABLE untyped (id, v)")
    db.commit()
    db.close()
    for table in ("blobs", "untyped"):
        with pytest.raises(ZoneStoreError) as info:
            attach(url, table, allowed_prefixes=prefix)
        assert info.value.code == "unsupported_type"


def test_attached_values_that_contradict_the_declared_type_are_refused(attach_dir: Path) -> None:
    db = sqlite3.connect(attach_dir / "tax.db")
    db.execute("CREATE TABLE loose (n INTEGER)")
    db.execute("INSERT INTO loose VALUES ('SECRET123')")  # SQLite keeps text in an INTEGER column
    db.commit()
    db.close()
    with (
        attach(
            f"sqlite:///{attach_dir}/tax.db", "loose", allowed_prefixes=[f"sqlite:///{attach_dir}/"]
        ) as attached,
        pytest.raises(ZoneStoreError) as info,
    ):
        attached.describe()
    assert info.value.code == "attach_failed"
    assert "SECRET123" not in str(info.value)


# -- row-count bands ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "band"),
    [
        (0, "0"),
        (1, "1-99"),
        (99, "1-99"),
        (100, "100-999"),
        (999, "100-999"),
        (1_000, "1k-9.9k"),
        (9_999, "1k-9.9k"),
        (10_000, "10k-99k"),
        (99_999, "10k-99k"),
        (100_000, "100k-999k"),
        (999_999, "100k-999k"),
        (1_000_000, "1M-9.9M"),
        (9_999_999, "1M-9.9M"),
        (10_000_000, "10M-99M"),
        (100_000_000, "100M-999M"),
        (1_000_000_000, "1B-9.9B"),
        (999_999_999_999, "100B-999B"),
        (10**12, "1T+"),
        (10**15, "1T+"),
    ],
)
def test_row_count_band_boundaries(n: int, band: str) -> None:
    assert row_count_band(n) == band


def test_row_count_band_refuses_negative_counts() -> None:
    with pytest.raises(ValueError):
        row_count_band(-1)


def test_tables_ignore_files_that_are_not_published_datasets(store: ZoneStore) -> None:
    tables_dir = store.directory / "tables"
    (tables_dir / ".import-x-0123.duckdb").write_bytes(b"")
    (tables_dir / "Upper.duckdb").write_bytes(b"")
    assert store.tables() == []
    old = tables_dir / ".import-y-4567.duckdb"
    old.write_bytes(b"")
    long_ago = (datetime.now() - timedelta(days=2)).timestamp()
    os.utime(old, (long_ago, long_ago))
    ZoneStore(store.directory).close()  # a new store sweeps abandoned import files
    assert not old.exists() and (tables_dir / ".import-x-0123.duckdb").exists()
