"""Large messages in spool files instead of the queue row.

``queue.spool_path``: when set, the whole message to deliver is that file (relative to the
state directory) and ``body`` holds only its header block (for trace and DSNs).  See
``relay/spool.py`` and ``[queue] spool_threshold``.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queue") as batch:
        batch.add_column(sa.Column("spool_path", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queue") as batch:
        batch.drop_column("spool_path")
