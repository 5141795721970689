"""job api_shape and start deadline

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # server defaults, so rows written before this revision (and by older replicas) stay valid
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('api_shape', sqlmodel.sql.sqltypes.AutoString(), nullable=False,
                                      server_default='native'))
        batch_op.add_column(sa.Column('start_deadline_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('start_deadline_at')
        batch_op.drop_column('api_shape')
