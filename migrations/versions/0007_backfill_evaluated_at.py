"""a version evaluated before evaluated_at existed gets it now: a leaderboard shows only
versions whose evaluation is recorded as done

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 01:00:00
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE forest_versions SET evaluated_at = CURRENT_TIMESTAMP WHERE evaluated_at IS NULL "
               "AND EXISTS (SELECT 1 FROM evaluations WHERE evaluations.version_id = forest_versions.id)")


def downgrade() -> None:
    pass  # the timestamps are harmless to keep
