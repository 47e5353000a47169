"""Profiles from the shell (``zonex profile add|use|list|remove``), the order in which a client
command takes its URL and key, the demo's busy port, and ids printed whole."""

from __future__ import annotations

import json
import re
import socket
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crypto.keys import SigningKey
from exchange.cli import app
from exchange.keyfile import load_private_key, write_private_key, write_public_key
from tests.conftest import L2_LEVELS, LiveServer, tax_bureau_and_bank

#: nothing listens here: a URL that must not be the one used
DEAD_URL = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private XDG_CONFIG_HOME, and none of the user's ZONEX_* settings."""
    home = tmp_path / "xdg"
    home.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    for name in ("ZONEX_URL", "ZONEX_KEY", "ZONEX_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return home


def config_file(home: Path) -> Path:
    return home / "zonex" / "config.toml"


def zonex(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def one_error_line(code: int, out: str) -> str:
    assert code != 0, out
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def new_key(path: Path) -> Path:
    write_private_key(path, SigningKey.generate())
    return path


def test_add_use_list_remove_round_trip(tmp_path: Path, config_home: Path) -> None:
    code, out = zonex("profile", "list")
    assert code == 0 and "no profiles" in out and "zonex profile add" in out

    a, b = new_key(tmp_path / "a.key"), new_key(tmp_path / "b.key")
    code, out = zonex("profile", "add", "city", "--url", "https://city.example/", "--key", str(a))
    assert code == 0 and "current profile" in out, out
    code, out = zonex(
        "profile", "add", "district", "--url", "http://127.0.0.1:8422", "--key", str(b)
    )
    assert code == 0 and "zonex profile use district" in out, out

    code, out = zonex("profile", "list", "--json")
    listed = json.loads(out)
    assert listed["current"] == "city"
    assert [(p["name"], p["url"], p["key"], p["current"]) for p in listed["profiles"]] == [
        ("city", "https://city.example", str(a.resolve()), True),
        ("district", "http://127.0.0.1:8422", str(b.resolve()), False),
    ]

    code, out = zonex("profile", "use", "district")
    assert code == 0 and "district" in out
    code, out = zonex("profile", "list")
    assert code == 0 and re.search(r"\*\s*│\s*district", out), out

    # a name taken is not overwritten unless asked
    line = one_error_line(*zonex("profile", "add", "city", "--url", DEAD_URL, "--key", str(b)))
    assert "exists" in line and "--replace" in line
    code, _ = zonex("profile", "add", "city", "--url", DEAD_URL, "--key", str(b), "--replace")
    assert code == 0

    code, out = zonex("profile", "remove", "district")
    assert code == 0 and "no profile is current" in out
    listed = json.loads(zonex("profile", "list", "--json")[1])
    assert listed["current"] is None
    assert [p["name"] for p in listed["profiles"]] == ["city"]
    line = one_error_line(*zonex("profile", "remove", "district"))
    assert "no profile 'district'" in line and "city" in line
    line = one_error_line(*zonex("profile", "use", "nowhere"))
    assert "no profile 'nowhere'" in line

    # the file: only the owner reads it, and it holds the key's path, never the key
    path = config_file(config_home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text("utf-8")
    assert "PRIVATE KEY" not in text and str(b.resolve()) in text
    assert not [p for p in path.parent.iterdir() if p.name != "config.toml"]  # no leftovers


def test_add_refuses_a_public_key_a_missing_key_and_a_bad_url(
    tmp_path: Path, config_home: Path
) -> None:
    key = SigningKey.generate()
    write_public_key(tmp_path / "bank.pub", key.public_key)
    line = one_error_line(
        *zonex("profile", "add", "p", "--url", DEAD_URL, "--key", str(tmp_path / "bank.pub"))
    )
    assert "public key" in line and "private key" in line
    line = one_error_line(
        *zonex("profile", "add", "p", "--url", DEAD_URL, "--key", str(tmp_path / "none.key"))
    )
    assert "no such key file" in line
    good = new_key(tmp_path / "bank.key")
    good.chmod(0o644)  # others may read it: not a key to point a profile at
    line = one_error_line(*zonex("profile", "add", "p", "--url", DEAD_URL, "--key", str(good)))
    assert "readable by others" in line and "chmod 600" in line
    good.chmod(0o600)
    line = one_error_line(*zonex("profile", "add", "p", "--url", "exchange", "--key", str(good)))
    assert "--url" in line and "base URL" in line
    line = one_error_line(*zonex("profile", "add", "a b", "--url", DEAD_URL, "--key", str(good)))
    assert "profile name" in line
    assert not config_file(config_home).exists()  # nothing was written


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("current = [oops\n", "not a valid zonex config"),
        ('[profiles.x]\nurl = "http://a"\n', "has no key"),
        ('current = "gone"\n', "the current profile 'gone' is not defined"),
        ('colour = "blue"\n', "unknown setting 'colour'"),
        ('[profiles.x]\nurl = 3\nkey = "/k"\n', "has no url"),
    ],
)
def test_a_broken_config_file_is_one_line_naming_it(
    config_home: Path, text: str, problem: str
) -> None:
    path = config_file(config_home)
    path.parent.mkdir()
    path.write_text(text, "utf-8")
    for args in (["catalog"], ["profile", "list"], ["whoami", "--json"]):
        line = one_error_line(*zonex(*args))
        assert str(path) in line and problem in line, line


def test_flag_beats_env_beats_profile_beats_current(
    server: LiveServer, tmp_path: Path, config_home: Path
) -> None:
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    keys = {}
    for name, key in (("provider", provider), ("consumer", consumer)):
        keys[name] = tmp_path / f"{name}.key"
        write_private_key(keys[name], key)
    operator = server.data_dir / "operator.key"

    def who(*args: str, env: dict[str, str] | None = None) -> str:
        code, out = zonex("whoami", "--json", *args, env=env)
        assert code == 0, out
        return str(json.loads(out)["name"])

    # no profile: today's defaults (operator.key in the working directory) apply
    line = one_error_line(*zonex("whoami", "--url", server.url))
    assert "operator.key" in line

    assert (
        zonex("profile", "add", "bank", "--url", server.url, "--key", str(keys["consumer"]))[0] == 0
    )
    assert (
        zonex("profile", "add", "dead", "--url", DEAD_URL, "--key", str(keys["provider"]))[0] == 0
    )

    # the current profile reaches the server with its key: no --url, no --key
    assert who() == "City Bank"
    code, out = zonex("catalog", "--json")
    assert code == 0 and "companies" in out
    # --profile, before or after the command, and ZONEX_PROFILE pick another one
    for args, env in (
        (("--profile", "dead"), None),
        (("--profile=dead",), None),
        ((), {"ZONEX_PROFILE": "dead"}),
    ):
        line = one_error_line(*zonex("catalog", *args, env=env))
        assert "127.0.0.1:9 (the url of profile 'dead')" in line, line
        assert "zonex profile add dead --replace" in line
    line = one_error_line(*zonex("--profile", "dead", "catalog"))
    assert "127.0.0.1:9" in line
    line = one_error_line(*zonex("catalog", "--profile", "nope"))
    assert "no profile 'nope'" in line

    # env beats profile (url and key separately); flag beats env
    line = one_error_line(*zonex("whoami", env={"ZONEX_URL": DEAD_URL}))
    assert "127.0.0.1:9" in line and "profile" not in line
    assert who(env={"ZONEX_KEY": str(keys["provider"])}) == "Tax Bureau"
    assert who("--url", server.url, env={"ZONEX_URL": DEAD_URL}) == "City Bank"
    assert who("--key", str(operator), env={"ZONEX_KEY": str(keys["provider"])}) == "operator"
    # a flag beats --profile too; the rest comes from the named profile
    assert who("--profile", "dead", "--url", server.url) == "Tax Bureau"

    # the ledger commands (whose --url is optional) take the profile's exchange too
    cp = tmp_path / "cp.txt"
    code, out = zonex("ledger", "checkpoint", "--key", str(operator), "--out", str(cp))
    assert code == 0, out
    assert cp.read_text("utf-8").startswith("test.zonex/log\n")


def _listening_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, int(s.getsockname()[1])


def test_the_demo_names_a_busy_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "financial_zone"))
    import financial_zone

    busy, port = _listening_port()
    with busy:
        data_dir = tmp_path / "demo"
        assert financial_zone.main(["--data-dir", str(data_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"port {port}" in lines[0] and "busy" in lines[0]
    assert "scripts/demo.sh DATA_DIR PORT" in lines[0] and "--port" in lines[0]
    assert "Traceback" not in err
    assert not data_dir.exists()  # nothing was started or written
    assert financial_zone.port_problem(0) is not None
    assert financial_zone.port_problem(70000) is not None


def test_demo_script_takes_a_port(tmp_path: Path) -> None:
    import subprocess

    script = Path(__file__).resolve().parents[2] / "scripts" / "demo.sh"
    for args, expected in (
        (["demo", "eighty"], "port 'eighty' is not a number"),
        (["--port"], "--port needs a number"),
        (["a", "1", "extra"], "too many arguments"),
    ):
        done = subprocess.run(
            ["bash", str(script), *args], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    # a busy port is named before anything is installed or started
    busy, port = _listening_port()
    with busy:
        done = subprocess.run(
            ["bash", str(script), str(tmp_path / "demo"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"✗ port {port} on 127.0.0.1 is busy (something is listening there); pick another: "
        f"scripts/demo.sh DATA_DIR PORT (or --port PORT), e.g. {port + 1}"
    ]
    assert not (tmp_path / "demo").exists()


def test_psi_session_and_receipt_consumer_ids_are_whole(server: LiveServer, tmp_path: Path) -> None:
    from tests.exchange.test_cli_psi import PURPOSE, _setup

    setup = _setup(server, tmp_path, L2_LEVELS)
    assert zonex("profile", "add", "bank", "--url", server.url, "--key", str(setup["key"]))[0] == 0
    out_file = tmp_path / "card.json"
    code, out = zonex(
        "psi", "cardinality", "--zone", "tax", "--dataset", "companies",
        "--ids", str(setup["ids"]), "--column", "company", "--purpose", PURPOSE,
        "--out", str(out_file),
    )  # fmt: skip
    assert code == 0, out
    session = json.loads(out_file.read_text("utf-8"))["session"]
    assert re.fullmatch(r"psi_[A-Za-z0-9_-]{32}", session), session
    assert f"session {session}\n" in out  # whole, on its own line

    code, out = zonex(
        "receipt", "verify", str(out_file) + ".receipt", "--result", str(out_file),
        "--log-key", str(server.data_dir / "log.pub"),
    )  # fmt: skip
    assert code == 0, out
    consumer_id = load_private_key(setup["key"]).public_key.key_id
    assert f"by {consumer_id} on" in out and "…" not in out
