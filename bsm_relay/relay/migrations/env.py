"""Alembic environment: always run with a connection handed in by relay/db.py."""

from alembic import context

from bsm_relay.relay.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via bsm-relay init
    raise SystemExit("run migrations with 'bsm-relay init'")

context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
