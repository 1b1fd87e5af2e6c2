"""Engines, sessions, migrations and the unit of work.

SQLite specifics, set on every connection by :func:`make_engine`:

* ``PRAGMA foreign_keys=ON`` (SQLite ignores foreign keys otherwise);
* ``PRAGMA journal_mode=WAL`` for file databases, so readers never block the writer;
* ``PRAGMA busy_timeout`` so a writer waits for the lock instead of failing at once;
* transactions start with ``BEGIN IMMEDIATE``, emitted by SQLAlchemy rather than by the
  ``sqlite3`` module. Taking the write lock up front means a transaction that reads and then
  writes can never hit ``SQLITE_BUSY`` half-way (a deferred transaction whose snapshot went stale
  fails at its first write without waiting), and owning ``BEGIN`` makes SAVEPOINTs and
  transactional DDL work. The cost: write units of work run one at a time (SQLite has a single
  writer anyway), so never open a second writing ``UnitOfWork`` in a thread that already holds
  one -- it waits for the busy timeout and fails. ``UnitOfWork(..., read_only=True)`` begins a
  plain deferred transaction instead: a WAL snapshot that neither waits for nor blocks writers.
  PostgreSQL needs none of this.

PostgreSQL specifics: a pooled connection is tested when it is checked out (``pool_pre_ping``),
so after a restart of the server each process reconnects by itself instead of failing one
request per stale connection; a connection attempt gives up after ``connect_timeout`` seconds
(10 unless the URL says otherwise) rather than the operating system's minutes. A database
that does not answer (down, restarting, its connection cut) leaves a unit of work as
:class:`DatabaseUnavailable`, a ``TemporaryError`` (a 503 at the API), never as a raw driver
error.

Migrations are Alembic scripts shipped inside the package (``deskpool/store/migrations``); the
Alembic ``Config`` is built in code, so no ``alembic.ini`` is needed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from deskpool.domain.errors import LostRace, Unavailable
from deskpool.store.accounts import AuthTokenRepository, EntitlementRepository, UserRepository
from deskpool.store.admin_queries import AdminQueryRepository
from deskpool.store.desktop_listings import DesktopListingRepository
from deskpool.store.desktop_sessions import DesktopSessionRepository
from deskpool.store.desktops import DesktopRepository
from deskpool.store.host_sets import HostSetRepository
from deskpool.store.host_usage import HostUsageRepository
from deskpool.store.layer_rebases import LayerRebaseRepository
from deskpool.store.leases import LeaseRepository
from deskpool.store.linux_accounts import LinuxAccountRepository
from deskpool.store.offline import OfflineCheckoutRepository
from deskpool.store.pool_hosts import PoolHostRepository
from deskpool.store.profile_holders import ProfileHolderRepository
from deskpool.store.profiles import ProfileRepository
from deskpool.store.records import (
    ConsoleTicketRepository,
    EventRepository,
    LogonRepository,
    MachineCredentialRepository,
    RecordBatchRepository,
)
from deskpool.store.repositories import (
    HostRepository,
    MemoryStateRepository,
    PoolRepository,
    TemplateRepository,
    TemplateVersionRepository,
    _first_line,
    conflict_from_db_error,
    installation_id,
)
from deskpool.store.signin_throttles import SignInThrottleRepository
from deskpool.store.slots import HostSlotRepository

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Connection execution option: begin a deferred (read-only) SQLite transaction.
READ_ONLY_OPTION = "deskpool_read_only"
DEFAULT_BUSY_TIMEOUT_MS = 30_000
# Seconds a new PostgreSQL connection may take before the attempt fails (libpq's own default
# is to wait as long as the operating system does, minutes for a host that vanished).
DEFAULT_CONNECT_TIMEOUT_S = 10


def _is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(
    url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS, echo: bool = False
) -> Engine:
    """An engine for ``url``; for SQLite files, creates the parent directory if missing."""
    parsed = make_url(url)
    file_db = False
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        file_db = database not in ("", ":memory:") and not database.startswith("file:")
        if file_db:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    if parsed.get_backend_name() == "postgresql":
        connect_args = ({} if "connect_timeout" in parsed.query
                        else {"connect_timeout": DEFAULT_CONNECT_TIMEOUT_S})
        # A server restart leaves every pooled connection dead: test each at checkout (one
        # round trip) and replace it, so no request pays for the restart.
        engine = create_engine(parsed, echo=echo, pool_pre_ping=True,
                               connect_args=connect_args)
    else:
        engine = create_engine(parsed, echo=echo)
    if _is_sqlite(engine):
        _configure_sqlite(engine, wal=file_db, busy_timeout_ms=busy_timeout_ms)
    return engine


def _configure_sqlite(engine: Engine, *, wal: bool, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop the sqlite3 module from issuing BEGIN/COMMIT itself; SQLAlchemy does it below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


# What a ``UnitOfWork`` opens its sessions from; the rest of deskpool names it by this.
SessionFactory = sessionmaker[Session]


def make_session_factory(engine: Engine) -> SessionFactory:
    """Sessions for a :class:`UnitOfWork`.

    ``expire_on_commit=False``: objects a service returns after committing stay readable (the
    session is closed by then). Code that must see other writers' changes reads them in a new
    unit of work.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


