"""The attack suite runs on SQLite by default; a test that matters on both engines asks for
``@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)``."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import PG_ADMIN_URL, LiveServer
from tests.security._support import World, build_world


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """None (SQLite) unless parametrized indirectly with ``"postgres"``."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield None
        return
    if not PG_ADMIN_URL:
        pytest.skip("ZONEX_TEST_DATABASE_URL is not set (no PostgreSQL server)")
    name = "zonex_s_" + secrets.token_hex(6)
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def world(server: LiveServer) -> World:
    return build_world(server)


@pytest.fixture
def parties(server: LiveServer) -> World:
    """The same principals and zone ``tax`` without any dataset (cheaper)."""
    return build_world(server, datasets=False)
