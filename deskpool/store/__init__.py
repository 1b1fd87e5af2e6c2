"""Persistence: SQLAlchemy models, repositories that never commit, a unit of work, migrations.

May import only ``deskpool.domain``, ``deskpool.config``, SQLAlchemy, Alembic and the standard
library.
"""

from deskpool.store import access_models as access_models  # registers the broker tables
from deskpool.store.db import (
    UnitOfWork,
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    make_session_factory,
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
    "Desktop",
    "DesktopRepository",
    "Host",
    "HostRepository",
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
    "upgrade_to_head",
    "utcnow",
]
