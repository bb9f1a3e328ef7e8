"""Per-message history for ``bsm-relay trace``, upstream delay, and the session behind a queue item.

* ``message_events``: one row per thing that happened to a queued message after it was
  accepted (each delivery attempt and its outcome, a DSN queued, an inbound bounce),
  written in the transaction that already records it.  ``detail`` is JSON text holding
  aliases and reply codes only, never a real address.
* ``message_log.upstream_delay``: seconds between the sender side's first timestamp
  (earliest Received, else Date) and our acceptance.
* ``queue.session_id``: the SMTP session that brought the item, so delivery log events
  carry it too.
* Indexes for trace's lookups by minted Message-ID and by session id.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "message_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("queue_id", sa.String(length=32), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("message_events") as batch:
        batch.create_index("ix_message_events_queue_id", ["queue_id"])
        batch.create_index("ix_message_events_at", ["at"])
    with op.batch_alter_table("message_log") as batch:
        batch.add_column(sa.Column("upstream_delay", sa.Float(), nullable=True))
        batch.create_index("ix_message_log_message_id", ["message_id"])
        batch.create_index("ix_message_log_session_id", ["session_id"])
    with op.batch_alter_table("queue") as batch:
        batch.add_column(sa.Column("session_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queue") as batch:
        batch.drop_column("session_id")
    with op.batch_alter_table("message_log") as batch:
        batch.drop_index("ix_message_log_session_id")
        batch.drop_index("ix_message_log_message_id")
        batch.drop_column("upstream_delay")
    op.drop_table("message_events")
