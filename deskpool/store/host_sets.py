"""Host sets' switches (``HostSet``); the sets themselves are the names on hosts
(``Host.host_set``). Like every repository, this never commits."""

from __future__ import annotations

from sqlalchemy import select
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

    def set_balance(self, name: str, balance: bool) -> bool:
        """Switch a set's balancing; the switch it had before."""
        row = self._session.get(HostSet, name)
        if row is None:
            self._session.add(HostSet(name=name, balance=balance))
            return False
        before, row.balance = row.balance, balance
        return before
