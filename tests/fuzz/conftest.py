"""The schema fuzzing runs on SQLite only: the schema does not depend on the engine."""

from __future__ import annotations

import pytest


@pytest.fixture
def database_url() -> None:
    return None
