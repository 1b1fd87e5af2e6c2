"""Roaming profiles: the ``profiles`` and ``profile_layers`` tables and their repository.

A profile's committed generation changes only through :meth:`ProfileRepository.commit_generation`:
one ``UPDATE profiles SET generation = :expected + 1, layer_id = :new ... WHERE user_name = :user
AND generation = :expected``, the same compare-and-swap shape as a desktop's state write
(``deskpool.store.desktops``). The generation number is the fencing token: of two sessions that
started from one generation, exactly one commits; the other sees ``False`` and sets its layer
aside.
"""

from __future__ import annotations

import builtins
import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CursorResult,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.orm.util import identity_key

from deskpool.domain.errors import Conflict, NotFound
from deskpool.domain.profile_merge import LayerMode
from deskpool.domain.profiles import (
    DEFAULT_KEEP_GENERATIONS,
    DEFAULT_QUOTA_BYTES,
    Layer,
    LayerState,
    Profile,
)
from deskpool.store.access_models import NAME_LENGTH
from deskpool.store.models import Base, _str_enum, utcnow

PATH_LENGTH = 1024


class ProfileRow(Base):
    """A user's profile: its committed generation (0: none yet) and that generation's layer."""

    __tablename__ = "profiles"

    user_name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    layer_id: Mapped[uuid.UUID | None] = mapped_column()
    quota_bytes: Mapped[int] = mapped_column(BigInteger, default=DEFAULT_QUOTA_BYTES)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    keep_generations: Mapped[int] = mapped_column(Integer, default=DEFAULT_KEEP_GENERATIONS)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    committed_at: Mapped[datetime | None] = mapped_column()
    last_writeback_s: Mapped[float | None] = mapped_column(Float)  # logoff detach to commit
    # The maintenance lease (migration 0022): the broker flattening, sweeping or verifying
    # the profile now, until when; ``maint_swap`` while it swaps a flattened base in (no
    # session may open then). And when its layers were last verified (oldest first).
    maint_owner: Mapped[str | None] = mapped_column(String(64))
    maint_until: Mapped[datetime | None] = mapped_column()
    maint_swap: Mapped[bool] = mapped_column(Boolean, default=False)
    verified_at: Mapped[datetime | None] = mapped_column()


class ProfileLayerRow(Base):
    """One qcow2 file of a profile (see ``deskpool.domain.profiles.Layer``)."""

    __tablename__ = "profile_layers"
    __table_args__ = (Index(None, "user_name", "state"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_name: Mapped[str] = mapped_column(
        String(NAME_LENGTH), ForeignKey("profiles.user_name", ondelete="CASCADE"))
    generation: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[uuid.UUID | None] = mapped_column()
    path: Mapped[str] = mapped_column(String(PATH_LENGTH), unique=True)
    state: Mapped[LayerState] = mapped_column(_str_enum(LayerState))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64))
    base_generation: Mapped[int | None] = mapped_column(Integer)
    desktop_name: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    mode: Mapped[LayerMode] = mapped_column(_str_enum(LayerMode, 16),
                                            default=LayerMode.EXCLUSIVE)


def _profile(row: ProfileRow) -> Profile:
    return Profile(user=row.user_name, generation=row.generation, layer_id=row.layer_id,
                   quota_bytes=row.quota_bytes, size_bytes=row.size_bytes,
                   keep_generations=row.keep_generations, committed_at=row.committed_at,
                   writeback_s=row.last_writeback_s)


def _layer(row: ProfileLayerRow) -> Layer:
    return Layer(id=row.id, user=row.user_name, generation=row.generation,
                 parent_id=row.parent_id, path=row.path, state=LayerState(row.state),
                 size_bytes=row.size_bytes, sha256=row.sha256,
                 base_generation=row.base_generation, desktop=row.desktop_name,
                 created_at=row.created_at, note=row.note, mode=LayerMode(row.mode))


