"""Repositories: small query/command classes over one SQLAlchemy ``Session``.

Rules:

* Repositories never commit. The service that owns an operation opens a ``UnitOfWork``, calls
  repositories, and commits once; leaving the block without committing rolls everything back.
* ``add`` and ``delete`` flush at once inside a SAVEPOINT, so a duplicate name, MAC or
  machine-id, or a delete of something still in use, raises ``Conflict`` right there, with a
  sentence naming the field and value, and the surrounding transaction stays usable.
* Lookups raise ``NotFound`` naming what was asked for.
* A desktop's ``state`` changes only through ``DesktopRepository.compare_and_set_state``: one
  conditional ``UPDATE ... WHERE id = :id AND state = :expected``. Of any number of brokers or
  reconcilers racing on the same desktop, exactly one sees ``True``.
"""

from __future__ import annotations

import builtins
import re
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, cast

from sqlalchemy import and_, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from deskpool.domain.errors import Conflict, NotFound
from deskpool.domain.models import PoolStatus
from deskpool.domain.pools import PoolKind
from deskpool.store.models import (
    Base,
    Desktop,
    Host,
    Installation,
    MemoryState,
    Pool,
    Template,
    TemplateVersion,
    utcnow,
)

M = TypeVar("M", bound=Base)


@dataclass(frozen=True)
class _Unique(Generic[M]):
    """One unique constraint of a model and the sentence that reports a clash with it."""

    columns: tuple[str, ...]
    message: Callable[[M], str]


def _first_line(exc: BaseException | None) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def conflict_from_db_error(exc: IntegrityError | StaleDataError) -> Conflict:
    """A ``Conflict`` for a database error whose object is unknown (e.g. raised at commit)."""
    if isinstance(exc, StaleDataError):
        return Conflict(
            "the record was changed by someone else since it was read; reload it and retry "
            f"({_first_line(exc)})"
        )
    # PostgreSQL puts the offending values in the error's detail ("Key (name)=(a) exists").
    detail = getattr(getattr(exc.orig, "diag", None), "message_detail", None)
    extra = f": {detail}" if detail else ""
    return Conflict(f"the change conflicts with existing data ({_first_line(exc.orig)}{extra})")


def _constraint_hit(table: str, columns: tuple[str, ...], message: str) -> bool:
    sqlite_marker = ", ".join(f"{table}.{column}" for column in columns)  # UNIQUE constraint failed
    named = f"uq_{table}_{'_'.join(columns)}"  # PostgreSQL names the constraint
    return any(re.search(rf"\b{re.escape(marker)}\b", message) for marker in (sqlite_marker, named))


class _Repository(Generic[M]):
    """Shared add / delete with error translation."""

    _model: type[M]
    _uniques: Sequence[_Unique[M]] = ()

    def __init__(self, session: Session) -> None:
        self._session = session

    def _describe(self, obj: M) -> str:
        raise NotImplementedError

    def add(self, obj: M) -> M:
        """Insert ``obj`` now (flushed in a SAVEPOINT); ``Conflict`` if it clashes."""
        try:
            with self._session.begin_nested():
                self._session.add(obj)
        except IntegrityError as exc:
            raise self._conflict_on_add(obj, exc) from None
        return obj

    def delete(self, obj: M) -> None:
        """Delete ``obj`` now (flushed in a SAVEPOINT); ``Conflict`` if something uses it."""
        try:
            with self._session.begin_nested():
                self._session.delete(obj)
        except IntegrityError as exc:
            raise Conflict(
                f"{self._describe(obj)} cannot be deleted while other records refer to it "
                f"({_first_line(exc.orig)})"
            ) from None

    def _conflict_on_add(self, obj: M, exc: IntegrityError) -> Conflict:
        table = self._model.__tablename__
        message = str(exc.orig)
        for unique in self._uniques:
            if _constraint_hit(table, unique.columns, message):
                return Conflict(unique.message(obj))
        # The message did not say which constraint; ask the database who holds the values.
        for unique in self._uniques:
            mapper_attrs = [getattr(self._model, column) for column in unique.columns]
            clauses = [attr == getattr(obj, attr.key) for attr in mapper_attrs]
            if self._session.scalar(select(func.count()).where(and_(*clauses))):
                return Conflict(unique.message(obj))
        return Conflict(f"{self._describe(obj)} cannot be added ({_first_line(exc.orig)})")


