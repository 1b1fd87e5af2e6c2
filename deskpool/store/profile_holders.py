"""Which hosts hold which profile layers (``deskpool.domain.profile_hosts``): the
``profile_layer_hosts`` table and its repository. A copy's row goes ``copying -> held`` by one
conditional UPDATE of the process copying it, and only after the receiving host published the
layer whole; a copy whose process died stops renewing ``updated_at`` and is then another's to
take over or the reconciler's to remove. Like the other repositories, this never commits."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Any, cast

from sqlalchemy import BigInteger, CursorResult, ForeignKey, String, delete, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from deskpool.domain.profile_hosts import HoldState, LayerHolding
from deskpool.store.models import Base, _str_enum, utcnow


class ProfileLayerHostRow(Base):
    """A profile layer on one host: held, or being copied there (see the module)."""

    __tablename__ = "profile_layer_hosts"

    layer_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("profile_layers.id", ondelete="CASCADE"), primary_key=True)
    host_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[HoldState] = mapped_column(_str_enum(HoldState, 16))
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    copier: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


def _holding(row: ProfileLayerHostRow) -> LayerHolding:
    return LayerHolding(layer_id=row.layer_id, host_id=row.host_id, state=HoldState(row.state),
                        bytes_done=row.bytes_done, bytes_total=row.bytes_total,
                        copier=row.copier, updated_at=row.updated_at)


class ProfileHolderRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def holders(self, layer_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, set[uuid.UUID]]:
        """Each of ``layer_ids`` that has any record -> the hosts holding it (maybe none
        yet: a first copy in flight). Layers without a record are left out (everywhere)."""
        result: dict[uuid.UUID, set[uuid.UUID]] = {}
        if not layer_ids:
            return result
        for layer_id, host_id, state in self._session.execute(
                select(ProfileLayerHostRow.layer_id, ProfileLayerHostRow.host_id,
                       ProfileLayerHostRow.state)
                .where(ProfileLayerHostRow.layer_id.in_(list(layer_ids)))):
            found = result.setdefault(layer_id, set())
            if HoldState(state) is HoldState.HELD:
                found.add(host_id)
        return result

    def records(self, *, state: HoldState | None = None) -> list[LayerHolding]:
        query = select(ProfileLayerHostRow).order_by(ProfileLayerHostRow.updated_at)
        if state is not None:
            query = query.where(ProfileLayerHostRow.state == state)
        return [_holding(row) for row in self._session.scalars(query)]

    def find(self, layer_id: uuid.UUID, host_id: uuid.UUID) -> LayerHolding | None:
        row = self._session.get(ProfileLayerHostRow, (layer_id, host_id))
        return None if row is None else _holding(row)

    def mark_held(self, layer_id: uuid.UUID, host_id: uuid.UUID, size: int) -> None:
        """The layer is whole on the host (made there, or its copy published)."""
        row = self._session.get(ProfileLayerHostRow, (layer_id, host_id))
        if row is None:
            self._session.add(ProfileLayerHostRow(
                layer_id=layer_id, host_id=host_id, state=HoldState.HELD, bytes_done=size,
                bytes_total=size, copier=None, updated_at=utcnow()))
        else:
            row.state, row.bytes_done, row.bytes_total = HoldState.HELD, size, size
            row.copier, row.updated_at = None, utcnow()
        self._session.flush()

    def begin_copy(self, layer_id: uuid.UUID, host_id: uuid.UUID, total: int, copier: str,
                   stale_before: datetime) -> bool:
        """Record a copy of the layer to the host by ``copier``: a new ``copying`` row, or
        one whose copier stopped renewing before ``stale_before`` taken over. False when the
        host holds it already or another live process copies it."""
        row = self._session.get(ProfileLayerHostRow, (layer_id, host_id))
        if row is None:
            self._session.add(ProfileLayerHostRow(
                layer_id=layer_id, host_id=host_id, state=HoldState.COPYING, bytes_done=0,
                bytes_total=total, copier=copier, updated_at=utcnow()))
            self._session.flush()
            return True
        return self._changed(
            update(ProfileLayerHostRow).where(
                ProfileLayerHostRow.layer_id == layer_id,
                ProfileLayerHostRow.host_id == host_id,
                ProfileLayerHostRow.state == HoldState.COPYING,
                (ProfileLayerHostRow.copier == copier)
                | (ProfileLayerHostRow.updated_at < stale_before))
            .values(copier=copier, bytes_done=0, bytes_total=total, updated_at=utcnow()),
            layer_id, host_id)

    def progress(self, layer_id: uuid.UUID, host_id: uuid.UUID, copier: str,
                 done: int) -> bool:
        """Bytes received so far (and the copy's renewal); False if it is no longer ours."""
        return self._changed(
            update(ProfileLayerHostRow).where(
                ProfileLayerHostRow.layer_id == layer_id,
                ProfileLayerHostRow.host_id == host_id,
                ProfileLayerHostRow.state == HoldState.COPYING,
                ProfileLayerHostRow.copier == copier)
            .values(bytes_done=done, updated_at=utcnow()), layer_id, host_id)

    def finish_copy(self, layer_id: uuid.UUID, host_id: uuid.UUID, copier: str) -> bool:
        """``copying -> held``, if the copy is still ``copier``'s."""
        return self._changed(
            update(ProfileLayerHostRow).where(
                ProfileLayerHostRow.layer_id == layer_id,
                ProfileLayerHostRow.host_id == host_id,
                ProfileLayerHostRow.state == HoldState.COPYING,
                ProfileLayerHostRow.copier == copier)
            .values(state=HoldState.HELD, bytes_done=ProfileLayerHostRow.bytes_total,
                    copier=None, updated_at=utcnow()), layer_id, host_id)

    def drop_copy(self, layer_id: uuid.UUID, host_id: uuid.UUID,
                  copier: str | None = None, *, stale_before: datetime | None = None) -> bool:
        """Remove a ``copying`` row: ``copier``'s own, or any not renewed since
        ``stale_before`` (the reconciler's recovery). Never a ``held`` one."""
        where = [ProfileLayerHostRow.layer_id == layer_id,
                 ProfileLayerHostRow.host_id == host_id,
                 ProfileLayerHostRow.state == HoldState.COPYING]
        if copier is not None:
            where.append(ProfileLayerHostRow.copier == copier)
        if stale_before is not None:
            where.append(ProfileLayerHostRow.updated_at < stale_before)
        result = cast(CursorResult[Any], self._session.execute(
            delete(ProfileLayerHostRow).where(*where)
            .execution_options(synchronize_session=False)))
        return result.rowcount == 1

    def forget(self, layer_id: uuid.UUID, host_id: uuid.UUID | None = None) -> None:
        """The host (every host, for None) no longer holds the layer: its copy was removed,
        its storage lost, or the layer's file changed (a flatten rebased its header)."""
        where = [ProfileLayerHostRow.layer_id == layer_id]
        if host_id is not None:
            where.append(ProfileLayerHostRow.host_id == host_id)
        self._session.execute(delete(ProfileLayerHostRow).where(*where)
                              .execution_options(synchronize_session=False))

    def _changed(self, statement: Any, layer_id: uuid.UUID, host_id: uuid.UUID) -> bool:
        result = cast(CursorResult[Any], self._session.execute(
            statement.execution_options(synchronize_session=False)))
        row = self._session.identity_map.get(
            (ProfileLayerHostRow, (layer_id, host_id), None))
        if row is not None:
            self._session.expire(row)
        return result.rowcount == 1
