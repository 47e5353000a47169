"""Zone nodes: a provider's own machine hosts its zone's data; the exchange dispatches tasks.

- ``nodes``: a node key (also a principal of kind ``node``) approved for one zone, and when it
  last polled.
- ``node_tasks``: each task dispatched to a node, its bundle and its outcome.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("key_id", sa.String(64), sa.ForeignKey("principals.key_id"), primary_key=True),
        sa.Column("zone", sa.String(64), sa.ForeignKey("zones.name"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("registered_by", sa.String(64), nullable=False),
        sa.Column("approved_by", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_nodes_zone", "nodes", ["zone"])
    op.create_table(
        "node_tasks",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("bundle", sa.JSON(), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_node_tasks_node_status", "node_tasks", ["node", "status"])


def downgrade() -> None:
    op.drop_index("ix_node_tasks_node_status", "node_tasks")
    op.drop_table("node_tasks")
    op.drop_index("ix_nodes_zone", "nodes")
    op.drop_table("nodes")