class _NamedRepository(_Repository[M]):
    """A repository for a model with a unique ``name``; ``kind`` is used in messages."""

    _kind: str
    _name_attr: ClassVar[InstrumentedAttribute[str]]  # read via type(self): it is a descriptor

    def _describe(self, obj: M) -> str:
        return f"{self._kind} {cast(Any, obj).name!r}"

    def get(self, id: uuid.UUID) -> M:
        obj = self._session.get(self._model, id)
        if obj is None:
            raise NotFound(f"{self._kind} {id} does not exist")
        return obj

    def find(self, id: uuid.UUID) -> M | None:
        return self._session.get(self._model, id)

    def find_by_name(self, name: str) -> M | None:
        return self._session.scalars(
            select(self._model).where(type(self)._name_attr == name)
        ).first()

    def get_by_name(self, name: str) -> M:
        obj = self.find_by_name(name)
        if obj is None:
            raise NotFound(f"{self._kind} {name!r} does not exist")
        return obj

    def list(self) -> builtins.list[M]:
        return builtins.list(
            self._session.scalars(select(self._model).order_by(type(self)._name_attr))
        )


class HostRepository(_NamedRepository[Host]):
    _model = Host
    _kind = "host"
    _name_attr = Host.name
    _uniques = (_Unique(("name",), lambda h: f"a host named {h.name!r} already exists"),)


class TemplateRepository(_NamedRepository[Template]):
    _model = Template
    _kind = "template"
    _name_attr = Template.name
    _uniques = (_Unique(("name",), lambda t: f"a template named {t.name!r} already exists"),)


class TemplateVersionRepository(_Repository[TemplateVersion]):
    _model = TemplateVersion

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self._uniques = (
            _Unique(
                ("template_id", "number"),
                lambda v: (
                    f"template {self._template_name(v.template_id)!r} already has a "
                    f"version {v.number}"
                ),
            ),
        )

    def _template_name(self, template_id: uuid.UUID) -> str:
        name = self._session.scalar(select(Template.name).where(Template.id == template_id))
        return name if name is not None else str(template_id)

    def _describe(self, obj: TemplateVersion) -> str:
        return f"template version {obj.number} of {self._template_name(obj.template_id)!r}"

    def get(self, id: uuid.UUID) -> TemplateVersion:
        version = self._session.get(TemplateVersion, id)
        if version is None:
            raise NotFound(f"template version {id} does not exist")
        return version

    def get_by_number(self, template_id: uuid.UUID, number: int) -> TemplateVersion:
        version = self._session.scalars(
            select(TemplateVersion).where(
                TemplateVersion.template_id == template_id, TemplateVersion.number == number
            )
        ).first()
        if version is None:
            raise NotFound(f"template {self._template_name(template_id)!r} has no version {number}")
        return version

    def list(self, template_id: uuid.UUID) -> builtins.list[TemplateVersion]:
        """All versions of one template, drafts included, oldest (lowest number) first."""
        return builtins.list(
            self._session.scalars(
                select(TemplateVersion)
                .where(TemplateVersion.template_id == template_id)
                .order_by(TemplateVersion.number)
            )
        )

    def latest(self, template_id: uuid.UUID) -> TemplateVersion:
        """The highest-numbered *published* version; ``NotFound`` if there is none."""
        version = self._session.scalars(
            select(TemplateVersion)
            .where(
                TemplateVersion.template_id == template_id,
                TemplateVersion.published_at.is_not(None),
            )
            .order_by(TemplateVersion.number.desc())
            .limit(1)
        ).first()
        if version is None:
            raise NotFound(
                f"template {self._template_name(template_id)!r} has no published version"
            )
        return version

    def list_all(self) -> builtins.list[tuple[TemplateVersion, str]]:
        """Every version of every template, drafts included, with its template's name: by
        template name, then oldest first. One query."""
        return [(v, name) for v, name in self._session.execute(
            select(TemplateVersion, Template.name)
            .join(Template, Template.id == TemplateVersion.template_id)
            .order_by(Template.name, TemplateVersion.number))]

    def numbers(self, ids: Collection[uuid.UUID]) -> dict[uuid.UUID, int]:
        """The numbers of the given versions, in one query (unknown ids are left out)."""
        if not ids:
            return {}
        return {id_: number for id_, number in self._session.execute(
            select(TemplateVersion.id, TemplateVersion.number)
            .where(TemplateVersion.id.in_(builtins.list(ids))))}

    def next_number(self, template_id: uuid.UUID) -> int:
        """One more than the highest number used so far (drafts included); 1 for the first."""
        highest = self._session.scalar(
            select(func.max(TemplateVersion.number)).where(
                TemplateVersion.template_id == template_id
            )
        )
        return (highest or 0) + 1

    def publish(self, version: TemplateVersion) -> TemplateVersion:
        """Stamp ``published_at`` and flush; from then on the version can never change."""
        if version.published_at is not None:
            raise Conflict(f"{self._describe(version)} is already published")
        version.published_at = utcnow()
        self._session.flush([version])
        return version


