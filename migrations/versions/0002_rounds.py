"""federated rounds: rounds and round_nodes

Revision ID: 0002_rounds
Revises: 0001
Create Date: 2026-11-30 12:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0002_rounds'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rounds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('forest_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=True),
    sa.Column('status', sa.Enum('pending', 'running', 'succeeded', 'partial', 'failed', 'empty', 'cancelled', name='round_status', native_enum=False, length=32), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('flower_run_id', sa.String(length=32), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_by_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['created_by_id'], ['users.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['forest_id'], ['forests.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rounds_forest_id'), ['forest_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_rounds_status'), ['status'], unique=False)

    op.create_table('round_nodes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('round_id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.String(length=32), nullable=False),
    sa.Column('domain', sa.String(length=64), nullable=True),
    sa.Column('owner_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('documents', sa.BigInteger(), nullable=True),
    sa.Column('data_bytes', sa.BigInteger(), nullable=True),
    sa.Column('branch_init_id', sa.Integer(), nullable=True),
    sa.Column('contribution_id', sa.Integer(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['branch_init_id'], ['branch_inits.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['contribution_id'], ['contributions.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('round_id', 'node_id')
    )
    with op.batch_alter_table('round_nodes', schema=None) as batch_op:
        batch_op.create_index('ix_round_nodes_domain', ['domain'], unique=False)
        batch_op.create_index(batch_op.f('ix_round_nodes_round_id'), ['round_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('round_nodes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_round_nodes_round_id'))
        batch_op.drop_index('ix_round_nodes_domain')

    op.drop_table('round_nodes')
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rounds_status'))
        batch_op.drop_index(batch_op.f('ix_rounds_forest_id'))

    op.drop_table('rounds')
