"""a published version as one native mixture-of-experts model (btm.moe), built by a job, and
the router tunings of such exports that maintainers start

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "moe_exports",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("forest_versions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("options_key", sa.String(128), nullable=False),
        sa.Column("experts_per_token", sa.Integer(), nullable=False),
        sa.Column("backbone", sa.String(16), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("moe_exports.id", ondelete="CASCADE"), nullable=True),
        sa.Column("tuning", sa.JSON(), nullable=True),
        sa.Column("samples", sa.JSON(), nullable=True),
        sa.Column("recipe", sa.Text(), nullable=True),
        sa.Column("files", sa.JSON(), nullable=True),
        sa.Column("status", sa.Enum("requested", "ready", "failed", name="moe_status", native_enum=False, length=32),
                  nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("version_id", "options_key"),
    )


def downgrade() -> None:
    op.drop_table("moe_exports")
