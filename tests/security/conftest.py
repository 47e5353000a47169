"""The attack suite runs on SQLite by default; a test that matters on both engines asks for
``@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LiveServer, fresh_postgres_database
from tests.security._support import World, build_world


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """None (SQLite) unless parametrized indirectly with ``"postgres"``."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield None
        return
    with fresh_postgres_database("zonex_s_") as url:
        yield url


@pytest.fixture
def world(server: LiveServer) -> World:
    return build_world(server)


@pytest.fixture
def parties(server: LiveServer) -> World:
    """The same principals and zone ``tax`` without any dataset (cheaper)."""
    return build_world(server, datasets=False)
