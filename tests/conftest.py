"""Shared fixtures: a fresh data directory on SQLite and (when available) PostgreSQL, and a
real server on loopback."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from crypto.keys import SigningKey
from crypto.note import NoteVerifier
from exchange.client.sdk import Client
from exchange.keyfile import load_private_key
from exchange.server.api.app import create_app
from exchange.server.runtime import Exchange, init_data_dir
from exchange.settings import Settings

PG_ADMIN_URL = os.environ.get("ZONEX_TEST_DATABASE_URL")
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(autouse=True)
def _no_user_cli_profiles(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI reads profiles from a fresh, empty XDG_CONFIG_HOME, never the user's."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))
    monkeypatch.delenv("ZONEX_PROFILE", raising=False)


@contextmanager
def fresh_postgres_database(prefix: str = "zonex_t_") -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database on the test server, dropped afterwards;
    skips the test when no server is configured."""
    if not PG_ADMIN_URL:
        pytest.skip("ZONEX_TEST_DATABASE_URL is not set (no PostgreSQL server)")
    name = prefix + secrets.token_hex(6)
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """None for the embedded SQLite default; a fresh PostgreSQL database otherwise."""
    if request.param == "sqlite":
        yield None
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def data_dir(tmp_path: Path, database_url: str | None) -> Path:
    d = tmp_path / "exchange"
    init_data_dir(d, origin="test.zonex/log", database_url=database_url)
    return d


def settings_for(data_dir: Path, **overrides: object) -> Settings:
    return Settings.from_data_dir(data_dir, **overrides)


@pytest.fixture
def exchange(data_dir: Path) -> Iterator[Exchange]:
    ex = Exchange(settings_for(data_dir, checkpoint_interval_seconds=0.2))
    ex.start()
    try:
        yield ex
    finally:
        ex.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    exchange: Exchange
    data_dir: Path
    operator: SigningKey

    def client(self, key: SigningKey) -> Client:
        return Client(self.url, key)

    def log_verifier(self) -> NoteVerifier:
        return NoteVerifier.from_verifier_key((self.data_dir / "log.pub").read_text().strip())


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
#: column levels for examples/data/companies.csv, tax paid at L2 (open to a granted export)
L2_LEVELS = {
    "company_id": "L2",
    "district": "L1",
    "industry": "L1",
    "founded_year": "L1",
    "employees": "L2",
    "registered_capital": "L2",
    "tax_paid_2025": "L2",
}
L3_LEVELS = {**L2_LEVELS, "tax_paid_2025": "L3"}


def tax_bureau_and_bank(
    server: LiveServer, levels: dict[str, str], *, zone: str = "tax"
) -> tuple[SigningKey, SigningKey]:
    """Register a tax bureau (agency) and a bank (enterprise); the bureau opens ``zone`` and
    registers examples/data/companies.csv there as ``companies`` with ``levels``."""
    provider, consumer = SigningKey.generate(), SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", provider.public_key)
        op.register_principal("City Bank", "enterprise", consumer.public_key)
    with server.client(provider) as p:
        p.create_zone(zone, "tax records")
        p.register_dataset(
            zone,
            "companies",
            levels=levels,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
    return provider, consumer


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # running in a thread
        pass


@contextmanager
def serving(exchange: Exchange, data_dir: Path, port: int | None = None) -> Iterator[LiveServer]:
    """A real uvicorn server on loopback (``port``, else a free one) serving a started exchange,
    in a thread, until the block ends."""
    # bound here and handed to uvicorn: a port the kernel picks stays ours (another test's
    # free_port() in a parallel worker cannot be given it before the server listens)
    sock = socket.socket()
    sock.bind(("127.0.0.1", port or 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        create_app(exchange=exchange), host="127.0.0.1", port=port, log_level="warning"
    )
    srv = _Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(
            f"http://127.0.0.1:{port}",
            exchange,
            data_dir,
            load_private_key(data_dir / "operator.key"),
        )
    finally:
        srv.should_exit = True
        thread.join(timeout=20)
        sock.close()


@contextmanager
def live_exchange(
    data_dir: Path,
    *,
    origin: str = "test.zonex/log",
    database_url: str | None = None,
    **overrides: object,
) -> Iterator[LiveServer]:
    """A new data directory's exchange (checkpoints every 0.2 s, ``overrides`` to its settings)
    served on loopback until the block ends: the world a module fixture builds once."""
    init_data_dir(data_dir, origin=origin, database_url=database_url)
    ex = Exchange(settings_for(data_dir, **{"checkpoint_interval_seconds": 0.2, **overrides}))
    ex.start()
    try:
        with serving(ex, data_dir) as live:
            yield live
    finally:
        ex.close()


@pytest.fixture
def server(exchange: Exchange, data_dir: Path) -> Iterator[LiveServer]:
    """A real uvicorn server on loopback serving the exchange."""
    with serving(exchange, data_dir) as live:
        yield live
