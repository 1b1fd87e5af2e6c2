"""Sign-in protection: failed sign-ins counted per user name and per client address.

After ``max_failures`` failures within ``window_s`` a key is locked for ``lock_s``; each
further lock in a row lasts twice the last, up to ``lock_max_s``. A key that stays quiet for a
whole window after its lock ended starts again from the first lock time. A locked key is
refused before any password is checked, so guessing while locked learns nothing. The counts
live in the database, so every broker sharing it enforces the same locks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from deskpool.config import Settings
from deskpool.domain.errors import Conflict, SignInLocked
from deskpool.services.context import ServiceContext
from deskpool.store.access_models import NAME_LENGTH, SignInThrottle
from deskpool.store.db import UnitOfWork
from deskpool.store.models import utcnow

USER, ADDRESS = "user", "address"
Clock = Callable[[], datetime]


@dataclass(frozen=True)
class Limit:
    max_failures: int
    window: timedelta
    lock: timedelta
    lock_max: timedelta

    def lock_for(self, locks: int) -> timedelta:
        """The length of the ``locks``-th lock in a row (1: the first)."""
        seconds = self.lock.total_seconds() * 2 ** min(locks - 1, 32)
        return min(timedelta(seconds=seconds), self.lock_max)


def limits_from(settings: Settings) -> dict[str, Limit]:
    window = timedelta(seconds=settings.signin_window_s)
    lock = timedelta(seconds=settings.signin_lock_s)
    lock_max = timedelta(seconds=max(settings.signin_lock_max_s, settings.signin_lock_s))
    return {USER: Limit(settings.signin_user_max_failures, window, lock, lock_max),
            ADDRESS: Limit(settings.signin_address_max_failures, window, lock, lock_max)}


def user_key(username: str) -> str:
    """The key a user name is counted under: lower-cased, whether or not the user exists."""
    return username.strip().lower()[:NAME_LENGTH]


def _locked_error(kind: str, key: str, until: datetime, now: datetime) -> SignInLocked:
    seconds = max(1, math.ceil((until - now).total_seconds()))
    who = f"for {key!r}" if kind == USER else f"from {key}"
    return SignInLocked(f"too many failed sign-ins {who}; try again in {seconds} s",
                        delay=seconds)


class SignInGuard:
    def __init__(self, ctx: ServiceContext, clock: Clock = utcnow) -> None:
        self.ctx = ctx
        self.clock = clock
        self.limits = limits_from(ctx.settings)

    @staticmethod
    def _keys(user: str, address: str | None) -> list[tuple[str, str]]:
        keys = [(USER, user)]
        if address:
            keys.append((ADDRESS, address[:NAME_LENGTH]))
        return keys

    def check(self, user: str, address: str | None) -> None:
        """Raise ``SignInLocked`` when the user name or the address is locked now."""
        now = self.clock()
        with self.ctx.uow(read_only=True) as uow:
            for kind, key in self._keys(user, address):
                row = uow.signin_throttles.get(kind, key)
                if row is not None and row.locked_until is not None and row.locked_until > now:
                    raise _locked_error(kind, key, row.locked_until, now)

    def failed(self, user: str, address: str | None) -> None:
        """Count a failed sign-in; raise ``SignInLocked`` when it locks a key."""
        try:
            self._count(user, address)
        except Conflict:  # another broker made the same new row first: count on it
            self._count(user, address)

    def _count(self, user: str, address: str | None) -> None:
        now = self.clock()
        locked: SignInLocked | None = None
        with self.ctx.uow() as uow:
            for kind, key in self._keys(user, address):
                until = self._count_one(uow, kind, key, now)
                if until is not None and locked is None:
                    locked = _locked_error(kind, key, until, now)
            uow.commit()
        if locked is not None:
            raise locked

    def _count_one(self, uow: UnitOfWork, kind: str, key: str,
                   now: datetime) -> datetime | None:
        limit = self.limits[kind]
        row = uow.signin_throttles.get(kind, key, for_update=True)
        if row is None:
            row = uow.signin_throttles.add(SignInThrottle(
                kind=kind, key=key, failures=0, window_start=now, locks=0))
        if now - row.window_start >= limit.window:  # the window is over: count afresh
            quiet_since = max(row.window_start, row.locked_until or row.window_start)
            if now - quiet_since >= limit.window:
                row.locks = 0  # quiet a whole window after its last lock: forgiven
            row.failures, row.window_start = 0, now
        row.failures += 1
        if row.failures < limit.max_failures:
            return None
        row.locks += 1
        row.locked_until = now + limit.lock_for(row.locks)
        # The next window starts at the lock: failures right after it count towards the next.
        row.failures, row.window_start = 0, now
        return row.locked_until

    def succeeded(self, user: str) -> None:
        """A right password clears the user name's count; the address keeps its own."""
        with self.ctx.uow() as uow:
            uow.signin_throttles.clear(USER, user)
            uow.commit()
