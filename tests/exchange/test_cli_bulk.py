"""Bulk work a data owner does from the shell, against a real server: ``zonex consent import``
(many consents in one call, all or nothing) and the CSV import options of ``zonex dataset
register|publish`` (delimiter, encoding, header renames, errors naming line and column)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from crypto.keys import SigningKey
from exchange.cli import app
from exchange.keyfile import write_private_key
from exchange.server.models import ConsentRow, LedgerEntryRow
from tests.conftest import L2_LEVELS, LiveServer, tax_bureau_and_bank

PURPOSE = "credit-assessment"


@pytest.fixture
def keys(server: LiveServer, tmp_path: Path) -> dict[str, Path]:
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    # the bank has asked for access, so the bureau may name it (a principal with nothing on
    # the bureau's zones is named by its full key id only)
    with server.client(consumer) as c:
        c.request_access(
            "tax", ["companies"], ["aggregate"], PURPOSE, duration_seconds=86400, justification="x"
        )
    paths = {}
    for name, key in (("provider", provider), ("consumer", consumer)):
        paths[name] = tmp_path / f"{name}.key"
        write_private_key(paths[name], key)
    paths["consumer_id"] = Path(consumer.key_id)
    return paths


def run(server: LiveServer, key: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, [*args, "--url", server.url, "--key", str(key)], catch_exceptions=False
    )
    return result.exit_code, result.output


def ledger(server: LiveServer, kind: str) -> list[dict[str, Any]]:
    with Session(server.exchange.engine) as s:
        bodies = s.execute(select(LedgerEntryRow.body).order_by(LedgerEntryRow.seq)).scalars()
        return [e for e in (json.loads(b) for b in bodies) if e["kind"] == kind]


def consent_count(server: LiveServer) -> int:
    with Session(server.exchange.engine) as s:
        return len(s.execute(select(ConsentRow.id)).all())


# -- consent import ----------------------------------------------------------------------------


def test_consent_import_records_every_row_in_order(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    consumer_id = str(keys["consumer_id"])
    # a key id prefix names a consumer the provider can see (one with a consent on its zone)
    code, out = run(
        server, keys["provider"], "consent", "add", "tax", "--subject", "91310000Z",
        "--consumer", consumer_id, "--purpose", PURPOSE,
    )  # fmt: skip
    assert code == 0, out
    csv_file = tmp_path / "consents.csv"
    csv_file.write_text(
        "subject,consumer,purpose,expires,days\n"
        f"91310000A,City Bank,{PURPOSE},2099-06-30,\n"
        f"91310000B,{consumer_id},{PURPOSE},2099-06-30T18:00:00+08:00,\n"
        f"91310000C,{consumer_id[:10]},{PURPOSE},,30\n"
        "\n"
        f'"91310000D, branch",City Bank,{PURPOSE},,365\n',
        "utf-8",
    )
    code, out = run(server, keys["provider"], "consent", "import", "tax", str(csv_file))
    assert code == 0, out
    pairs = re.findall(r"^(\d+),(consent-[0-9a-f]+)$", out, re.M)
    assert [line for line, _ in pairs] == ["2", "3", "4", "6"]
    assert "4 consents recorded in zone tax" in out

    # one consent.recorded entry per consent, as consent add makes, in row order
    recorded = ledger(server, "consent.recorded")[1:]
    assert [e["refs"]["consent"] for e in recorded] == [cid for _, cid in pairs]
    assert {e["refs"]["consumer"] for e in recorded} == {consumer_id}
    assert all(set(e["digests"]) == {"subject"} for e in recorded)
    assert len({e["digests"]["subject"] for e in recorded}) == 4
    # nothing answered echoes a keyed digest of a subject
    for e in recorded:
        assert e["digests"]["subject"] not in out

    code, listed = run(server, keys["provider"], "consents", "tax", "--json")
    assert code == 0 and all(cid in listed for _, cid in pairs)
    assert "91310000" not in listed

    # --json: the exchange's answer, ids in row order
    again = tmp_path / "again.tsv"
    again.write_text(
        f"subject\tconsumer\tpurpose\tdays\n91310000E\tCity Bank\t{PURPOSE}\t7\n", "utf-8"
    )
    code, out = run(
        server, keys["provider"], "consent", "import", "tax", str(again), "--delimiter", "\\t",
        "--json",
    )  # fmt: skip
    assert code == 0, out
    answer = json.loads(out[out.index("{") :])
    assert answer["recorded"] == 1 and answer["zone"] == "tax" and len(answer["ids"]) == 1


def test_consent_import_refuses_the_whole_file_naming_lines(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    before = len(ledger(server, "consent.recorded"))
    csv_file = tmp_path / "consents.csv"
    csv_file.write_text(
        "subject,consumer,purpose,expires\n"
        f"91310000A,City Bank,{PURPOSE},2099-01-01\n"
        f"9131\u200b0000B,City Bank,{PURPOSE},2099-01-01\n"  # a format character
        f"91310000C,Nobody Bank,{PURPOSE},2099-01-01\n"
        "91310000D,City Bank,gambling,2099-01-01\n"
        f"91310000E,City Bank,{PURPOSE},2001-01-01\n",
        "utf-8",
    )
    code, out = run(server, keys["provider"], "consent", "import", "tax", str(csv_file))
    assert code == 1 and "Traceback" not in out
    assert "4 of 5 rows are invalid" in out and "nothing was recorded" in out
    assert "line 3: subject: a subject id holds a control or format character (U+200B)" in out
    assert "line 4: consumer: no consumer 'Nobody Bank' among the principals you can see" in out
    assert "line 5: purpose: unknown purpose 'gambling'" in out
    assert "line 6: expires_at: expires_at is in the past" in out
    assert "line 2" not in out
    assert "9131\u200b0000B" not in out  # the refused subject is not echoed
    assert len(ledger(server, "consent.recorded")) == before and consent_count(server) == 0

    # many wrong rows: the first 20 named, the rest counted
    many = tmp_path / "many.csv"
    many.write_text(
        "subject,consumer,purpose,days\n"
        + "".join(f"9131{i:04d},City Bank,gambling,30\n" for i in range(25)),
        "utf-8",
    )
    code, out = run(server, keys["provider"], "consent", "import", "tax", str(many))
    assert code == 1 and "25 of 25 rows are invalid" in out
    assert "line 21: purpose" in out and "line 22: purpose" not in out
    assert "... and 5 more" in out and consent_count(server) == 0

    # problems the CLI sees before sending anything: lines named, nothing sent
    local = tmp_path / "local.csv"
    local.write_text(
        "subject,consumer,purpose,expires\n"
        f"91310000A,City Bank,{PURPOSE},next year\n"
        f"91310000B,City Bank,{PURPOSE}\n"
        f",City Bank,{PURPOSE},2099-01-01\n"
        f"91310000C,City Bank,{PURPOSE},2099-01-01T00:00:00\n",
        "utf-8",
    )
    code, out = run(server, keys["provider"], "consent", "import", "tax", str(local))
    assert code == 1 and "Traceback" not in out
    assert "line 2: expires 'next year' is not an RFC 3339 date" in out
    assert "line 3: 3 fields, the header has 4" in out
    assert "line 4: subject is empty" in out
    assert "line 5: expires '2099-01-01T00:00:00' needs a time zone" in out
    assert consent_count(server) == 0

    # a header without the needed columns: one line naming them
    header = tmp_path / "header.csv"
    header.write_text("id,bank,purpose\n1,City Bank,x\n", "utf-8")
    code, out = run(server, keys["provider"], "consent", "import", "tax", str(header))
    assert code == 1 and len(out.strip().splitlines()) == 1
    assert "needs the columns subject, consumer, expires or days" in out


def test_consent_import_is_for_the_provider_and_bounded(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    csv_file = tmp_path / "consents.csv"
    csv_file.write_text(
        f"subject,consumer,purpose,days\n91310000A,City Bank,{PURPOSE},30\n", "utf-8"
    )
    code, out = run(server, keys["consumer"], "consent", "import", "tax", str(csv_file))
    assert code == 1 and "403" in out and "only the zone's provider" in out
    assert len(out.strip().splitlines()) == 1

    # at most max_consent_import_rows per call, said before anything is recorded
    settings = server.exchange.settings
    server.exchange.settings = settings.model_copy(update={"max_consent_import_rows": 3})
    try:
        many = tmp_path / "many.csv"
        rows = "".join(f"9131000{i},City Bank,{PURPOSE},30\n" for i in range(4))
        many.write_text("subject,consumer,purpose,days\n" + rows, "utf-8")
        code, out = run(server, keys["provider"], "consent", "import", "tax", str(many))
        assert code == 1 and "4 consents in one import; at most 3 per call" in out
        assert "split the file" in out and consent_count(server) == 0
    finally:
        server.exchange.settings = settings

    code, out = run(server, keys["provider"], "consent", "import", "tax", str(csv_file),
                    "--delimiter", ";;")  # fmt: skip
    assert code == 1 and "--delimiter takes one character" in out

    outsider = tmp_path / "outsider.key"
    write_private_key(outsider, SigningKey.generate())
    code, out = run(server, outsider, "consent", "import", "tax", str(csv_file))
    assert code == 1 and "401" in out and "Traceback" not in out


# -- CSV import options ------------------------------------------------------------------------

LEVELS = ["--level", "company_id=L2", "--level", "district=L1", "--level", "tax_paid=L2"]


def register(server: LiveServer, key: Path, name: str, file: Path, *extra: str) -> tuple[int, str]:
    return run(
        server, key, "dataset", "register", "tax", name, "--file", str(file),
        "--subject-column", "company_id", *LEVELS, *extra,
    )  # fmt: skip


def columns(server: LiveServer, key: Path, name: str) -> dict[str, str]:
    code, out = run(server, key, "catalog", "--zone", "tax", "--json")
    assert code == 0, out
    zones = json.loads(out)
    (d,) = [d for d in zones[0]["datasets"] if d["name"] == name]
    return {c["name"]: c["type"] for c in d["columns"]}


def test_register_semicolon_and_tab_files(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    semi = tmp_path / "semi.csv"
    semi.write_text(
        'company_id;district;tax_paid\n"9131;0001";Pudong;1200\n91310002;Minhang;800\n', "utf-8"
    )
    code, out = register(server, keys["provider"], "semi", semi, "--delimiter", ";")
    assert code == 0, out
    assert columns(server, keys["provider"], "semi") == {
        "company_id": "text", "district": "text", "tax_paid": "integer",
    }  # fmt: skip

    tab = tmp_path / "tab.csv"
    tab.write_text("company_id\tdistrict\ttax_paid\n91310001\tPudong\t1200.5\n", "utf-8")
    code, out = register(server, keys["provider"], "tabbed", tab, "--delimiter", "\\t")
    assert code == 0, out
    assert columns(server, keys["provider"], "tabbed")["tax_paid"] == "decimal"

    # without the delimiter, the refusal names the line and asks about the delimiter
    code, out = register(server, keys["provider"], "semi2", semi)
    assert code == 1 and "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert "line 2: a quoted field is followed by more text" in out and "delimiter" in out

    code, out = register(server, keys["provider"], "semi3", semi, "--delimiter", ";;")
    assert code == 1 and "--delimiter takes one character" in out


def test_register_gb18030_with_chinese_headers_renamed(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    gb = tmp_path / "firms.csv"
    gb.write_bytes(
        "统一社会信用代码,所在区,纳税额\n91310001,浦东新区,1200\n91310002,闵行区,800\n".encode(
            "gb18030"
        )
    )
    renames = [
        "--rename", "统一社会信用代码=company_id", "--rename", "所在区=district",
        "--rename", "纳税额=tax_paid",
    ]  # fmt: skip
    code, out = register(server, keys["provider"], "firms", gb, "--encoding", "gb18030", *renames)
    assert code == 0, out
    assert set(columns(server, keys["provider"], "firms")) == {
        "company_id", "district", "tax_paid",
    }  # fmt: skip

    # read as UTF-8 (the default), the file's first bad byte is named by line
    code, out = register(server, keys["provider"], "firms2", gb, *renames)
    assert code == 1 and "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert "line 1" in out and "is not utf-8" in out and "gb18030" in out

    # a rename of a header the file does not have, and an encoding nobody knows
    code, out = register(
        server, keys["provider"], "firms3", gb, "--encoding", "gb18030",
        "--rename", "企业名称=name", *renames,
    )  # fmt: skip
    assert code == 1 and "rename: no column '企业名称' in the header" in out
    code, out = register(server, keys["provider"], "firms4", gb, "--encoding", "klingon")
    assert code == 1 and "unknown encoding 'klingon'" in out and "gb18030" in out

    # a Chinese header left as it is: the line names what to rename
    code, out = register(server, keys["provider"], "firms5", gb, "--encoding", "gb18030")
    assert code == 1 and "rename" in out and "统一社会信用代码" in out

    # publish takes the same options
    gb2 = tmp_path / "firms-2026.csv"
    gb2.write_bytes("统一社会信用代码,所在区,纳税额\n91310003,黄浦区,900\n".encode("gb18030"))
    code, out = run(
        server, keys["provider"], "dataset", "publish", "tax", "firms", "--file", str(gb2),
        "--encoding", "gb18030", *renames,
    )  # fmt: skip
    assert code == 0 and "published" in out, out


def test_a_bad_row_is_named_by_its_line(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "company_id,district,tax_paid\n91310001,Pudong,1200\n91310002,Minhang\n", "utf-8"
    )
    code, out = register(server, keys["provider"], "bad", bad)
    assert code == 1 and "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert "line 3: 2 fields where the header has 3" in out
    assert "'district'" in out  # the column after which the fields run out
    assert "sniff" not in out.lower() and "read_csv" not in out  # not the engine's text

    quote = tmp_path / "quote.csv"
    quote.write_text(
        'company_id,district,tax_paid\n91310001,Pudong,1200\n91310002,"Min"hang,800\n', "utf-8"
    )
    code, out = register(server, keys["provider"], "quoted", quote)
    assert code == 1 and "line 3:" in out and "Traceback" not in out

    code, out = run(
        server, keys["provider"], "dataset", "register", "tax", "x", "--attach-url",
        "sqlite:///nowhere.db", "--subject-column", "id", "--encoding", "gb18030",
    )  # fmt: skip
    assert code == 1 and "apply to a .csv --file" in out


def test_a_group_is_recorded_whole_or_not_at_all(server: LiveServer, keys: dict[str, Path]) -> None:
    """append_group (what consent import records through): a change and all its entries commit
    together; an entry that cannot be recorded undoes the change and every other entry."""
    from exchange.errors import InvalidInputError
    from exchange.server.ledger import EntryDraft

    ledger_ = server.exchange.ledger
    before = ledger_.size()
    consumer_id = str(keys["consumer_id"])

    def apply(session: Session, _draft: EntryDraft) -> None:
        session.add(
            ConsentRow(
                id="consent-" + "0" * 24, zone="tax", subject_digest="0" * 64, consumer=consumer_id,
                purpose=PURPOSE, expires_at=datetime(2099, 1, 1, tzinfo=UTC),
                status="active", recorded_by=consumer_id,
            )
        )  # fmt: skip

    drafts = [EntryDraft(kind="test.one"), EntryDraft(kind="test.two", attrs={"n": 2**60})]
    with pytest.raises(InvalidInputError, match="entry cannot be recorded"):
        ledger_.append_group(drafts, apply)
    assert ledger_.size() == before and consent_count(server) == 0
    assert not ledger(server, "test.one")

    appended = ledger_.append_group([EntryDraft(kind="test.one"), EntryDraft(kind="test.two")])
    assert [a.seq for a in appended] == [before, before + 1]
