"""Persistence: SQLAlchemy models, repositories that never commit, a unit of work, migrations.

The only package that imports SQLAlchemy or Alembic (import-linter's "The store alone talks
SQL"): every query and command of the rest of deskpool is a repository method reached through
a ``UnitOfWork`` (``uow.desktops``, ``uow.users``, ``uow.events``, ...), and a process gets its
database from :func:`open_database`.

May import only ``deskpool.domain``, ``deskpool.config``, SQLAlchemy, Alembic and the standard
library.
"""

from deskpool.store import access_models as access_models  # registers the broker tables
from deskpool.store import offline as offline  # registers the offline check-out table
from deskpool.store import profiles as profiles  # registers the profile tables
from deskpool.store.db import (
    DatabaseUnavailable,
    SessionFactory,
    UnitOfWork,
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    make_session_factory,
    open_database,
    schema_revision,
    upgrade_to_head,
)
from deskpool.store.desktops import DesktopRepository
from deskpool.store.models import Base, Desktop, Host, Template, TemplateVersion, utcnow
from deskpool.store.repositories import (
    HostRepository,
    TemplateRepository,
    TemplateVersionRepository,
)

__all__ = [
    "Base",
    "DatabaseUnavailable",
    "Desktop",
    "DesktopRepository",
    "Host",
    "HostRepository",
    "SessionFactory",
    "Template",
    "TemplateRepository",
    "TemplateVersion",
    "TemplateVersionRepository",
    "UnitOfWork",
    "alembic_config",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "make_session_factory",
    "open_database",
    "schema_revision",
    "upgrade_to_head",
    "utcnow",
]
