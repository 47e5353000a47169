"""Alembic environment: the engine comes from the caller (exchange.server.storage.migrate)."""

from __future__ import annotations

from alembic import context

import exchange.server.models
import exchange.server.policystore  # noqa: F401 - register policy tables
from exchange.server.db import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
