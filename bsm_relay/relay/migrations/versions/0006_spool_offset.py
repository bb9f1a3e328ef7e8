"""Messages in spool segments.

``queue.spool_offset``: when set, ``spool_path`` is a segment (``relay/segments.py``) that holds
several messages, and this item's message is the ``size`` bytes from that offset.  ``body``
holds its header block, as for a spool file of its own.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queue") as batch:
        batch.add_column(sa.Column("spool_offset", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queue") as batch:
        batch.drop_column("spool_offset")
