"""Alembic environment for deskpool's packaged migrations.

Run through ``deskpool.store.db`` (``upgrade_to_head``, ``downgrade``), which hands over an open
connection in ``config.attributes["connection"]`` inside a transaction it owns. Without one, the
URL in the ``sqlalchemy.url`` option is used (online) or SQL is printed (offline ``--sql``).
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from sqlalchemy import Connection, Enum

from deskpool.store import (
    access_models,  # noqa: F401  (the broker tables join Base)
    offline,  # noqa: F401  (the offline check-out table joins Base)
    profile_holders,  # noqa: F401  (which hosts hold which profile layers)
    profiles,  # noqa: F401  (the profile tables join Base)
)
from deskpool.store.models import Base, UtcDateTime

config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Autogenerate renders deskpool's column types as plain SQLAlchemy types."""
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, Enum) and not obj.native_enum:
        return f"sa.String(length={obj.length})"  # values live in code, not in the schema
    return False


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode rebuilds tables
        compare_type=True,
        render_item=_render_item,
    )


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return

    from deskpool.store.db import make_engine

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url given to the migrations")
    engine = make_engine(url)
    try:
        with engine.connect() as own_connection:
            _configure(own_connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
