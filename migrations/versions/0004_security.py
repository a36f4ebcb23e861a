"""uploads that expire, job owners and runners, artifact origins, rate limits, invitations

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as b:
        b.add_column(sa.Column("origin", sa.String(length=200), nullable=True))
    with op.batch_alter_table("uploads", schema=None) as b:
        b.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
        b.create_index("ix_uploads_status", ["status"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as b:
        b.add_column(sa.Column("owner_id", sa.Integer(), nullable=True))
        b.add_column(sa.Column("runner", sa.String(length=128), nullable=True))
        b.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        b.create_foreign_key("fk_jobs_owner", "users", ["owner_id"], ["id"], ondelete="SET NULL")
    op.create_table(
        "rate_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rate_events", schema=None) as b:
        b.create_index("ix_rate_bucket_at", ["bucket", "at"], unique=False)
    op.create_table(
        "invites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("note", sa.String(length=200), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_by_id", sa.Integer(), nullable=True),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["created_by_id"], ["users.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["used_by_id"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code_hash"),
    )
    # uploads left open before this revision expire at the first sweep
    op.execute("UPDATE uploads SET expires_at = created_at WHERE expires_at IS NULL AND status = 'open'")


def downgrade() -> None:
    op.drop_table("invites")
    with op.batch_alter_table("rate_events", schema=None) as b:
        b.drop_index("ix_rate_bucket_at")
    op.drop_table("rate_events")
    with op.batch_alter_table("jobs", schema=None) as b:
        b.drop_constraint("fk_jobs_owner", type_="foreignkey")
        b.drop_column("dispatched_at")
        b.drop_column("runner")
        b.drop_column("owner_id")
    with op.batch_alter_table("uploads", schema=None) as b:
        b.drop_index("ix_uploads_status")
        b.drop_column("completed_at")
        b.drop_column("expires_at")
    with op.batch_alter_table("artifacts", schema=None) as b:
        b.drop_column("origin")
