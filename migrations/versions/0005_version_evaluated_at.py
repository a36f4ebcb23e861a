"""forest versions remember when they were last evaluated (leaderboard caches key on it)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("forest_versions", schema=None) as b:
        b.add_column(sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("forest_versions", schema=None) as b:
        b.drop_column("evaluated_at")
