"""A change counter for the marketplace facts the serving relay caches.

``facts_generation`` holds one row; triggers add one to it whenever sellers, buyers, orders,
revoked aliases or a seller address's status change, whoever changes them (``bsm-relay``
commands, another node, the marketplace writing to the tables directly).  A serving relay
keeps the facts it read in memory and reads this one number before trusting them
(``relay/factcache.py``), so a change is seen by the next message, on every node.

An unapproved address's attempt counter (``attempts``, ``last_seen``) changes with every
refused message and is not cached: updates of those columns alone do not count.
Also an index on orders (seller_id, placed_at) for the volume cap's count.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# (table, the operations that change what the relay caches)
WATCHED = (
    ("sellers", "INSERT OR UPDATE OR DELETE"),
    ("buyers", "INSERT OR UPDATE OR DELETE"),
    ("orders", "INSERT OR UPDATE OR DELETE"),
    ("revoked_aliases", "INSERT OR UPDATE OR DELETE"),
    ("seller_addresses", "INSERT OR DELETE OR UPDATE OF status, address, seller_id"),
)
BUMP = "UPDATE facts_generation SET value = value + 1 WHERE id = 1"


def upgrade() -> None:
    op.create_table(
        "facts_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO facts_generation (id, value) VALUES (1, 0)")
    # The volume cap reads a seller's orders of the last 30 days by placing time.
    with op.batch_alter_table("orders") as batch:
        batch.create_index("ix_orders_seller_placed", ["seller_id", "placed_at"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE FUNCTION bsm_facts_bump() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN {BUMP}; RETURN NULL; END $$")
        for table, events in WATCHED:
            op.execute(f"CREATE TRIGGER {table}_facts_bump AFTER {events} ON {table} "
                       "FOR EACH STATEMENT EXECUTE FUNCTION bsm_facts_bump()")
        return
    for table, events in WATCHED:     # SQLite: one trigger per operation, per row
        for event in events.split(" OR "):
            name = f"{table}_facts_bump_{event.split()[0].lower()}"
            op.execute(f"CREATE TRIGGER {name} AFTER {event} ON {table} BEGIN {BUMP}; END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, _ in WATCHED:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_facts_bump ON {table}")
        op.execute("DROP FUNCTION IF EXISTS bsm_facts_bump()")
    else:
        for table, events in WATCHED:
            for event in events.split(" OR "):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_facts_bump_{event.split()[0].lower()}")
    with op.batch_alter_table("orders") as batch:
        batch.drop_index("ix_orders_seller_placed")
    op.drop_table("facts_generation")
