"""Incidents (docs/incidents.md).

- ``incidents``: one row per incident the monitor (or the operator) opened: the detector, its
  severity, the response taken (alert, throttle, suspend), the principal concerned ("" for
  none), the evidence's first and last ledger seq, the ``incident.opened`` entry's seq, until
  when a throttle lasts, whether it is resolved, and a person's label (true or false positive).
  Unique on (detector, subject, last_seq).
- ``reinstatement_approvals``: a second person's approval to reinstate a principal the monitor
  suspended, used by at most one reinstatement.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("detector", sa.String(32), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("response", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("zone", sa.String(63), nullable=True),
        sa.Column("first_seq", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("opened_by", sa.String(64), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_seq", sa.BigInteger, nullable=True),
        sa.Column("throttled_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("label", sa.String(8), nullable=True),
        sa.Column("labelled_by", sa.String(64), nullable=True),
        sa.UniqueConstraint("detector", "subject", "last_seq", name="uq_incidents_evidence"),
    )
    op.create_index("ix_incidents_subject", "incidents", ["subject", "response"])
    op.create_table(
        "reinstatement_approvals",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("principal", sa.String(64), nullable=False),
        sa.Column("approver", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=True),
        sa.Column("used", sa.Boolean, nullable=False),
    )
    op.create_index(
        "ix_reinstatement_approvals_principal", "reinstatement_approvals", ["principal", "used"]
    )


def downgrade() -> None:
    op.drop_index("ix_reinstatement_approvals_principal", "reinstatement_approvals")
    op.drop_table("reinstatement_approvals")
    op.drop_index("ix_incidents_subject", "incidents")
    op.drop_table("incidents")
