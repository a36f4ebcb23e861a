"""what each ELM is worth: per version and domain, the forest against its seed and every
ELM's leave-one-out and Shapley value (computed from cached scores; versions evaluated
before this revision get theirs from a values job when first asked)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 11:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("forest_versions", schema=None) as b:
        b.add_column(sa.Column("valued_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "domain_values",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("forest_versions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("domain_id", sa.Integer(), sa.ForeignKey("domains.id", ondelete="CASCADE"), nullable=False),
        sa.Column("forest_ppl", sa.Float(), nullable=False),
        sa.Column("seed_ppl", sa.Float(), nullable=False),
        sa.Column("improvement", sa.Float(), nullable=False),
        sa.Column("permutations", sa.Integer(), nullable=False),
        sa.UniqueConstraint("version_id", "domain_id"),
    )
    op.create_table(
        "elm_values",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("forest_versions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("domain_id", sa.Integer(), sa.ForeignKey("domains.id", ondelete="CASCADE"), nullable=False),
        sa.Column("elm", sa.String(64), nullable=False),
        sa.Column("contribution_id", sa.Integer(), nullable=True),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("loo", sa.Float(), nullable=False),
        sa.Column("without_ppl", sa.Float(), nullable=False),
        sa.Column("shapley", sa.Float(), nullable=False),
        sa.Column("shapley_se", sa.Float(), nullable=True),
        sa.UniqueConstraint("version_id", "domain_id", "elm"),
    )
    op.create_index("ix_elm_values_version_owner", "elm_values", ["version_id", "owner"])


def downgrade() -> None:
    op.drop_index("ix_elm_values_version_owner", table_name="elm_values")
    op.drop_table("elm_values")
    op.drop_table("domain_values")
    # a plain DROP COLUMN (SQLite >= 3.35, PostgreSQL): a batch copy of forest_versions would drop
    # the old table, and SQLite's foreign keys would cascade that to every version's evaluations
    op.execute("ALTER TABLE forest_versions DROP COLUMN valued_at")
