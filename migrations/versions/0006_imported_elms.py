"""a maintainer can import an existing checkpoint: a contribution without a branch init,
with the source it came from

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 13:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("contributions", schema=None) as b:
        b.alter_column("branch_init_id", existing_type=sa.Integer(), nullable=True)
        b.add_column(sa.Column("source", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("contributions", schema=None) as b:
        b.drop_column("source")
        b.alter_column("branch_init_id", existing_type=sa.Integer(), nullable=False)