# --- migrations ---------------------------------------------------------------------------


def alembic_config(url: str | None = None) -> Config:
    """An Alembic ``Config`` for deskpool's packaged migrations (no ``alembic.ini``).

    Also the way to write a new migration: ``alembic.command.revision(alembic_config(url),
    message=..., autogenerate=True)`` against a database that is at head.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("version_path_separator", "os")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextmanager
def _engine_for(engine_or_url: Engine | str) -> Iterator[Engine]:
    if isinstance(engine_or_url, Engine):
        yield engine_or_url
        return
    engine = make_engine(engine_or_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _set_sqlite_foreign_keys(connection: Connection, on: bool) -> None:
    # Must run outside a transaction, so straight on the driver connection.
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}")


def _migrate(engine_or_url: Engine | str, direction: str, revision: str) -> None:
    with _engine_for(engine_or_url) as engine, engine.connect() as connection:
        sqlite = _is_sqlite(engine)
        if sqlite:
            # SQLite's procedure for schema changes: with foreign keys on, the table rebuilds of
            # batch migrations would fire ON DELETE actions. Check the keys before committing.
            _set_sqlite_foreign_keys(connection, on=False)
        try:
            with connection.begin():
                config = alembic_config()
                config.attributes["connection"] = connection
                if direction == "upgrade":
                    command.upgrade(config, revision)
                else:
                    command.downgrade(config, revision)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(
                            f"migration to {revision} leaves broken foreign keys: {broken[:5]}"
                        )
        finally:
            if sqlite:
                _set_sqlite_foreign_keys(connection, on=True)


def upgrade_to_head(engine_or_url: Engine | str) -> None:
    """Bring the database schema to the newest migration, in one transaction."""
    _migrate(engine_or_url, "upgrade", "head")


def downgrade(engine_or_url: Engine | str, revision: str = "base") -> None:
    """Step the schema back to ``revision`` (``"base"``: drop every deskpool table)."""
    _migrate(engine_or_url, "downgrade", revision)


def current_revision(engine_or_url: Engine | str) -> str | None:
    """The migration the database is at; ``None`` for a database never migrated."""
    with _engine_for(engine_or_url) as engine, engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest migration shipped with this version of deskpool."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def schema_revision(session_factory: SessionFactory) -> str | None:
    """The migration the database behind ``session_factory`` is at (a query: it raises when
    the database does not answer)."""
    engine = session_factory.kw["bind"]
    with engine.connect() as connection:
        found: str | None = MigrationContext.configure(connection).get_current_revision()
        return found


def open_database(url: str) -> SessionFactory:
    """The store's entry point for a process: an engine for ``url``, its schema brought to
    the newest migration, and the session factory units of work open their sessions from."""
    engine = make_engine(url)
    upgrade_to_head(engine)
    return make_session_factory(engine)


# --- unit of work ---------------------------------------------------------------------------


def _lost_to_another_transaction(exc: DBAPIError) -> bool:
    """PostgreSQL chose this transaction to break a deadlock, or to keep serializability
    (SQLSTATE 40P01, 40001): nothing of it was written, and running it again is safe."""
    return getattr(exc.orig, "sqlstate", None) in ("40P01", "40001")


class DatabaseUnavailable(Unavailable):
    """The database did not answer: it is down or restarting, or the connection was cut.

    Nothing of the unit of work was written, unless the connection died during its commit (then
    the outcome is unknown). Either way running it again once the database is back is what to
    do: deskpool's state changes are compare-and-swaps, so a repeated one finds its work done.
    Not the fault of the object the work was about (a desktop, a host): never fail it for this.
    """


# What a caller is told to wait (``Retry-After`` at the API): a restarting server is back in
# seconds, and a longer outage only costs a few more tries.
RETRY_AFTER_S = 2.0
# SQLSTATEs of a server that ends sessions or does not take them yet: connection exceptions
# (class 08), admin shutdown, crash shutdown, "the database system is starting up".
_GOING_AWAY_SQLSTATES = ("57P01", "57P02", "57P03")


def _database_unreachable(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True  # SQLAlchemy saw the connection die under a statement
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    if not hasattr(exc.orig, "sqlstate"):
        return False  # SQLite's errors (locked, malformed) are not a server going away
    sqlstate: str | None = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:
        return True  # psycopg's own: the connection could not be made or was lost
    return sqlstate.startswith("08") or sqlstate in _GOING_AWAY_SQLSTATES


def database_unavailable(exc: DBAPIError) -> DatabaseUnavailable | None:
    """The ``DatabaseUnavailable`` that ``exc`` means, if it means the database did not
    answer (logged here with the driver's words; the error's own sentence is for users)."""
    if not _database_unreachable(exc):
        return None
    log.warning("the database did not answer: %s", _first_line(exc.orig))
    return DatabaseUnavailable("the database did not answer; please try again in a moment",
                               delay=RETRY_AFTER_S)


class UnitOfWork:
    """One transaction and the repositories that work in it.

    ::

        with UnitOfWork(session_factory) as uow:
            host = uow.hosts.get_by_name("h1")
            ...
            uow.commit()

    Repositories never commit; whoever owns the operation calls :meth:`commit`. Leaving the
    block without committing (or by an exception) rolls back what was not committed. Database
    integrity and stale-row errors leave the block as ``Conflict``.

    ``read_only=True`` is for pure reads (listings, status pages): on SQLite it takes no write
    lock, so it never waits for writers, and :meth:`commit` refuses to run.
    """

    session: Session
    hosts: HostRepository
    templates: TemplateRepository
    versions: TemplateVersionRepository
    desktops: DesktopRepository
    leases: LeaseRepository
    pools: PoolRepository
    memory_states: MemoryStateRepository
    users: UserRepository
    auth_tokens: AuthTokenRepository
    entitlements: EntitlementRepository
    events: EventRepository
    logons: LogonRepository
    console_tickets: ConsoleTicketRepository
    machine_credentials: MachineCredentialRepository
    record_batches: RecordBatchRepository
    desktop_sessions: DesktopSessionRepository
    desktop_listings: DesktopListingRepository
    host_sets: HostSetRepository
    host_usage: HostUsageRepository
    host_slots: HostSlotRepository
    pool_hosts: PoolHostRepository
    admin: AdminQueryRepository
    signin_throttles: SignInThrottleRepository
    profiles: ProfileRepository
    profile_holders: ProfileHolderRepository
    offline_checkouts: OfflineCheckoutRepository
    layer_rebases: LayerRebaseRepository

    def __init__(self, session_factory: SessionFactory, *, read_only: bool = False) -> None:
        self._session_factory = session_factory
        self.read_only = read_only
        self._active = False

    def _begin_read_only(self) -> None:
        # Begin now, so the options reach the "begin" event (plain BEGIN on SQLite). On
        # PostgreSQL a read-only transaction at REPEATABLE READ reads one snapshot, as a SQLite
        # reader does, and takes no row locks.
        options: dict[str, object] = {READ_ONLY_OPTION: True}
        if self._session_factory.kw.get("bind") is not None and \
                self._session_factory.kw["bind"].dialect.name == "postgresql":
            options |= {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
        self.session.connection(execution_options=options)

    def __enter__(self) -> Self:
        if self._active:
            raise RuntimeError("this UnitOfWork is already in use; open a new one")
        self._active = True
        self.session = self._session_factory()
        self.hosts = HostRepository(self.session)
        self.templates = TemplateRepository(self.session)
        self.versions = TemplateVersionRepository(self.session)
        self.desktops = DesktopRepository(self.session)
        self.leases = LeaseRepository(self.session)
        self.pools = PoolRepository(self.session)
        self.memory_states = MemoryStateRepository(self.session)
        self.users = UserRepository(self.session)
        self.linux_accounts = LinuxAccountRepository(self.session)
        self.auth_tokens = AuthTokenRepository(self.session)
        self.entitlements = EntitlementRepository(self.session)
        self.events = EventRepository(self.session)
        self.logons = LogonRepository(self.session)
        self.console_tickets = ConsoleTicketRepository(self.session)
        self.machine_credentials = MachineCredentialRepository(self.session)
        self.record_batches = RecordBatchRepository(self.session)
        self.desktop_sessions = DesktopSessionRepository(self.session)
        self.desktop_listings = DesktopListingRepository(self.session)
        self.host_sets = HostSetRepository(self.session)
        self.host_usage = HostUsageRepository(self.session)
        self.host_slots = HostSlotRepository(self.session)
        self.pool_hosts = PoolHostRepository(self.session)
        self.admin = AdminQueryRepository(self.session)
        self.signin_throttles = SignInThrottleRepository(self.session)
        self.profiles = ProfileRepository(self.session)
        self.profile_holders = ProfileHolderRepository(self.session)
        self.offline_checkouts = OfflineCheckoutRepository(self.session)
        self.layer_rebases = LayerRebaseRepository(self.session)
        if self.read_only:
            try:
                self._begin_read_only()
            except DBAPIError as exc:  # the block never runs, so __exit__ would not either
                self.session.close()
                self._active = False
                unavailable = database_unavailable(exc)
                if unavailable is None:
                    raise
                raise unavailable from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.session.rollback()
        except DBAPIError as rollback_error:
            # A dead connection has no transaction left to roll back: what the block did is
            # done (or gone with the connection). Any other failure is raised as before.
            if not _database_unreachable(rollback_error):
                raise
        finally:
            self.session.close()
            self._active = False
        if isinstance(exc, DBAPIError) and not isinstance(exc, IntegrityError):
            unavailable = database_unavailable(exc)
            if unavailable is not None:
                raise unavailable from exc
        if isinstance(exc, IntegrityError | StaleDataError):
            raise conflict_from_db_error(exc) from exc
        if isinstance(exc, DBAPIError) and _lost_to_another_transaction(exc):
            raise LostRace(f"the database gave this change up to a concurrent one "
                           f"({_first_line(exc.orig)}); it is safe to run again") from exc

    def commit(self) -> None:
        if self.read_only:
            raise RuntimeError("a read-only UnitOfWork cannot commit")
        try:
            self.session.commit()
        except (IntegrityError, StaleDataError) as exc:
            self.session.rollback()
            raise conflict_from_db_error(exc) from exc

    def rollback(self) -> None:
        self.session.rollback()
        if self.read_only:
            self._begin_read_only()

    @property
    def scratch(self) -> dict[Any, Any]:
        """A dict that lives as long as this unit of work's session: for what a service
        reads once per unit of work and reuses (e.g. the desktop names taken)."""
        return self.session.info

    def installation_id(self) -> uuid.UUID:
        """This deployment's id; made now if the row is missing (commit to keep it)."""
        return installation_id(self.session)

    def detach(self, obj: object) -> None:
        """Let ``obj`` outlive this unit of work as a plain, read-only snapshot (it is no
        longer refreshed or written back)."""
        self.session.expunge(obj)

    def flush(self) -> None:
        """Send pending changes now (inside the transaction), to see their errors early."""
        try:
            self.session.flush()
        except (IntegrityError, StaleDataError) as exc:
            self.session.rollback()
            raise conflict_from_db_error(exc) from exc
