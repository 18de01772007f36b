"""Alembic environment of the winners database (run through ``flashmoe_gen.db.schema``).

The connection comes from the caller (``config.attributes["connection"]``), already inside
the transaction that holds the write lock; the version table is ``fmoe_alembic_version`` so
it never meets Optuna's own ``alembic_version`` in a shared database.
"""

from alembic import context

from flashmoe_gen.db.models import Base
from flashmoe_gen.db.schema import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - the package always passes its connection
    raise RuntimeError("run migrations through flashmoe_gen.db.schema.upgrade(url)")
context.configure(connection=connection, target_metadata=Base.metadata,
                  version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
