"""Columns for the retry schedule (poison hold, delay notice) and the marketplace rules.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queue") as batch:
        batch.add_column(sa.Column("errors", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("delay_notified", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("orders") as batch:
        batch.add_column(sa.Column("review_requested_at", sa.Float(), nullable=True))
    with op.batch_alter_table("message_log") as batch:
        batch.add_column(sa.Column("proactive", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("contact_reason", sa.String(length=64), nullable=True))
        batch.create_index("ix_message_log_seller_at", ["seller_id", "at"])


def downgrade() -> None:
    with op.batch_alter_table("message_log") as batch:
        batch.drop_index("ix_message_log_seller_at")
        batch.drop_column("contact_reason")
        batch.drop_column("proactive")
    with op.batch_alter_table("orders") as batch:
        batch.drop_column("review_requested_at")
    with op.batch_alter_table("queue") as batch:
        batch.drop_column("delay_notified")
        batch.drop_column("errors")