@dataclass(frozen=True, slots=True)
class ClaimTarget:
    pool_id: uuid.UUID
    version_id: uuid.UUID  # the version new desktops are made from
    stateful: bool  # its desktops keep their users' changes
    session_start_timeout_s: int  # how long a user's session may take to start
    status: PoolStatus = PoolStatus.ENABLED  # disabled or deleting: no new sessions
    roaming_profiles: bool = False  # users' homes are their profile disks
    second_session: str = "merge"  # what a user's second concurrent session gets
    profile_exclusions: str = ""  # paths kept out of profiles, one per line
    redirect_folders: str = ""  # folders put on the user's file share, one per line


class PoolRepository(_NamedRepository[Pool]):
    _model = Pool
    _kind = "pool"
    _name_attr = Pool.name
    _uniques = (_Unique(("name",), lambda p: f"a pool named {p.name!r} already exists"),)

    def claim_target(self, name: str) -> ClaimTarget | None:
        """What a claim reads of the pool, or ``None``: a few columns, no ORM object, on
        every logon."""
        row = self._session.execute(
            select(Pool.id, Pool.current_version_id, Pool.kind, Pool.session_start_timeout_s,
                   Pool.status, Pool.roaming_profiles, Pool.second_session,
                   Pool.profile_exclusions, Pool.redirect_folders)
            .where(Pool.name == name)).first()
        return None if row is None else ClaimTarget(row[0], row[1],
                                                    row[2] is PoolKind.STATEFUL, row[3], row[4],
                                                    bool(row[5]), row[6], row[7], row[8])

    def desktops(self, pool_id: uuid.UUID) -> builtins.list[Desktop]:
        return builtins.list(self._session.scalars(
            select(Desktop).where(Desktop.pool_id == pool_id).order_by(Desktop.name)))

    def list_with_versions(self) -> builtins.list[Pool]:
        """Every pool by name, its template and current version loaded with it (a listing
        reads them for each pool: without this, a query per pool)."""
        return builtins.list(self._session.scalars(
            select(Pool).options(selectinload(Pool.template), selectinload(Pool.current_version))
            .order_by(Pool.name)))

    def lock(self, pool_id: uuid.UUID) -> None:
        """Hold the pool's row lock until the transaction ends (PostgreSQL; SQLite writers
        are serialized anyway): inserts into one pool then run one at a time."""
        self._session.execute(select(Pool.id).where(Pool.id == pool_id).with_for_update())


class MemoryStateRepository(_Repository[MemoryState]):
    _model = MemoryState
    _uniques = (_Unique(("version_id", "host_id"),
                        lambda m: "this template version already has a memory state on that host"),)

    def _describe(self, obj: MemoryState) -> str:
        return f"memory state of version {obj.version_id} on host {obj.host_id}"

    def find(self, version_id: uuid.UUID, host_id: uuid.UUID) -> MemoryState | None:
        return self._session.scalars(select(MemoryState).where(
            MemoryState.version_id == version_id, MemoryState.host_id == host_id)).first()

    def for_version(self, version_id: uuid.UUID) -> builtins.list[MemoryState]:
        return builtins.list(self._session.scalars(
            select(MemoryState).where(MemoryState.version_id == version_id)))


def installation_id(session: Session) -> uuid.UUID:
    """This deployment's id (``Installation``), made by the migration that added it; made here
    if the row is gone, so a damaged database still names its VMs consistently from now on."""
    found = session.scalar(select(Installation.installation_id))
    if found is not None:
        return found
    session.add(Installation(singleton=1, installation_id=uuid.uuid4()))
    try:
        session.flush()
    except IntegrityError:  # another broker made it first: theirs it is
        session.rollback()
    made: uuid.UUID = session.scalars(select(Installation.installation_id)).one()
    return made
