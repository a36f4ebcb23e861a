"""an ELM's routing vector (the seed's mean hidden state over its domain's text), kept with
its contribution and published in every version's manifest for the centroid router

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("contributions", schema=None) as b:
        b.add_column(sa.Column("routing_vector", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("contributions", schema=None) as b:
        b.drop_column("routing_vector")
