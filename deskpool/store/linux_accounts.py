"""Users' Linux accounts on the desktops: name and uid, allocated once per user."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deskpool.domain.accounts import FIRST_UID, AccountRefused
from deskpool.domain.errors import LostRace
from deskpool.store.access_models import LinuxAccount

ALLOCATE_RETRIES = 8


class LinuxAccountRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def find(self, user_name: str) -> tuple[str, int] | None:
        row = self._session.get(LinuxAccount, user_name)
        return (row.account, row.uid) if row is not None else None

    def get_or_allocate(self, user_name: str, account: str) -> tuple[str, int]:
        """``user_name``'s (account, uid): the stored one, else ``account`` with the next
        free uid from ``FIRST_UID`` on. Two brokers allocating at once collide on the unique
        uid; the loser retries with the next one (each try in a savepoint, so the caller's
        transaction survives). ``AccountRefused`` when another user already has ``account``."""
        for _ in range(ALLOCATE_RETRIES):
            found = self.find(user_name)
            if found is not None:
                return found
            owner = self._session.scalars(select(LinuxAccount.user_name)
                                          .where(LinuxAccount.account == account)).first()
            if owner is not None:
                raise AccountRefused(
                    f"user {user_name!r} cannot have a Linux account on a desktop: the name "
                    f"{account!r} it maps to is already user {owner!r}'s; ask your "
                    "administrator to rename one of them")
            top = self._session.scalar(select(func.max(LinuxAccount.uid)))
            uid = FIRST_UID if top is None else top + 1
            try:
                with self._session.begin_nested():
                    self._session.add(LinuxAccount(user_name=user_name, account=account,
                                                   uid=uid))
            except IntegrityError:
                continue
            return account, uid
        raise LostRace(f"could not allocate a uid for {user_name!r}: too many brokers at once")
