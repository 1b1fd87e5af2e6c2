"""Users' Linux accounts on the desktops: name, uid and gid, allocated once per user (or taken
from the directory's uidNumber / gidNumber)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deskpool.domain.accounts import FIRST_UID, AccountRefused
from deskpool.domain.errors import LostRace
from deskpool.store.access_models import LinuxAccount

ALLOCATE_RETRIES = 8
# A directory's numbers must stay clear of the desktops' own: system users below 1000 (Debian's
# dynamic system range, and root), system groups below 100 (100 is Debian's "users", a common
# gidNumber for directory users).
FIRST_DIRECTORY_UID = 1000
FIRST_DIRECTORY_GID = 100


class LinuxAccountRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def find(self, user_name: str) -> tuple[str, int] | None:
        row = self._session.get(LinuxAccount, user_name)
        return (row.account, row.uid) if row is not None else None

    def gid_of(self, user_name: str) -> int | None:
        """The primary group of ``user_name``'s account, None when it has none yet."""
        row = self._session.get(LinuxAccount, user_name)
        return row.gid if row is not None else None

    def get_or_allocate(self, user_name: str, account: str, *, uid: int | None = None,
                        gid: int | None = None) -> tuple[str, int]:
        """``user_name``'s (account, uid).

        Without ``uid`` (a local user, or a directory entry without uidNumber): the stored
        one, else ``account`` with the next free uid from ``FIRST_UID`` on (gid = uid). Two
        brokers allocating at once collide on the unique uid; the loser retries with the next
        one (each try in a savepoint, so the caller's transaction survives).

        With ``uid`` (the directory's uidNumber; ``gid`` its gidNumber, else the uid): those
        numbers, recorded, or the stored row updated to them when the directory changed them.
        ``AccountRefused`` when the uid is below ``FIRST_DIRECTORY_UID``, the gid below
        ``FIRST_DIRECTORY_GID``, or another user's account already has the uid; and in either
        case when another user already has ``account``."""
        if uid is not None:
            return self._from_directory(user_name, account, uid, uid if gid is None else gid)
        for _ in range(ALLOCATE_RETRIES):
            found = self.find(user_name)
            if found is not None:
                return found
            self._check_name_free(user_name, account)
            # Local uids count on from the local ones: a directory's (maybe far higher)
            # numbers neither push them into its range nor are handed out twice.
            top = self._session.scalar(select(func.max(LinuxAccount.uid))
                                       .where(LinuxAccount.from_directory.is_(False)))
            new_uid = FIRST_UID if top is None else top + 1
            while self._owner_of_uid(new_uid) is not None:
                new_uid += 1
            try:
                with self._session.begin_nested():
                    self._session.add(LinuxAccount(user_name=user_name, account=account,
                                                   uid=new_uid, gid=new_uid,
                                                   from_directory=False))
            except IntegrityError:
                continue
            return account, new_uid
        raise LostRace(f"could not allocate a uid for {user_name!r}: too many brokers at once")

    def _from_directory(self, user_name: str, account: str, uid: int,
                        gid: int) -> tuple[str, int]:
        refused = f"user {user_name!r} cannot have a Linux account on a desktop:"
        if uid < FIRST_DIRECTORY_UID:
            raise AccountRefused(
                f"{refused} the directory gives it uidNumber {uid}, below "
                f"{FIRST_DIRECTORY_UID}, where the desktops' own system accounts live; ask "
                "your administrator to fix the entry")
        if gid < FIRST_DIRECTORY_GID:
            raise AccountRefused(
                f"{refused} the directory gives it gidNumber {gid}, one of the desktops' "
                f"system groups (below {FIRST_DIRECTORY_GID}); ask your administrator to fix "
                "the entry")
        owner = self._owner_of_uid(uid)
        if owner is not None and owner != user_name:
            raise AccountRefused(
                f"{refused} the directory gives it uidNumber {uid}, which is already user "
                f"{owner!r}'s uid on the desktops; ask your administrator to give one of them "
                "another number")
        row = self._session.get(LinuxAccount, user_name)
        if row is None:
            self._check_name_free(user_name, account)
            try:
                with self._session.begin_nested():
                    self._session.add(LinuxAccount(user_name=user_name, account=account,
                                                   uid=uid, gid=gid, from_directory=True))
            except IntegrityError:  # another broker recorded the same user or uid meanwhile
                raise LostRace(f"another broker recorded {user_name!r}'s account at the same "
                               "time; try again") from None
            return account, uid
        # The directory is the authority for its numbers: follow it when it changes them.
        row.uid, row.gid, row.from_directory = uid, gid, True
        return row.account, uid

    def _check_name_free(self, user_name: str, account: str) -> None:
        owner = self._session.scalars(select(LinuxAccount.user_name)
                                      .where(LinuxAccount.account == account)).first()
        if owner is not None:
            raise AccountRefused(
                f"user {user_name!r} cannot have a Linux account on a desktop: the name "
                f"{account!r} it maps to is already user {owner!r}'s; ask your "
                "administrator to rename one of them")

    def _owner_of_uid(self, uid: int) -> str | None:
        return self._session.scalars(select(LinuxAccount.user_name)
                                     .where(LinuxAccount.uid == uid)).first()
