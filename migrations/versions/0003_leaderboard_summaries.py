"""leaderboard summaries and baselines

Revision ID: 0003
Revises: 0002_rounds
Create Date: 2026-11-23 19:13:49.996922
"""

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002_rounds'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('baselines',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('forest_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['forest_id'], ['forests.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('forest_id', 'name')
    )
    op.create_table('subject_summaries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('subject', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('method', sa.String(length=32), nullable=False),
    sa.Column('mean_train', sa.Float(), nullable=True),
    sa.Column('mean_eval', sa.Float(), nullable=True),
    sa.Column('mean_all', sa.Float(), nullable=False),
    sa.Column('domains', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['forest_versions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('version_id', 'subject')
    )
    with op.batch_alter_table('subject_summaries', schema=None) as batch_op:
        batch_op.create_index('ix_summary_version_mean', ['version_id', 'mean_all'], unique=False)
    # versions evaluated before this migration get their summaries now
    op.execute("""
        INSERT INTO subject_summaries (version_id, subject, kind, method, mean_train, mean_eval, mean_all, domains)
        SELECT e.version_id, e.subject, MIN(e.kind), MIN(e.method),
               AVG(CASE WHEN d.role = 'train' THEN e.perplexity END),
               AVG(CASE WHEN d.role = 'eval' THEN e.perplexity END),
               AVG(e.perplexity), COUNT(*)
        FROM evaluations e JOIN domains d ON d.id = e.domain_id
        WHERE e.version_id IS NOT NULL
        GROUP BY e.version_id, e.subject
    """)

    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_eval_version_domain'))
        batch_op.create_index('ix_eval_version_domain_ppl', ['version_id', 'domain_id', 'perplexity'], unique=False)
        batch_op.create_index('ix_eval_version_subject', ['version_id', 'subject'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index('ix_eval_version_subject')
        batch_op.drop_index('ix_eval_version_domain_ppl')
        batch_op.create_index(batch_op.f('ix_eval_version_domain'), ['version_id', 'domain_id'], unique=False)

    with op.batch_alter_table('subject_summaries', schema=None) as batch_op:
        batch_op.drop_index('ix_summary_version_mean')

    op.drop_table('subject_summaries')
    op.drop_table('baselines')