class ProfileRepository:
    """Reads give frozen domain objects; writes are single statements or new rows."""

    def __init__(self, session: Session) -> None:
        self._session = session

    # --- reads -----------------------------------------------------------------------------

    def find(self, user: str) -> Profile | None:
        row = self._session.get(ProfileRow, user)
        return None if row is None else _profile(row)

    def get(self, user: str) -> Profile:
        found = self.find(user)
        if found is None:
            raise NotFound(f"{user} has no profile yet")
        return found

    def layers(self, user: str) -> builtins.list[Layer]:
        """Every layer of ``user``'s profile, oldest generation first."""
        rows = self._session.scalars(
            select(ProfileLayerRow).where(ProfileLayerRow.user_name == user)
            .order_by(ProfileLayerRow.generation, ProfileLayerRow.created_at))
        return [_layer(row) for row in rows]

    def layer(self, layer_id: uuid.UUID) -> Layer:
        row = self._session.get(ProfileLayerRow, layer_id)
        if row is None:
            raise NotFound(f"no profile layer {layer_id}")
        return _layer(row)

    def all(self) -> builtins.list[Profile]:
        return [_profile(row) for row in self._session.scalars(
            select(ProfileRow).order_by(ProfileRow.user_name))]

    def open_on(self, user: str) -> builtins.list[str]:
        """The desktops where ``user`` has a profile session open."""
        return [name for name in self._session.scalars(
            select(ProfileLayerRow.desktop_name).where(
                ProfileLayerRow.user_name == user,
                ProfileLayerRow.state == LayerState.SESSION)) if name is not None]

    def layers_in_state(self, state: LayerState) -> builtins.list[Layer]:
        rows = self._session.scalars(
            select(ProfileLayerRow).where(ProfileLayerRow.state == state)
            .order_by(ProfileLayerRow.user_name, ProfileLayerRow.created_at))
        return [_layer(row) for row in rows]

    # --- writes ----------------------------------------------------------------------------

    def create(self, user: str, *, quota_bytes: int = DEFAULT_QUOTA_BYTES,
               keep_generations: int = DEFAULT_KEEP_GENERATIONS) -> Profile:
        """A profile at generation 0 (no layer yet). ``Conflict`` if ``user`` has one."""
        if self._session.get(ProfileRow, user) is not None:
            raise Conflict(f"{user} already has a profile")
        row = ProfileRow(user_name=user, generation=0, layer_id=None, quota_bytes=quota_bytes,
                         size_bytes=0, keep_generations=keep_generations)
        self._session.add(row)
        self._session.flush()
        return _profile(row)

    def add_layer(self, layer: Layer, *, note: str | None = None) -> Layer:
        row = ProfileLayerRow(
            id=layer.id, user_name=layer.user, generation=layer.generation,
            parent_id=layer.parent_id, path=layer.path, state=layer.state,
            size_bytes=layer.size_bytes, sha256=layer.sha256,
            base_generation=layer.base_generation, desktop_name=layer.desktop,
            note=note if note is not None else layer.note, mode=layer.mode)
        self._session.add(row)
        self._session.flush()
        return _layer(row)

    def commit_generation(self, user: str, expected: int, layer_id: uuid.UUID,
                          size_bytes: int, *, writeback_s: float | None = None) -> bool:
        """Make ``layer_id`` generation ``expected + 1`` of ``user``'s profile if, and only
        if, the profile is still at ``expected``: one ``UPDATE ... WHERE user_name = :user
        AND generation = :expected``. Returns whether it won. The layer row itself is
        marked committed by :meth:`mark_committed` in the same transaction."""
        statement = (
            update(ProfileRow)
            .where(ProfileRow.user_name == user, ProfileRow.generation == expected)
            .values(generation=expected + 1, layer_id=layer_id, size_bytes=size_bytes,
                    committed_at=utcnow(), last_writeback_s=writeback_s)
            .execution_options(synchronize_session=False)
        )
        result = cast(CursorResult[Any], self._session.execute(statement))
        self._expire(ProfileRow, user)
        return result.rowcount == 1

    def set_layer_state(self, layer_id: uuid.UUID, expected: LayerState, new: LayerState, *,
                        note: str | None = None, **fields: Any) -> bool:
        """Move a layer from ``expected`` to ``new`` (one conditional UPDATE, as above):
        ``False`` if it is no longer in ``expected`` (someone else settled it)."""
        values: dict[str, Any] = {"state": new, **fields}
        if note is not None:
            values["note"] = note
        statement = (
            update(ProfileLayerRow)
            .where(ProfileLayerRow.id == layer_id, ProfileLayerRow.state == expected)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        result = cast(CursorResult[Any], self._session.execute(statement))
        self._expire(ProfileLayerRow, layer_id)
        return result.rowcount == 1

    def set_parent(self, layer_id: uuid.UUID, parent_id: uuid.UUID | None) -> None:
        """A flattened chain's child now sits on the standalone base (same content)."""
        self._session.execute(
            update(ProfileLayerRow).where(ProfileLayerRow.id == layer_id)
            .values(parent_id=parent_id).execution_options(synchronize_session=False))
        self._expire(ProfileLayerRow, layer_id)

    def replace_generation_layer(self, user: str, old: uuid.UUID, new: uuid.UUID) -> None:
        """The profile's committed layer moves from ``old`` to ``new`` (a flattened copy of
        the same content), if it still is ``old``."""
        self._session.execute(
            update(ProfileRow).where(ProfileRow.user_name == user, ProfileRow.layer_id == old)
            .values(layer_id=new).execution_options(synchronize_session=False))
        self._expire(ProfileRow, user)

    # --- maintenance (flatten, sweep, verify): one broker at a time, never beside a logon --

    def take_maintenance(self, user: str, owner: str, until: datetime, now: datetime) -> bool:
        """Lease ``user``'s profile to ``owner`` for maintenance until ``until`` if nobody
        else holds a live lease (``owner``'s own is extended), as ``store.leases`` does."""
        return self._changed(
            update(ProfileRow).where(
                ProfileRow.user_name == user,
                or_(ProfileRow.maint_until.is_(None), ProfileRow.maint_until < now,
                    ProfileRow.maint_owner == owner))
            .values(maint_owner=owner, maint_until=until, maint_swap=False), user)

    def renew_maintenance(self, user: str, owner: str, until: datetime) -> bool:
        """False when ``owner`` lost the lease (it expired and another took it)."""
        return self._changed(
            update(ProfileRow).where(ProfileRow.user_name == user,
                                     ProfileRow.maint_owner == owner)
            .values(maint_until=until), user)

    def release_maintenance(self, user: str, owner: str) -> None:
        self._changed(
            update(ProfileRow).where(ProfileRow.user_name == user,
                                     ProfileRow.maint_owner == owner)
            .values(maint_owner=None, maint_until=None, maint_swap=False), user)

    def begin_swap(self, user: str, owner: str, now: datetime) -> bool:
        """Mark ``owner``'s live lease as swapping (no session may open until it ends).
        The UPDATE holds the profile row's lock, so a logon's :meth:`admit_session` waits for
        this transaction; the caller then reads the open sessions with a fresh snapshot."""
        return self._changed(
            update(ProfileRow).where(ProfileRow.user_name == user,
                                     ProfileRow.maint_owner == owner,
                                     ProfileRow.maint_until >= now)
            .values(maint_swap=True), user)

    def still_swapping(self, user: str, owner: str, now: datetime) -> bool:
        """The fence of a flatten's commit: ``owner`` still holds a live, swapping lease."""
        return self._changed(
            update(ProfileRow).where(ProfileRow.user_name == user,
                                     ProfileRow.maint_owner == owner,
                                     ProfileRow.maint_swap.is_(True),
                                     ProfileRow.maint_until >= now)
            .values(maint_swap=True), user)

    def admit_session(self, user: str, now: datetime) -> bool:
        """Whether a session may open on ``user``'s profile now: no live swap. Called in the
        transaction that records the session layer; a swap whose lease expired is cancelled
        (its broker's fence then fails and it undoes its work)."""
        return self._changed(
            update(ProfileRow).where(
                ProfileRow.user_name == user,
                or_(ProfileRow.maint_swap.is_(False), ProfileRow.maint_until.is_(None),
                    ProfileRow.maint_until < now))
            .values(maint_swap=False), user)

    def mark_verified(self, user: str, at: datetime) -> None:
        self._changed(update(ProfileRow).where(ProfileRow.user_name == user)
                      .values(verified_at=at), user)

    def verified_at(self, user: str) -> datetime | None:
        return self._session.scalar(
            select(ProfileRow.verified_at).where(ProfileRow.user_name == user))

    def least_recently_verified(self, limit: int) -> builtins.list[str]:
        """Profiles with a committed generation, never verified first, then the oldest."""
        return builtins.list(self._session.scalars(
            select(ProfileRow.user_name).where(ProfileRow.generation > 0)
            .order_by(ProfileRow.verified_at.asc().nulls_first(), ProfileRow.user_name)
            .limit(limit)))

    def flatten_candidates(self) -> builtins.list[str]:
        """Users holding more committed layers than their kept generations (a chain longer
        than ``domain.profiles.flatten_plan`` leaves), the longest chains first."""
        layers = func.count(ProfileLayerRow.id)
        return builtins.list(self._session.scalars(
            select(ProfileLayerRow.user_name)
            .join(ProfileRow, ProfileRow.user_name == ProfileLayerRow.user_name)
            .where(ProfileLayerRow.state == LayerState.COMMITTED)
            .group_by(ProfileLayerRow.user_name, ProfileRow.keep_generations)
            .having(layers > ProfileRow.keep_generations + 1)
            .order_by(layers.desc(), ProfileLayerRow.user_name)))

    def _changed(self, statement: Any, user: str) -> bool:
        result = cast(CursorResult[Any], self._session.execute(
            statement.execution_options(synchronize_session=False)))
        self._expire(ProfileRow, user)
        return result.rowcount == 1

    def set_keep(self, user: str, keep_generations: int) -> None:
        row = self._session.get(ProfileRow, user)
        if row is None:
            raise NotFound(f"{user} has no profile yet")
        row.keep_generations = keep_generations
        self._session.flush()

    def _expire(self, model: type[Base], key: object) -> None:
        loaded = self._session.identity_map.get(identity_key(model, key))
        if loaded is not None:
            self._session.expire(loaded)
