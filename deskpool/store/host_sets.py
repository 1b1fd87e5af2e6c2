"""Host sets' switches (``HostSet``); the sets themselves are the names on hosts
(``Host.host_set``). Like every repository, this never commits."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from deskpool.store.models import Host, HostSet


class HostSetRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def names(self) -> set[str]:
        """The sets some host is in (the default set, no name, is not one of them)."""
        return {n for n in self._session.scalars(select(Host.host_set).distinct()) if n is not None}

    def balanced(self) -> set[str]:
        """The sets whose balancing is on."""
        return set(self._session.scalars(select(HostSet.name).where(HostSet.balance)))

    def forget_if_empty(self, name: str) -> None:
        """Drop the switch of a set no host is in any more, so a set named again later
        starts with balancing off."""
        self._session.flush()
        if self._session.scalar(select(Host.id).where(Host.host_set == name).limit(1)) is None:
            self._session.execute(delete(HostSet).where(HostSet.name == name))

    def set_balance(self, name: str, balance: bool) -> bool:
        """Switch a set's balancing; the switch it had before."""
        row = self._session.get(HostSet, name)
        if row is None:
            self._session.add(HostSet(name=name, balance=balance))
            return False
        before, row.balance = row.balance, balance
        return before
