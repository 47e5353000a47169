"""The registry version: one counter that every change to principals, zones or datasets bumps.

The database bumps it itself (triggers), in the transaction of the change, whatever statement
made it: ORM flushes, Core updates, a restore, a hand-written fix. A process that caches
principals or the catalog compares the version it cached at with the current one, read in the
same transaction that records each request's nonce (see ``exchange.server.registry``).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: the tables whose rows the registry cache holds or the catalog shows
TABLES = ("principals", "zones", "datasets")
BUMP = "UPDATE registry_state SET version = version + 1 WHERE id = 1"


def upgrade() -> None:
    op.create_table(
        "registry_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_registry_state_single_row"),
        sa.PrimaryKeyConstraint("id", name="pk_registry_state"),
    )
    op.execute("INSERT INTO registry_state (id, version) VALUES (1, 0)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION zonex_registry_bump() RETURNS trigger "
            f"LANGUAGE plpgsql AS $$ BEGIN {BUMP}; RETURN NULL; END $$"
        )
        for table in TABLES:
            op.execute(
                f"CREATE TRIGGER registry_bump_{table} "
                f"AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION zonex_registry_bump()"
            )
        return
    for table in TABLES:
        for event in ("INSERT", "UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER registry_bump_{table}_{event.lower()} AFTER {event} ON {table} "
                f"BEGIN {BUMP}; END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS registry_bump_{table} ON {table}")
        op.execute("DROP FUNCTION IF EXISTS zonex_registry_bump()")
    else:
        for table in TABLES:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS registry_bump_{table}_{event}")
    op.drop_table("registry_state")
